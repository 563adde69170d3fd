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

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from glmkit.costs import (  # noqa: F401  (the cost model's names stay importable from here, as notebooks use them)
    DEFAULT_CUDA_CONTEXT,
    INT8_MAX_ELEMENTS,
    Costs,
    Workload,
    allocator_slack,
    chunked_prefill_bytes,
    costs,
    input_bytes,
    kv_cache_bytes_per_token,
    layer_activation_bytes,
    logits_bytes,
    quantized_linear_bytes,
    unit_weight_bytes,
)
from glmkit.device_map import (
    DeviceMapError,
    as_model,
    check_device_map,
    even_split,
    model_units,
    output_layer_name,
    split_layers,
)
from glmkit.placement import STRATEGIES, accelerate_device_map, kv_aware_map
from glmkit.tables import gib, html_table, text_table
from glmkit.vocabulary import (  # noqa: F401  (parse_size, normalize_devices: public here since the first notebooks)
    OFFLOAD_DEVICES,
    QUANTIZATIONS,
    GiB,
    MiB,
    PlanningError,
    dtype_name,
    norm_device,
    normalize_devices,
    parse_size,
)

UNBOUNDED = 2**50  # budget of a 'cpu'/'disk' offload target that was given none


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
    fast_decode: int = 0  # FastDecoder's extra buffers: fused q/k/v copies, fp32 logits, 4-bit batch partial sums

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.allocator + self.cuda_context + self.fast_decode

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
    problems: list[str] = field(default_factory=list)  # limits other than memory (e.g. int8 kernel sizes)
    allocator: str = "expandable"  # the caching allocator assumed: "expandable" (expandable_segments) or "default"
    allocator_source: str = ""  # why that one (asked for, the environment, glmkit's default)
    fast_decode: bool = False  # planned for glmkit.fast_decode.FastDecoder
    # What produced the plan, so fixes() can try the alternatives (not part of the result).
    request: PlanRequest | None = field(repr=False, compare=False, default=None)

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

        fast = [[g(d.fast_decode)] if self.fast_decode else [] for d in self.devices]
        return [
            [d.name, str(d.layers), g(d.weights), g(d.kv_cache), g(d.activations), g(d.allocator),
             g(d.cuda_context), *extra, g(d.total), g(d.budget), g(d.headroom), "yes" if d.fits else "NO"]
            for d, extra in zip(self.devices, fast)
        ]

    HEADERS = ["device", "layers", "weights GiB", "KV cache GiB", "activations GiB", "allocator GiB",
               "CUDA ctx GiB", "total GiB", "budget GiB", "headroom GiB", "fits"]

    def headers(self) -> list[str]:
        """Column names; a fast-decode plan has a column for the decoder's extra buffers."""
        cut = self.HEADERS.index("total GiB")
        return self.HEADERS[:cut] + (["fast decode GiB"] if self.fast_decode else []) + self.HEADERS[cut:]

    def title(self) -> str:
        q = self.quantization or self.dtype
        how = ", fast decode" if self.fast_decode else ""
        return f"{q}, batch {self.batch_size}, context {self.context_len} tokens{how}: " + (
            "fits" if self.fits else "does NOT fit"
        )

    def allocator_note(self) -> str:
        """The allocator assumption, in words: the slack column depends on it."""
        name = "expandable_segments" if self.allocator == "expandable" else "PyTorch's default"
        other = "default" if self.allocator == "expandable" else "expandable"
        return (f"allocator: {name} ({self.allocator_source}); allocator='{other}' (glmkit plan --allocator "
                f"{other}) plans for the other")

    def __repr__(self) -> str:
        notes = "".join(f"\n! {p}" for p in self.problems)
        return self.title() + "\n" + text_table(self.headers(), self.rows()) + notes + "\n" + self.allocator_note()

    def _repr_html_(self) -> str:
        notes = "".join(f"<p><b>! {p}</b></p>" for p in self.problems)
        return (html_table(self.headers(), self.rows(), caption=self.title()) + notes
                + f"<p><small>{html.escape(self.allocator_note())}</small></p>")

    def advice(self) -> str:
        """Why it does not fit (which device, by how much, what fills it) and the cheapest fix."""
        return explain_plan(self)

    def fixes(self) -> list[str]:
        """Changes that were *checked* to fit, cheapest first (for a plan that does not fit); the last two always work.

        >>> from glmkit.models import glm4_9b_chat_config
        >>> plan_memory(glm4_9b_chat_config(), ["12GiB"], context_len=8192).fixes()[0]
        "quantize to nf4 (quantization='nf4'): it fits; see notebooks/04_quantization.ipynb"
        """
        return plan_fixes(self)


@dataclass(frozen=True)
class PlanRequest:
    """What a plan was asked for: the model, the budgets, the workload, and whether the device map was given."""

    model: nn.Module
    budgets: dict[int | str, int]
    workload: Workload
    given_map: bool


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
    allocator: str | None = None,
    fast_decode: bool = False,
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
            (less slack); ``None``: as ``allocator``.
        allocator: ``"expandable"`` or ``"default"``; ``None``: ``PYTORCH_CUDA_ALLOC_CONF`` when the environment
            sets it, else ``"expandable"`` (glmkit sets it in every process it starts). The plan says which.
        fast_decode: budget ``glmkit.fast_decode.FastDecoder``'s extra buffers (fused q/k/v copies, fp32 logits; a
            4-bit model's batch of 3-64 rows: the tensor-core kernel's partial sums, ``glmkit.costs.four_bit_workspace_bytes``).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> plan = plan_memory(glm4_9b_chat_config(), ["12GiB", "12GiB"], context_len=8192)
    >>> plan.fits, [d.layers for d in plan.devices]
    (True, [20, 20])
    """
    workload = Workload(context_len=context_len, batch_size=batch_size, dtype=dtype, quantization=quantization,
                        prefill_chunk=prefill_chunk, logits_tokens=logits_tokens, cuda_context=cuda_context,
                        expandable_segments=expandable_segments, allocator=allocator, fast_decode=fast_decode)
    return plan_workload(as_model(config_or_model), normalize_devices(devices), workload, device_map)


def plan_workload(model: nn.Module, budgets: dict[int | str, int], workload: Workload,
                  device_map: Mapping[str, Any] | None = None) -> MemoryPlan:
    """``plan_memory`` for a built model, normalized budgets and a ``Workload``: what the searches call."""
    given_map = device_map is not None
    if device_map is None:
        device_map = _default_map(model, budgets, workload)
    else:
        check_device_map(model, device_map)
    plan = _plan(model, budgets, dict(device_map), costs(model, workload), workload)
    plan.request = PlanRequest(model, budgets, workload, given_map)
    return plan


def _default_map(model: nn.Module, budgets: dict[int | str, int], workload: Workload) -> dict[str, Any]:
    """Everything on the only device; over several, glmkit's KV-aware map (an even split when nothing fits)."""
    if len(budgets) == 1:
        return {"": next(iter(budgets))}
    try:
        return kv_aware_map(model, budgets, workload.replace(logits_tokens=1))
    except DeviceMapError:
        gpus = list(budgets)
        return split_layers(model, even_split(len(model_units(model).layers), len(gpus)), gpus)


def _plan(model: nn.Module, budgets: dict[int | str, int], device_map: dict[str, Any], c: Costs,
          workload: Workload) -> MemoryPlan:
    units = model_units(model)
    placement = {u: _device_of(u, device_map) for u in units.all}
    budgets = dict(budgets)
    for offload in OFFLOAD_DEVICES:  # offload targets without a budget count as unbounded
        if offload in map(norm_device, placement.values()):
            budgets.setdefault(offload, UNBOUNDED)
    unknown = {d for d in placement.values() if norm_device(d) not in budgets}
    if unknown:
        raise PlanningError(
            f"The device map uses {sorted(map(str, unknown))}, which have no budget in devices={list(budgets)}: "
            "give every device it uses a budget."
        )
    first = norm_device(placement[units.all[0]])
    out_layer = output_layer_name(model)
    lm_device = norm_device(placement.get(out_layer, placement[units.all[-1]]))
    plans = []
    for device, budget in budgets.items():
        mine = [u for u in units.all if norm_device(placement[u]) == device]
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
            fast_decode=c.fast_per_layer * n_layers + (c.fast_stage if mine else 0)
            + (c.fast_logits if device == lm_device and mine else 0),
        ))
    return MemoryPlan(plans, workload.context_len, workload.batch_size, dtype_name(workload.dtype),
                      workload.quantization, device_map, problems=list(c.problems), allocator=workload.allocator_mode,
                      allocator_source=workload.allocator_source, fast_decode=workload.fast_decode)


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
    device_map = plan_kwargs.pop("device_map", None)
    workload = Workload(context_len=1, batch_size=batch_size, **plan_kwargs)
    return _longest(as_model(config_or_model), normalize_devices(devices), workload, device_map)


def _longest(model: nn.Module, budgets: dict[int | str, int], workload: Workload,
             device_map: Mapping[str, Any] | None) -> int:
    """``max_context`` for a built model, normalized budgets and a ``Workload`` (its ``context_len`` is ignored)."""
    limit = int(getattr(model.config, "max_position_embeddings", 131072))

    def fits(n: int) -> bool:
        return plan_workload(model, budgets, workload.replace(context_len=n), device_map).fits

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
    **knobs: Any,
) -> SetupOptions:
    """Smallest number of identical cards and least lossy precision that fit ``context_len`` tokens.

    ``knobs``: more of ``glmkit.costs.Workload``'s (``prefill_chunk``, ``allocator``, ``fast_decode``...).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> best = cheapest_setup(glm4_9b_chat_config(), "12GiB", context_len=8192).cheapest
    >>> best.cards, best.quantization
    (1, 'nf4')
    """
    model = as_model(config_or_model)
    budget = parse_size(card)
    options = []
    for cards in range(1, max_cards + 1):
        devices = normalize_devices([budget] * cards)
        for q in precisions:
            workload = Workload(context_len=context_len, batch_size=batch_size, dtype=dtype, quantization=q, **knobs)
            plan = plan_workload(model, devices, workload)
            options.append(SetupOption(
                cards, q or dtype_name(dtype), plan.fits,
                _longest(model, devices, workload, None), max(d.weights for d in plan.devices) / GiB,
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
            f"allocator slack {gib(d.allocator)}, CUDA context {gib(d.cuda_context)}"
            + (f", fast-decode buffers {gib(d.fast_decode)}." if plan.fast_decode else ".")
        )
    lines.append("Cheapest fixes, in order:")
    lines += [f"  - {fix}" for fix in plan.fixes()]
    return "\n".join(lines)


def plan_fixes(plan: MemoryPlan) -> list[str]:
    """Alternatives that were *checked* to fit, cheapest first; the last two always work (``MemoryPlan.fixes``)."""
    if plan.request is None:
        return ["plan with glmkit.planning.plan_memory to get checked suggestions"]
    model, devices, w = plan.request.model, plan.request.budgets, plan.request.workload
    given_map = plan.request.given_map
    same_map = plan.device_map if given_map else None

    def fits(devices: dict[int | str, int] = devices, device_map: Mapping[str, Any] | None = same_map,
             **change: Any) -> MemoryPlan | None:
        try:
            alt = plan_workload(model, devices, w.replace(**change), device_map)
        except (PlanningError, DeviceMapError):
            return None
        return alt if alt.fits else None

    fixes: list[str] = []
    gpus = {d: b for d, b in devices.items() if isinstance(d, int)}
    if given_map and len(gpus) > 1 and fits(device_map=None):
        fixes.append("use glmkit's KV-aware map (device_map=None here, or glmkit.placement.kv_aware_device_map): "
                     "same cards, it fits")
    if not w.prefill_chunk and fits(prefill_chunk=2048):
        fixes.append("prefill in chunks of 2048 tokens (prefill_chunk=2048): activations shrink to one chunk, it fits")
    longest = _longest(model, devices, w, same_map)
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


@dataclass(repr=False)
class MapComparison:
    """accelerate's strategies next to glmkit's KV-aware map for one set of budgets; renders as a table."""

    budgets: str
    context_len: int
    batch_size: int
    rows_: list[list[str]]

    HEADERS = ["strategy", "layers per GPU", "offloaded", "fits", "tightest GPU headroom GiB", "max context (tokens)"]

    def rows(self) -> list[list[str]]:
        return self.rows_

    def title(self) -> str:
        return f"{self.budgets}: context {self.context_len}, batch {self.batch_size}"

    def __repr__(self) -> str:
        return self.title() + "\n" + text_table(self.HEADERS, self.rows_)

    def _repr_html_(self) -> str:
        return html_table(self.HEADERS, self.rows_, caption=self.title())


def compare_device_maps(
    model_or_config: Any,
    max_memory: Mapping[Any, Any] | Sequence[Any],
    *,
    context_len: int = 8192,
    batch_size: int = 1,
    strategies: Sequence[str] = STRATEGIES,
    **plan_kwargs: Any,
) -> MapComparison:
    """Plan every accelerate strategy and glmkit's KV-aware map on the same budgets (``notebooks/03``).

    For each: decoder layers per device, modules offloaded to CPU/disk, whether generation at
    ``context_len`` fits, the tightest headroom, and the longest context that fits with that map.
    """
    model = as_model(model_or_config)
    budgets = normalize_devices(max_memory)
    workload = Workload(context_len=context_len, batch_size=batch_size, **plan_kwargs)
    rows = []
    maps: list[tuple[str, dict[str, Any] | None]] = []
    for strategy in strategies:
        maps.append((f'accelerate "{strategy}"', accelerate_device_map(model, budgets, strategy, **{
            k: v for k, v in plan_kwargs.items() if k in ("dtype", "quantization")})))
    try:
        maps.append(("glmkit KV-aware", kv_aware_map(model, budgets, workload.replace(logits_tokens=1))))
    except DeviceMapError:
        maps.append(("glmkit KV-aware", None))
    for label, dm in maps:
        if dm is None:
            rows.append([label, "-", "-", "no", "-", "0"])
            continue
        plan = plan_workload(model, budgets, workload, dm)
        gpu_layers = "/".join(str(d.layers) for d in plan.devices if isinstance(d.device, int))
        offloaded = sum(1 for u, d in dm.items() if d in OFFLOAD_DEVICES)
        tight = min(d.headroom for d in plan.devices if isinstance(d.device, int))
        longest = _longest(model, budgets, workload, dm)
        rows.append([label, gpu_layers, f"{offloaded} modules" if offloaded else "-",
                     "yes" if plan.fits else "NO", f"{tight / 2**30:.2f}", str(longest)])
    desc = " + ".join(gib(b) if isinstance(d, int) else f"{d} {gib(b)}" for d, b in budgets.items())
    return MapComparison(desc, context_len, batch_size, rows)
