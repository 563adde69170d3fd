"""The cost model: bytes each unit of a model and each piece of a workload needs on a card, before placement.

Weights per device-map unit (embeddings, each decoder layer, norm, ``lm_head``, quantized or not), the KV cache per
layer, the prefill activations, the caching allocator's slack, inputs, logits and the CUDA context. A ``Workload``
holds every knob these depend on (context, batch, precision, prefill chunk, allocator...), so the placement
strategies (``glmkit.placement``) and the plan (``glmkit.planning``) pay the same costs. Pure arithmetic on
shapes read from the config on the meta device. Introduced in ``notebooks/01_single_gpu_oom.ipynb``.

>>> from glmkit.models import glm4_9b_chat_config
>>> c = costs(as_model(glm4_9b_chat_config()), Workload(context_len=8192))
>>> c.kv_per_layer // 2**20, round(sum(c.weights.values()) / 2**30, 2)  # MiB per layer at 8K, GiB of weights
(8, 17.51)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from glmkit.device_map import as_model, model_units, output_layer_name
from glmkit.vocabulary import (
    ALLOC_CONF_ENV,
    ALLOCATORS,
    EXPANDABLE_SEGMENTS,
    SET_BY_GLMKIT_ENV,
    MiB,
    PlanningError,
    element_size,
    expandable_in,
    head_dim,
    kv_heads,
    parse_size,
    quantization_name,
    torch_dtype,
)

# Memory a process holds on each GPU outside PyTorch's allocator: the CUDA context, kernels, cuBLAS
# handles (NVML's per-process figure minus torch.cuda.memory_reserved()). Measured 0.68 GiB (bf16, nf4)
# and 0.76 GiB (int8) on an H100 with CUDA 13 (benchmarks/results/planner_accuracy.json); smaller cards
# and older CUDA versions use less.
DEFAULT_CUDA_CONTEXT = 720 * MiB
# bitsandbytes' int8 kernels index with 32-bit integers: one forward may not produce more than
# 2**31 - 1 elements per matrix (seen on an H100: "Error invalid argument ... ops.cu" at 4 x 32K tokens).
INT8_MAX_ELEMENTS = 2**31 - 1


def resolve_allocator(allocator: str | None = None, expandable_segments: bool | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The allocator a plan assumes, ``"expandable"`` or ``"default"``, and why (the plan prints both).

    Asked for (``allocator=`` or ``expandable_segments=``) wins; else ``PYTORCH_CUDA_ALLOC_CONF`` from the environment,
    as PyTorch reads it; else ``"expandable"``: glmkit sets ``expandable_segments:True`` in every process it starts
    (notebooks, ``glmkit serve``, ``load_model``, the benchmarks) unless the environment already chose.

    >>> resolve_allocator(environ={})
    ('expandable', 'glmkit sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in every process it starts')
    >>> resolve_allocator(environ={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    ('default', 'PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 in the environment')

    ``GLMKIT_SET_ALLOC_CONF`` marks the setting as glmkit's own (``glmkit.env.use_expandable_segments``), not the user's.
    """
    if allocator is not None:
        mode = allocator.lower().replace("expandable_segments", "expandable")
        if mode not in ALLOCATORS:
            raise PlanningError(f"Unknown allocator {allocator!r}: use 'expandable' (expandable_segments:True, "
                                "glmkit's default) or 'default' (PyTorch's default).")
        return mode, "asked for"
    if expandable_segments is not None:
        return ("expandable" if expandable_segments else "default"), "asked for"
    environ = os.environ if environ is None else environ
    conf = environ.get(ALLOC_CONF_ENV)
    if conf == EXPANDABLE_SEGMENTS and environ.get(SET_BY_GLMKIT_ENV):
        conf = None  # glmkit's own setting, made by this process or the one that started it
    if conf is not None:
        return ("expandable" if expandable_in(conf) else "default"), f"{ALLOC_CONF_ENV}={conf} in the environment"
    return "expandable", f"glmkit sets {ALLOC_CONF_ENV}={EXPANDABLE_SEGMENTS} in every process it starts"


@dataclass(frozen=True)
class Workload:
    """Every planning knob in one place: what runs on the cards besides the weights.

    Args:
        context_len: prompt + generated tokens per sequence.
        batch_size: sequences generated together.
        dtype: weight dtype (compute dtype for quantized models); ``"bfloat16"`` works too.
        quantization: ``None``, ``"int8"``, ``"nf4"``, ``"fp4"``, ``"nf4-dq"``, ``"fp4-dq"``.
        prefill_chunk: prefill in chunks of this many tokens (activations scale with the chunk).
        logits_tokens: positions whose logits are kept (``generate()``: 1).
        cuda_context: per-GPU memory outside PyTorch's allocator (bytes or ``"1GiB"``).
        allocator: PyTorch's caching allocator the run uses: ``"expandable"`` (``expandable_segments:True``, less
            slack) or ``"default"``. ``None``: ``PYTORCH_CUDA_ALLOC_CONF`` when the environment sets it, else
            ``"expandable"``, which glmkit sets in every process it starts (``glmkit.env.use_expandable_segments``).
        expandable_segments: the same choice as a bool (``True`` = ``"expandable"``), as older code passes it.
        fast_decode: decode with ``glmkit.fast_decode.FastDecoder``: a fused copy of each layer's q/k/v weights
            and an fp32 logits buffer on top (its static cache is the KV cache already counted).

    >>> w = Workload(context_len=8192, quantization="NF4", allocator="default")
    >>> w.quantization, w.replace(batch_size=4).batch_size, w.allocator_mode, w.allocator_source
    ('nf4', 4, 'default', 'asked for')
    """

    context_len: int = 4096
    batch_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None
    prefill_chunk: int | None = None
    logits_tokens: int = 1
    cuda_context: int = DEFAULT_CUDA_CONTEXT
    expandable_segments: bool | None = None
    allocator: str | None = None
    fast_decode: bool = False
    # resolved from allocator / expandable_segments / the environment when the workload is made
    allocator_mode: str = field(init=False, default="expandable")
    allocator_source: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.context_len < 1:
            raise PlanningError(
                f"batch_size and context_len must be at least 1 (got {self.batch_size}, {self.context_len}).")
        object.__setattr__(self, "quantization", quantization_name(self.quantization))
        object.__setattr__(self, "dtype", torch_dtype(self.dtype))
        object.__setattr__(self, "cuda_context", parse_size(self.cuda_context) if self.cuda_context else 0)
        mode, source = resolve_allocator(self.allocator, self.expandable_segments)
        object.__setattr__(self, "allocator_mode", mode)
        object.__setattr__(self, "allocator_source", source)

    @property
    def expandable(self) -> bool:
        """Whether the allocator planned for runs with ``expandable_segments``."""
        return self.allocator_mode == "expandable"

    def replace(self, **changes: Any) -> Workload:
        """A copy with some knobs changed."""
        return dataclasses.replace(self, **changes)

    @property
    def chunk(self) -> int:
        """Tokens per sequence one prefill forward processes."""
        return min(self.prefill_chunk or self.context_len, self.context_len)

    @property
    def kv_dtype(self) -> torch.dtype:
        """dtype of the KV cache and the activations."""
        return _kv_dtype(self.dtype, self.quantization)


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
    return dict(_unit_weight_bytes(model, torch_dtype(dtype), quantization_name(quantization)))


@lru_cache(maxsize=64)
def _unit_weight_bytes(model: nn.Module, dtype: torch.dtype, quantization: str | None) -> tuple[tuple[str, int], ...]:
    units = model_units(model).all
    skip = output_layer_name(model)
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
    return 2 * kv_heads(config) * head_dim(config) * element_size(dtype)


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
    e = element_size(dtype)
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

    - default allocator: each segment is cut to one request's size, and a freed block is reused by smaller
      requests (the next layer's KV cache among them), so a later ``gate_up`` output no longer fits in what is
      cached and a new segment is reserved beside it. Everything scales with the tokens, so the slack does too,
      but its ratio to ``G`` depends on which freed block each request happens to land in: measured 1.26-1.38 G
      at 8K-32K tokens and 0.82 G at 64K and 128K (bf16), 0.64-1.34 G in 4 bit (beyond ``W``), with no trend
      in the context. ``benchmarks/allocator_replay.py`` replays the prefill's requests through the allocator's
      rules: the first layer reserves a segment per temporary, then one more ``[b, s, inter]`` segment (``G / 2``)
      each time the KV cache has taken too much of the freed ones; at 64K and 128K that happens once, and the
      replay gives the measured 0.82 G. The planner takes about one extra ``G``: ``1.04 G`` (plus ``W``, or ``3.5 W`` for int8),
      the value with the smallest worst error on the 16 H100 cases of
      ``planner_accuracy_default_allocator.json`` (2K-32K tokens, batch 1 and 4: within 4.4%), checked on
      runs kept aside, batch 1 at 64K and 128K tokens on an H200 (``planner_accuracy_long_default.json``:
      +2.2%, +3.2%). The ratio's spread (about ±0.4 G) stays within 5% of the total at these sizes;
      int8 with this allocator was not measured;
    - ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (glmkit's notebooks and CLI set it):
      segments grow in place: ``0.2 G`` (16 bit), ``W + 0.35 G`` (4 bit), ``3.5 W + 0.7 G`` (int8); checked at 64K
      and 128K tokens on an H200 (``planner_accuracy_long_expandable.json``: +0.2%, +0.4%).

    ``expandable_segments=None`` assumes what ``resolve_allocator`` says: the environment's setting, else glmkit's.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> c = glm4_9b_chat_config()
    >>> allocator_slack(c, 32768, expandable_segments=True) < allocator_slack(c, 32768, expandable_segments=False)
    True
    """
    if expandable_segments is None:
        expandable_segments = resolve_allocator()[0] == "expandable"
    e = element_size(dtype)
    g = e * 2 * config.intermediate_size * tokens * batch_size
    w = e * 2 * config.intermediate_size * config.hidden_size
    fixed = {None: 0, "int8": 7 * w // 2}.get(quantization, w)
    if not expandable_segments:
        return fixed + 26 * g // 25
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
    e = element_size(dtype)
    return 2 * batch_size * kv_heads(config) * context_len * head_dim(config) * e


def input_bytes(tokens: int, batch_size: int = 1) -> int:
    """Input ids, attention mask and position ids (int64) on the first device."""
    return 3 * 8 * tokens * batch_size


def logits_bytes(config: Any, batch_size: int = 1, logits_tokens: int = 1, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Logits on the ``lm_head`` device: ``[b, tokens, vocab]`` in ``dtype``, its fp32 copy and two
    fp32 work copies of the sampling step. ``generate()`` keeps only the last position (``logits_tokens=1``);
    a plain forward over a prompt (perplexity) keeps them all.
    """
    e = element_size(dtype)
    return batch_size * logits_tokens * config.vocab_size * e + 3 * batch_size * config.vocab_size * 4


def dequantized_gate_up_bytes(config: Any, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """The ``gate_up`` weight in 16 bit, ``2 * inter x hidden``: what bitsandbytes' ``matmul_4bit`` makes of a 4-bit
    one to multiply more than one token (dequantize, then one GEMM), for the duration of that product.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> round(dequantized_gate_up_bytes(glm4_9b_chat_config()) / 2**30, 3)  # GiB
    0.209
    """
    return element_size(dtype) * 2 * config.intermediate_size * config.hidden_size


def fast_decode_buffers_bytes(config: Any, context_len: int, batch_size: int = 1,
                              dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of ``glmkit.fast_decode.FastDecoder``'s own buffers beyond the KV cache on one device: the fp32 logits
    ``[b, vocab]`` (lm_head's device only), the rotary ``cos``/``sin`` tables ``[context, rotary_dim]`` and the
    positions ``[context]`` (int64) it indexes them with, and the hidden state in and out ``4 x [b, hidden]`` (these
    on every device of a split). Measured on an H200 for GLM-4-9B in nf4 at a
    32,832-token cache: the decoder held 41 MiB beyond its KV cache, of which 32 MiB is cuBLAS' workspace (which
    ``generate()`` holds too) and the rest these.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> round(fast_decode_buffers_bytes(glm4_9b_chat_config(), 32832) / 2**20, 1)  # MiB
    8.9
    """
    e = element_size(dtype)
    rope = getattr(config, "rope_parameters", None) or {}
    rotary = int(head_dim(config) * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return (batch_size * config.vocab_size * 4 + context_len * (2 * rotary * e + 8)
            + 4 * batch_size * config.hidden_size * e)


def fused_qkv_bytes(config: Any, dtype: torch.dtype | str = torch.bfloat16, quantization: str | None = None) -> int:
    """Bytes of the fused q/k/v weight (and bias) ``glmkit.fast_decode.FastDecoder`` keeps per layer, beside the
    model's own q/k/v: ``(heads + 2 * kv_heads) * head_dim`` rows of ``hidden``, in the weights' dtype. A 4-bit
    model's decoder reads the packed weights in place: no copy (taken as 0 here).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> round(fused_qkv_bytes(glm4_9b_chat_config()) * 40 / 2**30, 2)  # GLM-4-9B, bf16, all 40 layers
    1.41
    """
    if quantization is not None:
        return 0
    rows = (config.num_attention_heads + 2 * kv_heads(config)) * head_dim(config)
    bias = rows if getattr(config, "attention_bias", False) else 0
    return (rows * config.hidden_size + bias) * element_size(dtype)


# glmkit.gemv4bit's 4-bit launches as far as the planner needs them (the kernels sit a layer above the planner, which
# cannot import them; tests/test_gemv4bit.py checks these against the kernel module and what its launches allocate):
# the most rows the per-row kernel takes and the kernels take at all, and the tensor-core kernel's rows a program,
# the programs it aims for and the quantization blocks a loop step
ROW_KERNEL_ROWS, FOUR_BIT_KERNEL_ROWS = 2, 64
TC_BLOCK_N, TC_TARGET_PROGRAMS, TC_UNROLL = 64, 264, 2


def column_splits(blocks_per_row: int, row_blocks: int, target_programs: int = TC_TARGET_PROGRAMS,
                  unroll: int = TC_UNROLL) -> tuple[int, int, int]:
    """How glmkit's tensor-core 4-bit kernel splits a row's quantization blocks over programs so that its grid has
    about ``target_programs``: (splits, blocks per split, blocks a loop step).

    >>> column_splits(64, 428), column_splits(214, 64)  # GLM-4-9B's gate/up, and down_proj
    ((1, 64, 2), (4, 54, 2))
    """
    unroll = unroll if blocks_per_row % unroll == 0 else 1
    splits = max(1, min(blocks_per_row // unroll, round(target_programs / row_blocks)))
    per_split = math.ceil(math.ceil(blocks_per_row / splits) / unroll) * unroll
    return math.ceil(blocks_per_row / per_split), per_split, unroll


def tensor_core_workspace_bytes(weights: Sequence[tuple[int, int]], vectors: int, blocksize: int = 64) -> int:
    """Bytes of fp32 partial sums glmkit's tensor-core 4-bit kernel (more than ``ROW_KERNEL_ROWS`` rows)
    allocates while it multiplies ``vectors`` rows by the ``[n, k]`` weights of one launch (one weight, or q/k/v),
    before its second kernel sums them.

    >>> round(tensor_core_workspace_bytes([(27392, 4096)], 64) / 2**20, 1)  # GLM-4-9B's gate/up at 64 rows, MiB
    6.7
    >>> tensor_core_workspace_bytes([(4096, 4096), (256, 4096), (256, 4096)], 2)  # the per-row kernel: none
    0
    """
    if vectors <= ROW_KERNEL_ROWS:
        return 0
    row_blocks = sum(math.ceil(n / TC_BLOCK_N) for n, _ in weights)
    splits, _, _ = column_splits(weights[0][1] // blocksize, row_blocks)
    return splits * vectors * sum(n for n, _ in weights) * 4


def four_bit_workspace_bytes(config: Any, batch_size: int) -> int:
    """Bytes ``glmkit.fast_decode.FastDecoder`` allocates during a 4-bit decode step beside its buffers: the fp32
    partial sums of glmkit's tensor-core 4-bit kernel, which steps of more than ``ROW_KERNEL_ROWS`` rows use
    (on GPUs of compute capability 8.0+), for the largest projection of the step (freed before the next one runs).

    >>> from glmkit.models import glm4_9b_chat_config
    >>> round(four_bit_workspace_bytes(glm4_9b_chat_config(), 64) / 2**20, 1), four_bit_workspace_bytes(glm4_9b_chat_config(), 1)
    (6.7, 0)
    """
    hidden, hd, mlp = config.hidden_size, head_dim(config), config.intermediate_size
    heads, kv = config.num_attention_heads, kv_heads(config)
    launches = ([(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden)], [(hidden, heads * hd)],
                [(2 * mlp, hidden)], [(hidden, mlp)])
    if batch_size > FOUR_BIT_KERNEL_ROWS:  # bitsandbytes' dequantize-then-GEMM: counted with the activations
        return 0
    return max(tensor_core_workspace_bytes(w, batch_size) for w in launches)


def _kv_dtype(dtype: torch.dtype, quantization: str | None) -> torch.dtype:
    # bitsandbytes models compute (and cache K/V) in the compute dtype: bf16 unless fp16 was asked.
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


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
    fast_per_layer: int = 0  # FastDecoder's fused q/k/v copy, on each layer's device
    fast_logits: int = 0  # FastDecoder's fp32 logits, on the lm_head device
    fast_stage: int = 0  # FastDecoder's buffers on every device it runs a share on (rotary tables, positions, hidden)


def costs(model: nn.Module, workload: Workload) -> Costs:
    """What each unit and each kind of device pays for ``workload``: the cost model shared by
    ``glmkit.planning.plan_memory`` and ``glmkit.placement.kv_aware_device_map``."""
    config, w = model.config, workload
    kv_dtype, chunk, batch_size, quantization = w.kv_dtype, w.chunk, w.batch_size, w.quantization
    act = layer_activation_bytes(config, chunk, batch_size, kv_dtype, quantization)
    if chunk < w.context_len:
        act += chunked_prefill_bytes(config, w.context_len, batch_size, kv_dtype)
        if quantization not in (None, "int8"):  # a chunk's 4-bit gate_up is dequantized to 16 bit while it runs: alive at the
            # peak beside the small chunk's activations (GLM-4-9B nf4, 32K prompt in 256-token chunks, H200: 0.209
            # GiB of the 0.23 GiB in use beyond weights and cache), while the allocator holds about as much again
            # (allocator_slack's W), benchmarks/results/nf4_decode.json
            act += dequantized_gate_up_bytes(config, kv_dtype)
    problems = []
    if quantization == "int8" and batch_size * chunk * 2 * config.intermediate_size > INT8_MAX_ELEMENTS:
        longest = INT8_MAX_ELEMENTS // (2 * config.intermediate_size * batch_size)
        problems.append(
            f"int8: one forward over {batch_size} x {chunk} tokens exceeds bitsandbytes' 2**31-element limit "
            f"(at most {longest} tokens per sequence at batch {batch_size}): prefill in chunks (prefill_chunk=...)"
        )
    if w.fast_decode and quantization == "int8":
        problems.append("fast decode runs 16/32-bit and 4-bit weights, not int8: drop fast_decode or pick another precision")
    logits = batch_size * config.vocab_size * 4 if w.fast_decode else 0  # FastDecoder's fp32 logits
    return Costs(
        weights=dict(_unit_weight_bytes(model, w.dtype, quantization)),
        kv_per_layer=kv_cache_bytes_per_token(config, kv_dtype) * w.context_len * batch_size,
        activations=act,
        allocator=allocator_slack(config, chunk, batch_size, kv_dtype, quantization, w.expandable),
        inputs=input_bytes(chunk, batch_size),
        logits=logits_bytes(config, batch_size, w.logits_tokens, kv_dtype),
        cuda_context=w.cuda_context,
        problems=problems,
        fast_per_layer=fused_qkv_bytes(config, w.dtype, quantization) if w.fast_decode else 0,
        fast_logits=logits,
        fast_stage=fast_decode_buffers_bytes(config, w.context_len, batch_size, kv_dtype) - logits
        + (four_bit_workspace_bytes(config, batch_size) if quantization not in (None, "int8") else 0)
        if w.fast_decode else 0,
    )
