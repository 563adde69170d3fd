"""Test-session setup: keep Jupyter/IPython state and glmkit's cache out of ~, CPU output stable, Triton on the CPU."""

import os
import tempfile

_root = tempfile.mkdtemp(prefix="glmkit-test-")
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
    os.environ[var] = os.path.join(_root, var.lower())
os.environ.setdefault("GLMKIT_CACHE", os.path.join(_root, "cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("GLMKIT_MODEL", None)

# Without a GPU, glmkit's Triton kernels (glmkit.gemv) run in Triton's CPU interpreter, so the tests check the same
# kernel code a GPU runs. Triton reads TRITON_INTERPRET when a kernel is defined: set it before glmkit is imported.
# (Checked without importing torch, which would initialise CUDA in the test process.)
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
