"""Test-session setup: keep Jupyter/IPython state and glmkit's cache out of ~, CPU output stable, Triton on the CPU;
the slowest test files first, so ``make test``'s two pytest-xdist workers end together."""

import os
import tempfile

import pytest

_root = tempfile.mkdtemp(prefix="glmkit-test-")
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
    os.environ[var] = os.path.join(_root, var.lower())
# Each process of a run (each xdist worker too: they inherit the first process's environment) gets its own cache;
# a GLMKIT_CACHE the user set is kept.
if "GLMKIT_CACHE" not in os.environ or os.environ.get("GLMKIT_TEST_CACHE") == os.environ["GLMKIT_CACHE"]:
    os.environ["GLMKIT_CACHE"] = os.environ["GLMKIT_TEST_CACHE"] = os.path.join(_root, "cache")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("GLMKIT_MODEL", None)

# Without a GPU, glmkit's Triton kernels (glmkit.gemv) run in Triton's CPU interpreter, so the tests check the same
# kernel code a GPU runs. Triton reads TRITON_INTERPRET when a kernel is defined: set it before glmkit is imported.
# (Checked without importing torch, which would initialise CUDA in the test process.)
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs two pytest-xdist workers with `--dist loadfile --no-loadscope-reorder`: a worker takes the next
# whole file (a notebook's cells stay together and in order) when it runs low, in collection order. These files go
# first, slowest first (seconds on 2 busy CPU cores, 2 workers), so the run ends on small files, not on one worker
# still busy with a long one while the other waits. Every other file keeps its place after them.
SLOWEST_FIRST = [
    "tests/test_gemv.py",  # 50
    "notebooks/04_quantization.ipynb",  # 45
    "tests/test_tp_decode.py",  # 45
    "tests/test_gemv4bit.py",  # 38
    "notebooks/08_tensor_parallel.ipynb",  # 34
    "tests/test_tp_serve.py",  # 34
    "tests/test_browser.py",  # 33
    "tests/test_parallel.py",  # 26
    "tests/test_quantization.py",  # 22
    "tests/test_engine.py",  # 18
    "tests/test_fast_decode.py",  # 17
    "tests/test_fast_decode_quantized.py",  # 15
    "tests/test_server.py",  # 14
    "tests/test_attention.py",  # 14
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(first)))  # stable: same order within a file
