"""The kit's small vocabularies, each spelled out once: memory sizes, devices, precisions, map strategies,
allocator settings, and the head size of a config.

Everything else in glmkit reads these names from here, so a new precision or device kind is added in one place.
Pure Python; imports nothing of glmkit's, and torch only in the dtype helpers, so that ``glmkit --help``, a mistyped
flag and the ``--tp N`` launcher (which only starts processes) answer without loading torch (about 1.5 s of CPU).
Used from ``notebooks/01_single_gpu_oom.ipynb`` on.

>>> parse_size("12GiB"), gpu_index("cuda:1"), quantization_name("bf16"), PRECISIONS["nf4"]
(12884901888, 1, None, ('bfloat16', 'nf4'))
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GiB = 2**30
MiB = 2**20

# Memory sizes ---------------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanningError(ValueError):
    """Bad planning input (a budget, a device, a quantization name)."""


def parse_size(size: int | float | str) -> int:
    """Bytes from ``12 * 2**30``, ``"12GiB"`` (binary) or ``"12GB"`` (decimal), as accelerate reads them.

    >>> parse_size("12GiB"), parse_size("1.5 GB"), parse_size(1024)
    (12884901888, 1500000000, 1024)
    """
    if isinstance(size, bool):
        raise PlanningError(f"{size!r} is not a memory size: use bytes or a string like '12GiB'.")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise PlanningError(f"'{size}' is not a memory size: write it like '12GiB', '24GB' or 12884901888.")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if value <= 0:
        raise PlanningError(f"A memory budget must be positive, got {size!r}.")
    return value


# Devices --------------------------------------------------------------------------------------------------------
OFFLOAD_DEVICES = ("cpu", "disk")
DEVICE_STRINGS = re.compile(r"^(cpu|disk|meta|mps|cuda(:\d+)?|xpu(:\d+)?)$")
_GPU_RE = re.compile(r"^cuda(?::(\d+))?$")


def is_torch_device(value: Any) -> bool:
    """Whether ``value`` is a ``torch.device``, without importing torch (no device exists before torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.device)


def gpu_index(device: Any) -> int | None:
    """The GPU index a device-map value names (``0``, ``"cuda"``, ``"cuda:1"``, ``torch.device("cuda:1")``), else None.

    >>> import torch
    >>> gpu_index(1), gpu_index("cuda"), gpu_index(torch.device("cuda:2")), gpu_index("cpu")
    (1, 0, 2, None)
    """
    if is_torch_device(device):
        device = str(device)
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    m = _GPU_RE.match(device) if isinstance(device, str) else None
    return int(m.group(1) or 0) if m else None


def norm_device(device: Any) -> int | str:
    """A device-map value as a budget key: GPUs as their index, anything else as it was (``"cpu"``, ``"disk"``)."""
    index = gpu_index(device)
    if index is not None:
        return index
    return str(device) if is_torch_device(device) else device


def valid_device(device: Any) -> bool:
    """Whether a device-map value names a device: a GPU index >= 0, a ``torch.device``, or ``cpu``/``disk``/``cuda:N``..."""
    if is_torch_device(device):
        return True
    if isinstance(device, int) and not isinstance(device, bool):
        return device >= 0
    return isinstance(device, str) and bool(DEVICE_STRINGS.match(device))


def normalize_devices(devices: Mapping[Any, Any] | Sequence[Any] | None) -> dict[int | str, int]:
    """``{device: budget_bytes}`` from a ``max_memory``-style dict or a list (list entries are GPUs 0, 1, ...).

    >>> normalize_devices(["12GiB", "24GiB"]) == {0: 12 * 2**30, 1: 24 * 2**30}
    True
    """
    if devices is None:
        return {0: 80 * GiB}
    items = devices.items() if isinstance(devices, Mapping) else enumerate(devices)
    out: dict[int | str, int] = {}
    for device, budget in items:
        if isinstance(device, str) and device.startswith("cuda:"):
            device = int(device.split(":")[1])
        if not (isinstance(device, int) and device >= 0) and device not in OFFLOAD_DEVICES:
            raise PlanningError(f"Unknown device {device!r}: use GPU indices 0, 1, ... (or 'cuda:N'), 'cpu' or 'disk'.")
        out[device] = parse_size(budget)
    if not out:
        raise PlanningError("No devices given: pass budgets like ['12GiB', '12GiB'] or {0: '12GiB', 'cpu': '32GiB'}.")
    return out


# Precisions -----------------------------------------------------------------------------------------------------
# glmkit's quantization names, least lossy first (None: the weights stay in their 16/32-bit dtype).
QUANTIZATIONS = (None, "int8", "nf4", "fp4", "nf4-dq", "fp4-dq")
QUANTIZATION_CHOICES = tuple(q for q in QUANTIZATIONS if q)  # what ``--quantization`` accepts
# precision name -> (dtype of the unquantized parts and of the compute, glmkit quantization name)
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
    "int8": ("float16", "int8"),  # LLM.int8 computes in fp16; bf16 inputs are cast on every matmul
    "nf4": ("bfloat16", "nf4"),
    "nf4-dq": ("bfloat16", "nf4-dq"),
    "fp4": ("bfloat16", "fp4"),
    "fp4-dq": ("bfloat16", "fp4-dq"),
}


def quantization_setting(model: Any) -> Callable[..., Any] | None:
    """``get(key, default=None)`` over a loaded model's ``config.quantization_config`` (a dict, or transformers'
    ``BitsAndBytesConfig``), or ``None`` for a model loaded without quantization.

    >>> from types import SimpleNamespace
    >>> get = quantization_setting(SimpleNamespace(config=SimpleNamespace(quantization_config={"load_in_4bit": True})))
    >>> get("load_in_4bit"), get("bnb_4bit_quant_type", "fp4")
    (True, 'fp4')
    """
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return None
    return q.get if isinstance(q, dict) else (lambda key, default=None: getattr(q, key, default))


def quantization_name(quantization: str | None) -> str | None:
    """glmkit's name for a quantization (``None`` for 16/32-bit: ``"bf16"``, ``"fp16"``, ``"none"`` too).

    >>> quantization_name("NF4"), quantization_name("fp16")
    ('nf4', None)
    """
    q = quantization.lower() if isinstance(quantization, str) else quantization
    if q in ("bf16", "fp16", "none"):
        q = None
    if q not in QUANTIZATIONS:
        raise PlanningError(f"Unknown quantization {quantization!r}: use None, 'int8', 'nf4', 'fp4', 'nf4-dq' or 'fp4-dq'.")
    return q


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` from ``torch.bfloat16`` or ``"bfloat16"``."""
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"bfloat16"`` from ``torch.bfloat16`` or ``"bfloat16"``."""
    return str(torch_dtype(dtype)).replace("torch.", "")


def element_size(dtype: torch.dtype | str) -> int:
    """Bytes per value: 2 for ``torch.bfloat16``."""
    import torch

    return torch.tensor([], dtype=torch_dtype(dtype)).element_size()


# Device-map strategies ------------------------------------------------------------------------------------------
# The strings transformers' ``from_pretrained(device_map=...)`` accepts (accelerate places the weights).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# Allocator settings ---------------------------------------------------------------------------------------------
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"  # what glmkit sets in every process it starts
SET_BY_GLMKIT_ENV = "GLMKIT_SET_ALLOC_CONF"  # marks that glmkit, not the user, set PYTORCH_CUDA_ALLOC_CONF
ALLOCATORS = ("expandable", "default")  # what ``glmkit plan --allocator`` accepts


def expandable_in(alloc_conf: str | None) -> bool:
    """Whether a ``PYTORCH_CUDA_ALLOC_CONF`` value turns on expandable segments.

    >>> expandable_in("expandable_segments:True,max_split_size_mb:128"), expandable_in(None)
    (True, False)
    """
    return "expandable_segments:true" in (alloc_conf or "").lower()


# Model configs --------------------------------------------------------------------------------------------------
def head_dim(config: Any) -> int:
    """Size of one attention head: ``config.head_dim``, else ``hidden_size // num_attention_heads`` (128 for GLM-4-9B)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    """Number of KV heads (2 for GLM-4-9B); configs without grouped KV share the query heads' count."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
