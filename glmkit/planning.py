"""Memory planning: what fills each card when a model loads *and generates*, before you download it.

accelerate plans device maps from weights alone. A card also holds the KV cache, the prefill
activations (the MLP's ``[batch, seq, 2 * intermediate]`` output dominates), the logits on the
device with ``lm_head``, the inputs on the first device, and the CUDA context. ``plan_memory``
budgets all of them per device, from the config alone on the meta device (no GPU, no weights).
Introduced in ``notebooks/01_single_gpu_oom.ipynb``.

>>> from glmkit.models import glm4_9b_chat_config
>>> plan = plan_memory(glm4_9b_chat_config(), devices=["12GiB"], context_len=8192)
>>> plan.fits, round(plan.devices[0].weights / 2**30, 2)
(False, 17.51)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from glmkit.device_map import DeviceMapError, as_model, check_device_map, model_units
from glmkit.tables import gib, html_table, text_table

GiB = 2**30
MiB = 2**20
# Memory a process holds on each GPU outside PyTorch's allocator: the CUDA context, kernels, cuBLAS
# handles (NVML's per-process figure minus torch.cuda.memory_reserved()). Measured 0.68 GiB (bf16, nf4)
# and 0.76 GiB (int8) on an H100 with CUDA 13 (benchmarks/results/planner_accuracy.json); smaller cards
# and older CUDA versions use less.
DEFAULT_CUDA_CONTEXT = 720 * MiB
# bitsandbytes' int8 kernels index with 32-bit integers: one forward may not produce more than
# 2**31 - 1 elements per matrix (seen on an H100: "Error invalid argument ... ops.cu" at 4 x 32K tokens).
INT8_MAX_ELEMENTS = 2**31 - 1
UNBOUNDED = 2**50  # budget of a 'cpu'/'disk' offload target that was given none
QUANTIZATIONS = (None, "int8", "nf4", "fp4", "nf4-dq", "fp4-dq")
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
        if not (isinstance(device, int) and device >= 0) and device not in ("cpu", "disk"):
            raise PlanningError(f"Unknown device {device!r}: use GPU indices 0, 1, ... (or 'cuda:N'), 'cpu' or 'disk'.")
        out[device] = parse_size(budget)
    if not out:
        raise PlanningError("No devices given: pass budgets like ['12GiB', '12GiB'] or {0: '12GiB', 'cpu': '32GiB'}.")
    return out


def _check_quantization(quantization: str | None) -> str | None:
    q = quantization.lower() if isinstance(quantization, str) else quantization
    if q in ("bf16", "fp16", "none"):
        q = None
    if q not in QUANTIZATIONS:
        raise PlanningError(f"Unknown quantization {quantization!r}: use None, 'int8', 'nf4', 'fp4', 'nf4-dq' or 'fp4-dq'.")
    return q


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str) -> int:
    """Bytes bitsandbytes allocates for one quantized ``nn.Linear`` weight (bias not included).

    int8 (LLM.int8): int8 weight + one fp32 scale per output row (``SCB``). 4-bit: two values per
    byte + one absmax per 64-value block (fp32, or uint8 + a second-level fp32 absmax per 256 blocks
    with double quantization) + the 16-entry code book (and the 256-entry one of the second level).

    >>> quantized_linear_bytes(256, 256, "int8"), quantized_linear_bytes(256, 256, "nf4")
    (66560, 36928)
    """
    n = out_features * in_features
    if quantization == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / 64)
    packed = math.ceil(n / 2)
    if quantization.endswith("-dq"):
        return packed + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4
    return packed + 4 * blocks + 4 * 16


def _output_layer_name(model: nn.Module) -> str:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is out), "lm_head")


def unit_weight_bytes(
    model_or_config: Any, dtype: torch.dtype | str = torch.bfloat16, quantization: str | None = None
) -> dict[str, int]:
    """Bytes of weights (and buffers) per device-map unit: embeddings, each decoder layer, norm, lm_head.

    Quantization replaces every ``nn.Linear`` but the output layer, as transformers does with
    bitsandbytes; embeddings, norms, biases and ``lm_head`` stay in ``dtype``.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> sizes = unit_weight_bytes(glm4_9b_chat_config())
    >>> sum(sizes.values()), sizes["model.layers.0"], sizes["lm_head"]
    (18799902976, 407921664, 1241513984)
    """
    model = as_model(model_or_config)
    return dict(_unit_weight_bytes(model, _dtype(dtype), _check_quantization(quantization)))


@lru_cache(maxsize=64)
def _unit_weight_bytes(model: nn.Module, dtype: torch.dtype, quantization: str | None) -> tuple[tuple[str, int], ...]:
    units = model_units(model).all
    skip = _output_layer_name(model)
    elem = torch.tensor([], dtype=dtype).element_size()
    sizes = dict.fromkeys(units, 0)

    def unit_of(name: str) -> str:
        return next(u for u in units if name == u or name.startswith(u + "."))

    for mod_name, module in model.named_modules():
        quantize = quantization is not None and isinstance(module, nn.Linear) and mod_name != skip
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if quantize and p_name == "weight":
                nbytes = quantized_linear_bytes(p.shape[0], p.shape[1], quantization)
            else:
                nbytes = p.numel() * (elem if p.is_floating_point() else p.element_size())
            sizes[unit_of(full)] += nbytes
        for b_name, b in module.named_buffers(recurse=False):
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            sizes[unit_of(full)] += b.numel() * b.element_size()
    return tuple(sizes.items())


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """KV-cache bytes per token per sequence for one decoder layer: 2 (K and V) x KV heads x head_dim x bytes.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> kv_cache_bytes_per_token(glm4_9b_chat_config()) * 40  # 40 KiB per token for all 40 layers
    40960
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * head_dim * torch.tensor([], dtype=_dtype(dtype)).element_size()


def layer_activation_bytes(
    config: Any, tokens: int, batch_size: int = 1, dtype: torch.dtype | str = torch.bfloat16,
    quantization: str | None = None,
) -> int:
    """Peak transient bytes of one decoder layer processing ``tokens`` tokens per sequence (prefill).

    With fused attention (SDPA/flash: no ``seq x seq`` matrix) the MLP dominates. While the
    activation multiplies, the ``gate_up`` output ``[b, s, 2 * inter]``, ``act(gate)`` and the product
    ``[b, s, inter]`` are alive next to four ``[b, s, hidden]`` tensors (the layer input the model's
    loop still holds, the residual, the normed input and the attention sum): ``4 * hidden + 4 * inter``
    values per token. Measured on an H100 for GLM-4-9B: 142.6 KB per token in bf16 and nf4 (this
    formula: 142.3 KB). LLM.int8 peaks inside ``gate_up`` instead: an int8 copy of the input, an int32
    result and its 16-bit dequantization (``9 * hidden + 12 * inter`` bytes; measured 201.6 KB, formula 201.2 KB).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> layer_activation_bytes(glm4_9b_chat_config(), 1)  # bytes per token in bf16
    142336
    """
    e = torch.tensor([], dtype=_dtype(dtype)).element_size()
    h, inter = config.hidden_size, config.intermediate_size
    per_token = e * (4 * h + 4 * inter)
    if quantization == "int8":
        per_token = max(per_token, 4 * e * h + h + 4 * 2 * inter + e * 2 * inter)
    return per_token * tokens * batch_size


def allocator_slack(config: Any, tokens: int, batch_size: int = 1, dtype: torch.dtype | str = torch.bfloat16,
                    quantization: str | None = None, expandable_segments: bool | None = None) -> int:
    """Memory PyTorch's caching allocator holds beyond the live tensors at the prefill peak.

    Two terms, fitted on an H100 (benchmarks/results/planner_accuracy*.json) in units that scale with
    the model: ``G``, the ``gate_up`` output ``[b, s, 2 * inter]`` (the largest activation), and ``W``, the
    ``gate_up`` weight in 16 bit (the largest temporary a quantized layer makes: 4-bit layers dequantize
    it, int8 layers keep int32 results and outlier buffers of that order).

    - default allocator: KV-cache blocks get carved out of freed activation blocks layer after layer,
      so new segments keep being reserved: up to ``1.4 G`` measured (plus ``W``, or ``3.5 W`` for int8);
    - ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (glmkit's notebooks and CLI set it):
      segments grow in place: ``0.2 G`` (16 bit), ``W + 0.35 G`` (4 bit), ``3.5 W + 0.7 G`` (int8).

    ``expandable_segments=None`` reads the setting from the environment, as PyTorch does.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> c = glm4_9b_chat_config()
    >>> allocator_slack(c, 32768, expandable_segments=True) < allocator_slack(c, 32768, expandable_segments=False)
    True
    """
    import os

    if expandable_segments is None:
        expandable_segments = "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower()
    e = torch.tensor([], dtype=_dtype(dtype)).element_size()
    g = e * 2 * config.intermediate_size * tokens * batch_size
    w = e * 2 * config.intermediate_size * config.hidden_size
    fixed = {None: 0, "int8": 7 * w // 2}.get(quantization, w)
    if not expandable_segments:
        return fixed + 7 * g // 5
    return fixed + {None: g // 5, "int8": 7 * g // 10}.get(quantization, 7 * g // 20)


def chunked_prefill_bytes(config: Any, context_len: int, batch_size: int = 1,
                          dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Extra transient of a prompt chunk attending to a long cache (``glmkit.generation.chunked_prefill``):
    one layer's K and V at the full context. The cache itself is allocated once and attention adds nothing
    that grows with the context (``gqa_attention``: flash kernel, no mask, no K/V copy per query head); this
    one-layer term (most likely a contiguous copy of the layer's cache view for an attention kernel) is what
    makes the plan match the measured peaks: within 1.2% at 16K-128K tokens on an H100
    (benchmarks/results/long_context.json).

    transformers' own SDPA path would add a ``[chunk, context]`` mask and K/V repeated from the 2 KV heads to
    all 32 query heads: measured on an H100, nf4 with 2048-token chunks OOMed at 96K tokens on a 12 GiB cap
    because of that 1.5 GiB copy, which is why chunked prefill uses ``gqa_attention``.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> chunked_prefill_bytes(glm4_9b_chat_config(), 98304) // 2**20
    96
    """
    e = torch.tensor([], dtype=_dtype(dtype)).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * batch_size * config.num_key_value_heads * context_len * head_dim * e


def input_bytes(tokens: int, batch_size: int = 1) -> int:
    """Input ids, attention mask and position ids (int64) on the first device."""
    return 3 * 8 * tokens * batch_size


def logits_bytes(config: Any, batch_size: int = 1, logits_tokens: int = 1, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Logits on the ``lm_head`` device: ``[b, tokens, vocab]`` in ``dtype``, its fp32 copy and two
    fp32 work copies of the sampling step. ``generate()`` keeps only the last position (``logits_tokens=1``);
    a plain forward over a prompt (perplexity) keeps them all.
    """
    e = torch.tensor([], dtype=_dtype(dtype)).element_size()
    return batch_size * logits_tokens * config.vocab_size * e + 3 * batch_size * config.vocab_size * 4


@dataclass
class DevicePlan:
    """One device's share: weights, KV cache, activations, CUDA context, total vs budget (bytes)."""

    device: int | str
    weights: int
    kv_cache: int
    activations: int
    cuda_context: int
    budget: int
    layers: int = 0
    allocator: int = 0  # PyTorch's caching-allocator slack (reserved but not in use at the peak)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.allocator + self.cuda_context

    @property
    def headroom(self) -> int:
        return self.budget - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    @property
    def name(self) -> str:
        return f"cuda:{self.device}" if isinstance(self.device, int) else str(self.device)


@dataclass(repr=False)
class MemoryPlan:
    """Per-device memory plan for loading a model and generating; renders as a table.

    ``fits`` is True when every device's total stays within its budget; ``advice()`` says what to
    change when it does not.
    """

    devices: list[DevicePlan]
    context_len: int
    batch_size: int
    dtype: str
    quantization: str | None
    device_map: dict[str, Any] = field(repr=False, default_factory=dict)
    # What produced the plan, so advice() can try the alternatives (not part of the result).
    inputs: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    problems: list[str] = field(default_factory=list)  # limits other than memory (e.g. int8 kernel sizes)

    @property
    def fits(self) -> bool:
        return not self.problems and all(d.fits for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def device(self, device: int | str) -> DevicePlan:
        return next(d for d in self.devices if d.device == device)

    def rows(self) -> list[list[str]]:
        def g(n: int) -> str:
            return "-" if abs(n) >= UNBOUNDED // 2 else f"{n / GiB:.2f}"

        return [
            [d.name, str(d.layers), g(d.weights), g(d.kv_cache), g(d.activations), g(d.allocator),
             g(d.cuda_context), g(d.total), g(d.budget), g(d.headroom), "yes" if d.fits else "NO"]
            for d in self.devices
        ]

    HEADERS = ["device", "layers", "weights GiB", "KV cache GiB", "activations GiB", "allocator GiB",
               "CUDA ctx GiB", "total GiB", "budget GiB", "headroom GiB", "fits"]

    def title(self) -> str:
        q = self.quantization or self.dtype
        return f"{q}, batch {self.batch_size}, context {self.context_len} tokens: " + (
            "fits" if self.fits else "does NOT fit"
        )

    def __repr__(self) -> str:
        notes = "".join(f"\n! {p}" for p in self.problems)
        return self.title() + "\n" + text_table(self.HEADERS, self.rows()) + notes

    def _repr_html_(self) -> str:
        notes = "".join(f"<p><b>! {p}</b></p>" for p in self.problems)
        return html_table(self.HEADERS, self.rows(), caption=self.title()) + notes

    def advice(self) -> str:
        """Why it does not fit (which device, by how much, what fills it) and the cheapest fix."""
        return explain_plan(self)


def _kv_dtype(dtype: torch.dtype, quantization: str | None) -> torch.dtype:
    # bitsandbytes models compute (and cache K/V) in the compute dtype: bf16 unless fp16 was asked.
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def plan_memory(
    config_or_model: Any,
    devices: Mapping[Any, Any] | Sequence[Any] | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    quantization: str | None = None,
    batch_size: int = 1,
    context_len: int = 4096,
    device_map: Mapping[str, Any] | None = None,
    prefill_chunk: int | None = None,
    logits_tokens: int = 1,
    cuda_context: int | str = DEFAULT_CUDA_CONTEXT,
    expandable_segments: bool | None = None,
) -> MemoryPlan:
    """Plan weights + KV cache + activations + CUDA context per device for generating ``context_len`` tokens.

    Args:
        config_or_model: a config (planned on the meta device: instant, no memory) or a loaded model.
        devices: budgets, ``max_memory`` style: ``["12GiB", "12GiB"]`` or ``{0: "12GiB", "cpu": "64GiB"}``.
        dtype: weight dtype (compute dtype for quantized models).
        quantization: ``None``, ``"int8"``, ``"nf4"``, ``"fp4"``, ``"nf4-dq"``, ``"fp4-dq"``.
        batch_size: sequences generated together.
        context_len: prompt + generated tokens per sequence.
        device_map: where each module goes; default: everything on the only device, or glmkit's
            KV-aware map over several.
        prefill_chunk: prefill in chunks of this many tokens (activations scale with the chunk).
        logits_tokens: positions whose logits are kept (``generate()``: 1).
        cuda_context: per-GPU memory outside PyTorch's allocator.
        expandable_segments: whether PyTorch's allocator runs with ``expandable_segments:True``
            (less slack); ``None`` reads ``PYTORCH_CUDA_ALLOC_CONF``.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> plan = plan_memory(glm4_9b_chat_config(), ["12GiB", "12GiB"], context_len=8192)
    >>> plan.fits, [d.layers for d in plan.devices]
    (True, [20, 20])
    """
    if batch_size < 1 or context_len < 1:
        raise PlanningError(f"batch_size and context_len must be at least 1 (got {batch_size}, {context_len}).")
    model = as_model(config_or_model)
    quantization = _check_quantization(quantization)
    dtype = _dtype(dtype)
    budgets = normalize_devices(devices)
    ctx_bytes = parse_size(cuda_context) if cuda_context else 0
    if device_map is None:
        if len(budgets) == 1:
            device_map = {"": next(iter(budgets))}
        else:
            from glmkit.device_map import kv_aware_device_map

            try:
                device_map = kv_aware_device_map(
                    model, budgets, context_len=context_len, batch_size=batch_size, dtype=dtype,
                    quantization=quantization, prefill_chunk=prefill_chunk, cuda_context=ctx_bytes,
                    expandable_segments=expandable_segments,
                )
            except DeviceMapError:
                from glmkit.device_map import even_split, split_layers

                gpus = list(budgets)
                device_map = split_layers(model, even_split(len(model_units(model).layers), len(gpus)), gpus)
        given_map = False
    else:
        check_device_map(model, device_map)
        given_map = True
    c = costs(model, dtype=dtype, quantization=quantization, batch_size=batch_size, context_len=context_len,
              prefill_chunk=prefill_chunk, logits_tokens=logits_tokens, cuda_context=ctx_bytes,
              expandable_segments=expandable_segments)
    plan = _plan(model, budgets, dict(device_map), c, dtype, quantization, batch_size, context_len)
    plan.inputs = dict(model=model, devices=budgets, given_map=given_map, dtype=dtype, batch_size=batch_size,
                       prefill_chunk=prefill_chunk, logits_tokens=logits_tokens, cuda_context=ctx_bytes,
                       expandable_segments=expandable_segments)
    return plan


@dataclass
class Costs:
    """Everything a device pays, before placement: per-unit weights, per-layer KV cache, and the
    transients of a device that runs layers (activations, allocator slack), holds the inputs, or ``lm_head``."""

    weights: dict[str, int]
    kv_per_layer: int
    activations: int
    allocator: int
    inputs: int
    logits: int
    cuda_context: int
    problems: list[str]


def costs(model: nn.Module, *, dtype: torch.dtype | str = torch.bfloat16, quantization: str | None = None,
          batch_size: int = 1, context_len: int = 4096, prefill_chunk: int | None = None, logits_tokens: int = 1,
          cuda_context: int = DEFAULT_CUDA_CONTEXT, expandable_segments: bool | None = None) -> Costs:
    """The cost model shared by ``plan_memory`` and ``glmkit.device_map.kv_aware_device_map``."""
    config = model.config
    dtype = _dtype(dtype)
    quantization = _check_quantization(quantization)
    kv_dtype = _kv_dtype(dtype, quantization)
    chunk = min(prefill_chunk or context_len, context_len)
    act = layer_activation_bytes(config, chunk, batch_size, kv_dtype, quantization)
    if chunk < context_len:
        act += chunked_prefill_bytes(config, context_len, batch_size, kv_dtype)
    problems = []
    if quantization == "int8" and batch_size * chunk * 2 * config.intermediate_size > INT8_MAX_ELEMENTS:
        longest = INT8_MAX_ELEMENTS // (2 * config.intermediate_size * batch_size)
        problems.append(
            f"int8: one forward over {batch_size} x {chunk} tokens exceeds bitsandbytes' 2**31-element limit "
            f"(at most {longest} tokens per sequence at batch {batch_size}): prefill in chunks (prefill_chunk=...)"
        )
    return Costs(
        weights=dict(_unit_weight_bytes(model, dtype, quantization)),
        kv_per_layer=kv_cache_bytes_per_token(config, kv_dtype) * context_len * batch_size,
        activations=act,
        allocator=allocator_slack(config, chunk, batch_size, kv_dtype, quantization, expandable_segments),
        inputs=input_bytes(chunk, batch_size),
        logits=logits_bytes(config, batch_size, logits_tokens, kv_dtype),
        cuda_context=cuda_context,
        problems=problems,
    )


def _plan(model: nn.Module, budgets: dict[int | str, int], device_map: dict[str, Any], c: Costs,
          dtype: torch.dtype, quantization: str | None, batch_size: int, context_len: int) -> MemoryPlan:
    units = model_units(model)
    placement = {u: _device_of(u, device_map) for u in units.all}
    budgets = dict(budgets)
    for offload in ("cpu", "disk"):  # offload targets without a budget count as unbounded
        if offload in map(_norm_device, placement.values()):
            budgets.setdefault(offload, UNBOUNDED)
    unknown = {d for d in placement.values() if _norm_device(d) not in budgets}
    if unknown:
        raise PlanningError(
            f"The device map uses {sorted(map(str, unknown))}, which have no budget in devices={list(budgets)}: "
            "give every device it uses a budget."
        )
    first = _norm_device(placement[units.all[0]])
    out_layer = _output_layer_name(model)
    lm_device = _norm_device(placement.get(out_layer, placement[units.all[-1]]))
    plans = []
    for device, budget in budgets.items():
        mine = [u for u in units.all if _norm_device(placement[u]) == device]
        n_layers = sum(u in units.layers for u in mine)
        on_gpu = isinstance(device, int)
        act = (c.activations if n_layers else 0) + (c.inputs if device == first else 0) + (
            c.logits if device == lm_device else 0)
        plans.append(DevicePlan(
            device=device,
            weights=sum(c.weights[u] for u in mine),
            kv_cache=c.kv_per_layer * n_layers,
            activations=act if mine else 0,
            allocator=c.allocator if n_layers and on_gpu else 0,
            cuda_context=c.cuda_context if on_gpu and mine else 0,
            budget=budget,
            layers=n_layers,
        ))
    return MemoryPlan(plans, context_len, batch_size, str(dtype).replace("torch.", ""), quantization, device_map,
                      problems=list(c.problems))


def _norm_device(device: Any) -> int | str:
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, str) and device.startswith("cuda"):
        return int(device.split(":")[1]) if ":" in device else 0
    return device


def _device_of(unit: str, device_map: Mapping[str, Any]) -> Any:
    name = unit
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise DeviceMapError(f"'{unit}' is not in the device map.")
        name = name.rsplit(".", 1)[0] if "." in name else ""


def max_context(
    config_or_model: Any,
    devices: Mapping[Any, Any] | Sequence[Any] | None = None,
    *,
    batch_size: int = 1,
    **plan_kwargs: Any,
) -> int:
    """Longest context (prompt + new tokens, per sequence) that fits, by bisection over ``plan_memory``.

    Returns 0 when even one token does not fit; never more than the model's ``max_position_embeddings``.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> max_context(glm4_9b_chat_config(), ["12GiB"]), max_context(glm4_9b_chat_config(), ["12GiB"], quantization="nf4") > 16384
    (0, True)
    """
    model = as_model(config_or_model)
    limit = int(getattr(model.config, "max_position_embeddings", 131072))

    def fits(n: int) -> bool:
        return plan_memory(model, devices, batch_size=batch_size, context_len=n, **plan_kwargs).fits

    if not fits(1):
        return 0
    if fits(limit):
        return limit
    lo, hi = 1, limit  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class SetupOption:
    """One way to run the model: how many cards, which precision, whether it fits, longest context."""

    cards: int
    quantization: str
    fits: bool
    max_context: int
    weights_per_card: float  # GiB, largest card share


@dataclass(repr=False)
class SetupOptions:
    """Options from cheapest (fewest cards, then least quantization) to dearest; renders as a table."""

    card_budget: int
    context_len: int
    batch_size: int
    options: list[SetupOption]

    @property
    def cheapest(self) -> SetupOption | None:
        return next((o for o in self.options if o.fits), None)

    def rows(self) -> list[list[str]]:
        return [[str(o.cards), o.quantization, "yes" if o.fits else "no", str(o.max_context),
                 f"{o.weights_per_card:.2f}"] for o in self.options]

    HEADERS = ["cards", "precision", "fits", "max context (tokens)", "weights per card GiB"]

    def title(self) -> str:
        c = self.cheapest
        best = f"cheapest: {c.cards} card(s), {c.quantization}" if c else "nothing fits"
        return f"{gib(self.card_budget)} cards, context {self.context_len}, batch {self.batch_size}: {best}"

    def __repr__(self) -> str:
        return self.title() + "\n" + text_table(self.HEADERS, self.rows())

    def _repr_html_(self) -> str:
        return html_table(self.HEADERS, self.rows(), caption=self.title())


def cheapest_setup(
    config_or_model: Any,
    card: int | str = "12GiB",
    *,
    max_cards: int = 4,
    context_len: int = 8192,
    batch_size: int = 1,
    precisions: Sequence[str | None] = (None, "int8", "nf4"),
    dtype: torch.dtype | str = torch.bfloat16,
) -> SetupOptions:
    """Smallest number of identical cards and least lossy precision that fit ``context_len`` tokens.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> best = cheapest_setup(glm4_9b_chat_config(), "12GiB", context_len=8192).cheapest
    >>> best.cards, best.quantization
    (1, 'nf4')
    """
    model = as_model(config_or_model)
    budget = parse_size(card)
    options = []
    for cards in range(1, max_cards + 1):
        for q in precisions:
            devices = [budget] * cards
            kw = dict(dtype=dtype, quantization=q, batch_size=batch_size)
            plan = plan_memory(model, devices, context_len=context_len, **kw)
            options.append(SetupOption(
                cards, q or str(_dtype(dtype)).replace("torch.", ""), plan.fits,
                max_context(model, devices, **kw), max(d.weights for d in plan.devices) / GiB,
            ))
    # Cheapest first: fewer cards, then less lossy precision (the order given).
    return SetupOptions(budget, context_len, batch_size, options)


def explain_plan(plan: MemoryPlan) -> str:
    """Plain-words diagnosis of a plan: the device that overflows, by how much, what fills it, the fixes.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> print(explain_plan(plan_memory(glm4_9b_chat_config(), ["12GiB"], context_len=8192)))  # doctest: +ELLIPSIS
    cuda:0 needs ... GiB but has 12.00 GiB: ... GiB over. Weights 17.51 GiB, KV cache 0.31 GiB, ...
    Cheapest fixes, in order:
      - quantize to nf4 (quantization='nf4'): it fits; ...
    """
    if plan.fits:
        tightest = min(plan.devices, key=lambda d: d.headroom)
        return (f"Fits: every device stays within its budget; the tightest is {tightest.name} with "
                f"{gib(tightest.headroom)} to spare.")
    lines = list(plan.problems)
    for d in plan.devices:
        if d.fits:
            continue
        lines.append(
            f"{d.name} needs {gib(d.total)} but has {gib(d.budget)}: {gib(-d.headroom)} over. "
            f"Weights {gib(d.weights)}, KV cache {gib(d.kv_cache)}, activations {gib(d.activations)}, "
            f"allocator slack {gib(d.allocator)}, CUDA context {gib(d.cuda_context)}."
        )
    lines.append("Cheapest fixes, in order:")
    lines += [f"  - {fix}" for fix in _fixes(plan)]
    return "\n".join(lines)


def _fixes(plan: MemoryPlan) -> list[str]:
    """Alternatives that were *checked* to fit, cheapest first; the last two always work."""
    if not plan.inputs:
        return ["plan with glmkit.planning.plan_memory to get checked suggestions"]
    inp = dict(plan.inputs)
    model, devices, given_map = inp.pop("model"), inp.pop("devices"), inp.pop("given_map")
    base = dict(inp, quantization=plan.quantization, context_len=plan.context_len,
                device_map=plan.device_map if given_map else None)

    def fits(**change: Any) -> MemoryPlan | None:
        kwargs = {"devices": devices, **base, **change}
        try:
            alt = plan_memory(model, **kwargs)
        except (PlanningError, DeviceMapError):
            return None
        return alt if alt.fits else None

    fixes: list[str] = []
    gpus = {d: b for d, b in devices.items() if isinstance(d, int)}
    if given_map and len(gpus) > 1 and fits(device_map=None):
        fixes.append("use glmkit's KV-aware map (device_map=None here, or glmkit.device_map.kv_aware_device_map): "
                     "same cards, it fits")
    if not plan.inputs["prefill_chunk"] and fits(prefill_chunk=2048):
        fixes.append("prefill in chunks of 2048 tokens (prefill_chunk=2048): activations shrink to one chunk, it fits")
    longest = max_context(model, devices, **{k: v for k, v in base.items() if k != "context_len"})
    if longest:
        fixes.append(f"shorten the context to at most {longest} tokens (batch {plan.batch_size})")
    for q in ("int8", "nf4"):
        if QUANTIZATIONS.index(q) > QUANTIZATIONS.index(plan.quantization) and fits(quantization=q):
            fixes.append(f"quantize to {q} (quantization='{q}'): it fits; see notebooks/04_quantization.ipynb")
            break
    fixes.append("offload layers to the CPU (a 'cpu' budget in devices / max_memory): it fits, but every "
                 "token then crosses PCIe, many times slower")
    if gpus:
        card = max(gpus.values())
        more = next((n for n in range(len(gpus) + 1, 9)
                     if fits(devices=dict.fromkeys(range(n), card), device_map=None)), None)
        if more:
            fixes.append(f"{more} cards of {gib(card)} with glmkit's KV-aware map fit")
    return fixes
