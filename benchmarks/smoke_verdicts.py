"""What glmkit's kernel smoke scripts share (``gpu_smoke_gemv16.py``, ``gpu_smoke_mlp16.py``): one line per check,
then every failure named and the exit status (non-zero where one failed); and a kernel's launches captured in a CUDA
graph with programmatic dependent launch. Each script runs in its own process."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

import torch

from glmkit.gemv import dependent_launches

T = TypeVar("T")

failed: list[str] = []


def verdict(name: str, ok: bool, detail: str) -> None:
    """One check's line: ``ok`` or ``FAIL``, its name and what was seen."""
    print(("ok  " if ok else "FAIL"), name, detail, flush=True)
    if not ok:
        failed.append(name)


def finish() -> NoReturn:
    """The failed checks named (or "all passed"), and the exit: 1 where one failed."""
    print("FAILED:" if failed else "all passed", ", ".join(failed), flush=True)
    raise SystemExit(1 if failed else 0)


def pdl_graph(warm_up: Callable[[], object], body: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """A CUDA graph of ``body``'s launches, captured with programmatic dependent launch after ``warm_up`` ran once on
    a side stream (what compiles and checks itself outside the capture), and what ``body`` returned."""
    graph = torch.cuda.CUDAGraph()
    with dependent_launches():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm_up()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = body()
    return graph, out
