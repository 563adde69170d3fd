"""Helpers more than one test module uses (imported as ``from helpers import ...``: pytest puts tests/ on the path)."""

import re
from typing import Any

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``glmkit ARGV`` in this process (no interpreter to start, torch already imported): (exit code, stdout,
    stderr); argparse's own errors (2) and ``--help`` (0) exit through ``SystemExit``, caught here."""
    from glmkit.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal values of ``shape`` on ``DEVICE`` (drawn on the CPU: the same numbers on every device)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def greedy_rows(decoder, logits: torch.Tensor, pos: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens of a batch of slots, each at its own position: ``logits`` from the slots' prefills, ``pos`` their
    next positions (advanced in place); ``steps`` decode steps of ``decoder`` (a ``FastDecoder``), as the engine runs them."""
    rows = [[] for _ in range(logits.shape[0])]
    for _ in range(steps):
        tokens = logits.argmax(-1)
        for row, t in zip(rows, tokens.tolist()):
            row.append(t)
        logits = decoder.decode_step(tokens, pos).clone()  # each row at its own position
        pos += 1
    return rows


def named_launch_args(source: str, kernel: str, args: list[Any]) -> dict[str, Any]:
    """The arguments a launch hands one of glmkit's CUDA kernels (``kernel`` in ``source``), by the names of the
    kernel's own parameters, once checked against them: as many, in order, a tensor for every pointer, an int for
    every ``int`` and a float for every ``double`` (torch's launcher passes a Python float as a C double and an int as
    a C int: the kernel must take only those)."""
    signature = re.search(rf"{kernel}\((.*?)\)\s*\{{", source, re.S).group(1)
    params = [p.strip() for p in signature.split(",")]
    assert len(args) == len(params), (args, params)
    assert not [p for p in params if "*" not in p and not p.startswith(("int ", "double "))], params
    for arg, param in zip(args, params):
        kind = torch.Tensor if "*" in param else float if param.startswith("double") else int
        assert isinstance(arg, kind), (param, arg)
    return dict(zip([p.split()[-1].lstrip("*") for p in params], args))
