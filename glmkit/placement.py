"""Placement strategies: which device holds each unit, from the cost model (``glmkit.costs``).

accelerate's strategies (``"auto"``, ``"balanced"``, ...) place weights only; glmkit's KV-aware map keeps room on
every card for its layers' KV cache, the prefill activations, the allocator's slack, the CUDA context, the inputs
and the logits. The manual split (``glmkit.device_map.split_layers``) needs no costs and lives with the structure.
Taught in ``notebooks/03_auto_maps.ipynb``.

>>> from glmkit.models import glm4_9b_chat_config
>>> dm = kv_aware_device_map(glm4_9b_chat_config(), ["12GiB", "12GiB"], context_len=8192)
>>> dm["model.embed_tokens"], dm["model.layers.19"], dm["model.layers.20"], dm["lm_head"]
(0, 0, 1, 1)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import CustomDtype, get_balanced_memory, infer_auto_device_map
from torch import nn

from glmkit.costs import DEFAULT_CUDA_CONTEXT, Workload, costs
from glmkit.device_map import DeviceMapError, as_model, model_units, no_split_classes, output_layer_name
from glmkit.vocabulary import OFFLOAD_DEVICES, STRATEGIES, normalize_devices


def accelerate_device_map(
    model_or_config: Any,
    max_memory: Mapping[Any, Any],
    strategy: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
) -> dict[str, Any]:
    """The map transformers would build for ``device_map=strategy`` (weights only), without loading.

    Mirrors ``from_pretrained``: ``get_balanced_memory`` for "auto"/"balanced"/"balanced_low_0",
    then ``infer_auto_device_map``. Works with no GPU (accelerate's "not available" notes are muted).
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"Unknown strategy '{strategy}': use one of {', '.join(STRATEGIES)}.")
    model = as_model(model_or_config)
    budgets = normalize_devices(max_memory)
    size_dtype: Any = dtype
    if quantization == "int8":
        size_dtype = torch.int8
    elif quantization:
        size_dtype = CustomDtype.INT4
    blocks = sorted(no_split_classes(model))
    logger = logging.getLogger("accelerate.utils.modeling")
    level, logger.level = logger.level, logging.ERROR
    try:
        if strategy != "sequential":
            budgets = get_balanced_memory(model, max_memory=budgets, no_split_module_classes=blocks,
                                          dtype=size_dtype, low_zero=strategy == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=blocks, dtype=size_dtype))
    finally:
        logger.level = level


def kv_aware_device_map(
    model_or_config: Any,
    max_memory: Mapping[Any, Any] | Sequence[Any],
    *,
    context_len: int = 4096,
    batch_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
    prefill_chunk: int | None = None,
    cuda_context: int | str | None = None,
    expandable_segments: bool | None = None,
    allocator: str | None = None,
    fast_decode: bool = False,
) -> dict[str, Any]:
    """glmkit's map: every GPU keeps room for its layers' KV cache, the prefill activations, the CUDA
    context, the inputs (first GPU) and the logits (last GPU); headroom is spread evenly. The knobs are
    ``glmkit.costs.Workload``'s (``fast_decode=True`` also keeps room for the fast decoder's buffers).

    It finds the smallest fill ratio ``u`` at which a front-to-back placement with budgets
    ``u * budget`` still fits, so no card is fuller than it must be. CPU/disk entries in
    ``max_memory`` are used only when the GPUs cannot hold everything (offload is slow).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> dm = kv_aware_device_map(glm4_9b_chat_config(), ["12GiB", "12GiB"], context_len=8192)
    >>> [sum(v == gpu for k, v in dm.items() if ".layers." in k) for gpu in (0, 1)]
    [20, 20]
    >>> dm["model.embed_tokens"], dm["lm_head"]  # 1.16 GiB each: embeddings first, output layer last
    (0, 1)
    """
    workload = Workload(context_len=context_len, batch_size=batch_size, dtype=dtype, quantization=quantization,
                        prefill_chunk=prefill_chunk, expandable_segments=expandable_segments, allocator=allocator,
                        fast_decode=fast_decode,
                        cuda_context=DEFAULT_CUDA_CONTEXT if cuda_context is None else cuda_context)
    return kv_aware_map(as_model(model_or_config), normalize_devices(max_memory), workload)


def kv_aware_map(model: nn.Module, budgets: dict[int | str, int], workload: Workload) -> dict[str, Any]:
    """``kv_aware_device_map`` for a built model, normalized budgets and a ``Workload`` (what ``plan_memory`` calls)."""
    units = model_units(model)
    c = costs(model, workload)
    out_layer = output_layer_name(model)
    per_layer = c.kv_per_layer + c.fast_per_layer
    cost = {u: c.weights[u] + (per_layer if u in units.layers else 0) for u in units.all}
    ctx, act, inputs, logits = c.cuda_context, c.activations, c.inputs, c.logits + c.fast_logits

    def overhead(device: Any, placed: list[str]) -> int:
        gpu, has_layers = isinstance(device, int), any(u in units.layers for u in placed)
        return ((ctx if gpu else 0) + (act + (c.allocator if gpu else 0) if has_layers else 0)
                + (inputs if units.all[0] in placed else 0) + (logits if out_layer in placed else 0)
                + (c.fast_stage if placed else 0))

    def place(devices: list[Any], caps: dict[Any, float]) -> dict[str, Any] | None:
        """Front-to-back fill: each device takes units while its total stays under its cap."""
        result: dict[str, Any] = {}
        todo = list(units.all)
        for device in devices:
            placed: list[str] = []
            while todo and sum(cost[u] for u in placed + todo[:1]) + overhead(device, placed + todo[:1]) <= caps[device]:
                placed.append(todo.pop(0))
            result.update(dict.fromkeys(placed, device))
        return None if todo else result

    gpus = [d for d in budgets if isinstance(d, int)]
    if gpus and place(gpus, {d: budgets[d] for d in gpus}) is not None:
        lo, hi = 0.0, 1.0  # place fails at lo, works at hi
        for _ in range(40):
            mid = (lo + hi) / 2
            ok = place(gpus, {d: mid * budgets[d] for d in gpus}) is not None
            lo, hi = (lo, mid) if ok else (mid, hi)
        return place(gpus, {d: hi * budgets[d] for d in gpus})  # type: ignore[return-value]
    everything = gpus + [d for d in OFFLOAD_DEVICES if d in budgets]
    result = place(everything, {d: float(budgets[d]) for d in everything})
    if result is None:
        total = sum(cost.values()) + act + inputs + logits
        raise DeviceMapError(
            f"The model does not fit these devices at context {workload.context_len}, batch {workload.batch_size}: "
            f"it needs at least {total / 2**30:.2f} GiB plus {ctx / 2**30:.2f} GiB CUDA context per GPU, the budgets add up to "
            f"{sum(budgets.values()) / 2**30:.2f} GiB. Quantize (quantization='nf4'), shorten the context, add a "
            "card, or allow CPU offload with a 'cpu' budget."
        )
    return result


