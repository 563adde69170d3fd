"""Shared fixtures: one tiny checkpoint per test session (built, not downloaded), and ``glmkit generate`` run in the
test process, the one-process reference of the tensor-parallel tests."""

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from glmkit.models import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def generate_here() -> Callable[..., dict]:
    """``glmkit generate --json`` on the trained tiny GLM-4 in this process, with ``parallel.run_generate``'s defaults
    (16 new tokens, float32) plus ``flags``: the same command the TP tests start in fresh processes, without a fresh
    interpreter's ~5 s of imports. Returns the printed result (``tokens``, ``text``, ``processes``, ``ranks_agree``)."""
    from glmkit.cli import main
    from glmkit.models import TRAINED_TINY_DIR

    def run(*flags: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["generate", "--model", str(TRAINED_TINY_DIR), "--json", "--max-new-tokens", "16",
                         "--dtype", "float32", *flags])
        lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
        assert code == 0 and len(lines) == 1, f"glmkit generate {' '.join(flags)} exited {code}: {out.getvalue()}"
        return json.loads(lines[0])

    return run
