"""What glmkit's kernel smoke scripts share (``gpu_smoke_gemv16.py``, ``gpu_smoke_mlp16.py``): one line per check,
then every failure named and the exit status (non-zero where one failed). Each script runs in its own process."""

from __future__ import annotations

from typing import NoReturn

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
