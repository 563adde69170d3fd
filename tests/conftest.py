"""Shared fixtures: one tiny checkpoint per test session (built, not downloaded)."""

from pathlib import Path

import pytest

from glmkit.models import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)
