"""Test-session setup: keep Jupyter/IPython state and glmkit's cache out of ~, and CPU output stable."""

import os
import tempfile

_root = tempfile.mkdtemp(prefix="glmkit-test-")
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
    os.environ[var] = os.path.join(_root, var.lower())
os.environ.setdefault("GLMKIT_CACHE", os.path.join(_root, "cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("GLMKIT_MODEL", None)
