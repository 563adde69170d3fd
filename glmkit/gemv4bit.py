"""4-bit matrix-vector products for decode tokens: Triton kernels that read bitsandbytes' packed weights as they are.

A 12 GB card holds GLM-4-9B only in 4 bits, where a token reads 6.6 GB of weights instead of 17.6. bitsandbytes'
own one-token kernel (``bnb.matmul_4bit``) reads those packed weights at 0.90-1.18 TB/s on an H200, alone in a CUDA
graph (``benchmarks/results/nf4_decode.json``'s projections): it saves memory, not time. These kernels read the
*same* tensors bitsandbytes keeps (no second copy), dequantize in registers and sum in fp32, one pass over each
weight; ``gemv_4bit_swiglu`` also applies GLM's MLP activation
(``up * silu(gate)``) before it writes, and ``gemv_4bit_multi`` reads q, k and v in one launch. ``FastDecoder``
uses them for a bitsandbytes nf4/fp4 model at batch 1 to ``FOUR_BIT_MAX_BATCH`` rows (``glmkit.fast_decode``). Up to
``ROW_KERNEL_MAX_VECTORS`` vectors, a program per vector and row block (below); more, a kernel that looks each weight
up once for all vectors, in x's 16-bit type, multiplies on the tensor cores and scales each block's sums in fp32
(``_tc4_kernel``: on an H200 GLM-4-9B in nf4 decodes 2.9x faster at batch 16 than through bitsandbytes'
dequantize-then-GEMM, ``benchmarks/results/nf4_batch.json``, notebook ``04_quantization.ipynb``). On GPUs, 2 to 8
vectors take a CUDA kernel instead that looks each byte up once straight into a tensor-core operand
(``glmkit.gemv4bit_mma``: 1.4-2.0x faster than these at those batches on an H200). Each is a
PyTorch operator (``torch.ops.glmkit.gemv_4bit``, ``gemv_4bit_multi``, ``gemv_4bit_swiglu``) that ``torch.compile``
calls without tracing into the kernel, so a compiled decoder layer fuses everything around them. ``FastDecoder``'s
one-sequence step runs its layer uncompiled instead (by default, with glmkit's decode attention), with the RMSNorms
and residual adds folded into the kernels (``gemv_4bit_residual`` hands the next ``gemv_4bit_normed`` a
``NormedStream``): a layer is four 4-bit launches and attention; only a segment's first layer makes its
``NormedStream`` with a kernel of its own (``normed_stream``).

At batch 1 a 4-bit GEMV is bound by instructions, not bytes: every byte holds two weights to look up, so the
kernels keep the work per byte small (sm_90 SASS read with ``cuobjdump``): 16-byte loads of weights; x read as 32-bit
(even, odd) pairs, one pair per weight byte, in the weights' own layout (no shared-memory round trip), each serving
two rows (two tiles a program: ``PAIRED_ROWS``, or SwiGLU's gate and up); the nibble's
value fetched by a warp shuffle from the lane that holds it (``LOOKUP``); one scale per 64 weights, applied to
their partial sum; the next step's bytes and scales in flight while this step is summed. Launch shapes come from
``glmkit tune --kernels nf4,fp4`` (tables by device name, kernel "nf4"/"fp4"; ``config_for``).

bitsandbytes' layout (``bitsandbytes.functional.quantize_4bit``, GPU and generic CPU path): the weight ``[n, k]``
is flattened row by row; element ``i`` sits in byte ``i // 2`` of a uint8 tensor ``[n * k / 2, 1]``, the *high*
nibble first; the nibble indexes a table of 16 values (``code``: nf4 or fp4); every ``blocksize`` (64) consecutive
elements share one fp32 scale ``absmax[i // blocksize]``. With double quantization ``absmax`` is itself stored as
uint8 codes: ``absmax = code2[absmax_q] * absmax2[j // 256] + offset``.

>>> import torch
>>> if triton_available():  # a GPU, or TRITON_INTERPRET=1 on a CPU
...     device = "cuda" if torch.cuda.is_available() else "cpu"
...     w = quantize(torch.randn(128, 256, device=device), "nf4")
...     x = torch.randn(1, 1, 256, device=device)
...     assert torch.allclose(gemv_4bit(x, w), x @ w.dequantize().T, rtol=1e-4, atol=1e-4)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from glmkit import gemv4bit_mma, gemv4bit_one
from glmkit.costs import column_splits
from glmkit.gemv import (
    INTERPRETER,
    GemvConfig,
    device_name,
    kernel_name,
    launch_options,
    lookup_config,
    read_tables,
    triton,
    triton_available,
)
from glmkit.gemv4bit_mma import or_stand_in
from glmkit.vocabulary import quantization_setting

if triton is not None:  # optional: Triton (Linux x86-64) builds the kernels; glmkit.gemv says when it is missing
    import triton.language as tl

    from glmkit.gemv import swiglu_as_pytorch, wait_for_previous_kernel

__all__ = ["Packed4bit", "quantize", "gemv_4bit", "gemv_4bit_multi", "gemv_4bit_swiglu", "linear_4bit",
           "NormedStream", "normed_stream", "gemv_4bit_normed", "gemv_4bit_residual", "sms_left_by",
           "tensor_cores", "kernel_for_rows", "check_mma", "check_one", "check_pair_lookup", "ROW_KERNEL_MAX_VECTORS",
           "pick_config_4bit", "config_for", "kernel_for", "check_lookup", "lookup_for", "tuned_lookups", "pair_table",
           "LOOKUP", "LOOKUPS", "triton_available", "is_4bit",
           "unsupported_quantization"]


class Packed4bit(NamedTuple):
    """A bitsandbytes 4-bit weight ``[n, k]`` as the kernels read it: the tensors bitsandbytes holds, not copies.

    ``absmax`` is fp32 ``[n * k / blocksize]``, or with double quantization uint8 codes of ``absmax - offset`` with
    their own scales ``absmax2`` (one per ``nested_blocksize`` codes) and table ``code2``. A named tuple, so that
    ``torch.compile`` takes its tensors as inputs of a layer compiled once for all layers.
    """

    data: torch.Tensor  # uint8 [n * k / 2]: element i in byte i // 2, high nibble first
    absmax: torch.Tensor
    code: torch.Tensor  # fp32 [16]: the nf4 or fp4 values
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype  # the dtype bitsandbytes dequantizes to (the model's compute dtype)
    quant_type: str
    quant_state: Any  # the bitsandbytes QuantState, for dequantize() and bitsandbytes' own matmul
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # fp32 scalar tensor (a pointer: no host sync, CUDA-graph safe)
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def from_state(cls, data: torch.Tensor, state: Any) -> Packed4bit:
        """From bitsandbytes' packed tensor and its ``QuantState`` (GPU layout)."""
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("This 4-bit weight is in bitsandbytes' CPU-only repacked layout; pass the module's weight "
                             "to Packed4bit.from_bnb, which undoes it.")
        if len(state.shape) != 2:
            raise ValueError(f"A 4-bit weight must be a matrix [n, k], got shape {tuple(state.shape)}.")
        n, k = (int(s) for s in state.shape)
        data = data.view(torch.uint8).reshape(-1)
        code = state.code if state.code is not None else _code(state.quant_type, data.device)
        nested = dict(absmax2=state.state2.absmax.float(), code2=state.state2.code.float().to(data.device),
                      offset=torch.as_tensor(state.offset, dtype=torch.float32, device=data.device).reshape(1),
                      nested_blocksize=int(state.state2.blocksize)) if state.nested else {}
        return cls(data=data, absmax=state.absmax.reshape(-1), code=code.float().to(data.device), shape=(n, k),
                   blocksize=int(state.blocksize), dtype=state.dtype, quant_type=state.quant_type,
                   quant_state=state, **nested)

    @classmethod
    def from_bnb(cls, weight: Any) -> Packed4bit:
        """From a bitsandbytes ``Params4bit`` (``module.weight`` of a ``Linear4bit``). On CPUs with AVX512-BF16,
        bitsandbytes repacks a weight at its first forward; that layout is undone into a copy (CPU only)."""
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise TypeError(f"Not a bitsandbytes 4-bit weight (no quant_state): {type(weight).__name__}.")
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # 4-bit paths only: importing bitsandbytes loads its native library
            from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse

            # the repack left absmax in bf16, transposed to [k / blocksize, n], nested scales already expanded;
            # bitsandbytes' inverse restores the nibbles but not a plain absmax: rebuild the state here
            n, k = (int(s) for s in state.shape)
            absmax = state.absmax.T.reshape(-1).float() if state.absmax.dim() == 2 else state.absmax.float()
            data, _ = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
            state = QuantState(absmax=absmax, shape=torch.Size((n, k)), code=state.code, blocksize=state.blocksize,
                               quant_type=state.quant_type, dtype=getattr(state, "original_dtype", state.dtype))
        else:
            state = copy.copy(state)  # bitsandbytes may repack the module's state later (CPU): keep these tensors
        packed = cls.from_state(data, state)
        check_lookup(packed.device)  # once per GPU, before a decoder compiles its layers around the kernels
        tuned_lookups()  # and the tables' lookups read, before any CUDA graph is captured
        return packed

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[n, k]`` as bitsandbytes dequantizes it (the reference the kernels match), in ``dtype``
        (default: the model's compute dtype; ``torch.float32`` gives ``code * absmax`` unrounded, what the kernels
        multiply by)."""
        from bitsandbytes.functional import dequantize_4bit

        state = self.quant_state
        if dtype is not None and dtype != state.dtype:
            state = copy.copy(state)
            state.dtype = dtype
        return dequantize_4bit(self.data.view(-1, 1), state)


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device)


def quantize(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False,
             blocksize: int = 64) -> Packed4bit:
    """Quantize a ``[n, k]`` weight with ``bitsandbytes.functional.quantize_4bit`` (in the GPU layout, on any device).

    >>> quantize(torch.randn(64, 128), "fp4", double_quant=True).nested
    True
    """
    from bitsandbytes.functional import quantize_4bit

    data, state = quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    return Packed4bit.from_state(data, state)


def is_4bit(weight: Any) -> bool:
    """True for a bitsandbytes 4-bit parameter (``Params4bit``) or a ``Packed4bit``."""
    return isinstance(weight, Packed4bit) or getattr(weight, "quant_state", None) is not None and \
        getattr(weight.quant_state, "quant_type", None) in ("nf4", "fp4")


def unsupported_quantization(model: torch.nn.Module) -> str | None:
    """Why the fast decoder cannot run this quantized model, or None when it can (16/32-bit, or bnb nf4/fp4).

    int8 (LLM.int8) is refused: its matmul splits outlier columns into a second fp16 product, so a fast int8 path
    is two kernels per projection; it loads at 9.9 GiB and decodes 6.7 tok/s at batch 1 through plain ``generate()``
    (H100, ``benchmarks/results/quantization_9b.json``): nf4 is both smaller and, with these kernels, faster.
    """
    get = quantization_setting(model)
    if get is None:
        return None
    if get("load_in_8bit", False):
        return ("FastDecoder does not run int8 (LLM.int8) models: load the model in 4 bits instead "
                "(quantization='nf4', 6.6 GiB, decoded by glmkit's 4-bit kernels) or in bf16/fp16, or use generate() "
                "for int8.")
    if get("load_in_4bit", False) and get("bnb_4bit_quant_type", "fp4") in ("nf4", "fp4"):
        if get("bnb_4bit_quant_storage", None) not in (None, "uint8", torch.uint8):
            return "FastDecoder reads 4-bit weights stored as uint8 (bitsandbytes' default bnb_4bit_quant_storage)."
        return None
    method = get("quant_method", type(model.config.quantization_config).__name__)
    return (f"FastDecoder runs 16/32-bit models and bitsandbytes nf4/fp4, not {method}: load with quantization='nf4' "
            "(or no quantization), or use generate().")


def kernel_for(weight: Packed4bit) -> str:
    """The tables' name for the kernel that reads this weight: its 4-bit format, ``"nf4"`` or ``"fp4"`` (what
    ``glmkit tune --kernels nf4 fp4`` writes; ``glmkit.gemv.kernel_name``).

    >>> kernel_for(quantize(torch.randn(64, 128), "fp4"))
    'fp4'
    """
    return kernel_name(weight.quant_type)


def pick_config_4bit(n: int, k: int, blocksize: int = 64, kernel: str = "nf4", swiglu: bool = False) -> GemvConfig:
    """Launch shape for a 4-bit ``[n, k]`` weight (for gate/up, ``swiglu``: ``n`` rows of one half; for fused q/k/v:
    all rows): the one ``glmkit tune`` measured for this card and ``kernel`` ("nf4" or "fp4") with the tiles of rows
    a program reads today (``tiles_per_program``; a shape timed with another number is passed over), else a rule of
    thumb. ``block_k`` counts weight columns and is a multiple of ``blocksize``.

    The rule of thumb, the H200's best shape for q/k/v, o_proj and down_proj (``nf4_paired.json``): tiles of 2 rows
    of 1024 columns per step and 2 warps, so each thread holds 16 packed bytes of each tile's row (one 128-bit load a
    tile, and the next step's in flight): 160 sm_90 instructions per thread, tile and step with Triton 3.6 (10 per
    byte; 17.7 with table loads). Rows per tile halve until the grid has about two programs per SM of an H100/H200
    (132 SMs).

    >>> pick_config_4bit(1000, 320).block_k % 64
    0
    """
    tiles = tiles_per_program(swiglu)
    tuned = lookup_config(kernel, n, k)
    if tuned is not None and tuned.block_k % blocksize == 0 and (tuned.tiles or (2 if swiglu else 1)) == tiles:
        return tuned  # (a shape without tiles was timed with one, or SwiGLU's two)
    block_k = max(blocksize, min(1024, triton.next_power_of_2(k) if triton is not None else 1024))
    if INTERPRETER:  # every program is a Python loop of numpy calls there: few, large programs
        return GemvConfig(block_n=min(256, triton.next_power_of_2(n)), block_k=block_k, num_warps=4)
    block_n = 2  # (a program covers 1 + _paired tiles of n's rows: SwiGLU's n counts one half, its tiles gate and up)
    while block_n > 1 and -(-n // (block_n * (1 + _paired(swiglu)))) < 264:
        block_n //= 2
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=2)


def tiles_per_program(swiglu: bool) -> int:
    """The tiles of ``block_n`` rows a program of the per-row kernel reads: SwiGLU's gate and up, or two tiles of
    one weight (``PAIRED_ROWS``), or one.

    >>> tiles_per_program(swiglu=True)
    2
    """
    return 2 if swiglu else 1 + _paired(swiglu)


def _side_by_side(weights: Packed4bit | Sequence[Packed4bit]) -> tuple[Packed4bit, ...]:
    """One weight, or up to three side by side (q, k, v), as the tuple the kernels take."""
    return (weights,) if isinstance(weights, Packed4bit) else tuple(weights)


def config_for(weights: Packed4bit | Sequence[Packed4bit], swiglu: bool = False) -> GemvConfig:
    """The launch shape ``gemv_4bit`` (``swiglu``: ``gemv_4bit_swiglu``) uses for these weights on this machine: the
    tuned shape of their format for rows of one half (gate/up) or all rows (fused q/k/v), else the rule of thumb."""
    ws = _side_by_side(weights)
    n = sum(w.shape[0] for w in ws)
    return pick_config_4bit(n // 2 if swiglu else n, ws[0].shape[1], ws[0].blocksize, kernel_for(ws[0]), swiglu)


# How a kernel turns a nibble into its value. "shuffle" (GPUs): every lane of a warp holds one of the 16 values
# (lanes i and i + 16 the same) and a warp shuffle fetches lane `nibble`'s: two shifts and two shuffles per byte,
# no address arithmetic. "load" (Triton's interpreter, which runs no PTX; or GLMKIT_4BIT_LOOKUP=load): a load from
# the 16-entry table (64 bytes: one L1 line), after a shift, a mask and a 64-bit address per nibble. "pair": one
# 64-bit load per *byte* from a 256-entry table of both nibbles' values (``pair_table``, 2 KiB, L1-resident): no
# shift, no mask, one address per two weights, but a gather that the L1 serves in as many passes as the warp
# touches lines. Which is faster depends on the card and the shape: ``glmkit tune`` times them and the tables
# keep a lookup per shape (``tuned_lookup``); LOOKUP is the default for shapes without one.
LOOKUP = "load" if INTERPRETER else os.environ.get("GLMKIT_4BIT_LOOKUP", "shuffle")
# A batch of up to ROW_KERNEL_MAX_VECTORS vectors: one program per vector and row block, so the weight's bytes come
# from memory once and from the L2 cache for the other vectors, but every vector pays the whole lookup work again;
# more vectors take the tensor-core kernel below. The kernels refuse more than MAX_VECTORS (bitsandbytes'
# dequantize-then-GEMM then: FOUR_BIT_MAX_BATCH in glmkit.fast_decode).
MAX_VECTORS = 64
LOOKUPS = ("shuffle", "load", "pair")
# More vectors than ROW_KERNEL_MAX_VECTORS (on GPUs of compute capability 8.0+, or the interpreter): a kernel that
# looks each weight up once for all of them and multiplies on the tensor cores (``_tc4_kernel``). The looked-up
# values are rounded to x's 16-bit type before the product (the scale is applied per block in fp32), as
# bitsandbytes' dequantize rounds each weight; the per-row kernel multiplies them in fp32, so a sequence's logits
# can differ slightly between a step of one row and a larger one (2-8 rows on GPUs: glmkit.gemv4bit_mma, which
# rounds them the same way). The per-row kernel is faster up to 2 rows
# on an H200 (benchmarks/results/nf4_batch.json); the shape below: the best of 21 on GLM-4-9B's projections at 4
# and 16 vectors (benchmarks/results/nf4_tc_probe.json)
ROW_KERNEL_MAX_VECTORS = 2
TC_BLOCK_N, TC_WARPS, TC_UNROLL, TC_STAGES = 64, 4, 2, 4  # rows per program, warps, blocks per step, pipeline depth
TC_TARGET_PROGRAMS = 264  # the columns are split until the grid has about this many programs (2 per H200 SM)
_MODE = {"load": 0, "shuffle": 1, "pair": 2}  # the kernels' LOOKUP_MODE
# The per-row kernel's programs take two tiles of rows (block_n each, half the weight's rows apart) that share each
# thread's x, as the SwiGLU kernel's gate and up rows do: x's reads through L1, which held the kernel back
# (benchmarks/results/nf4_ncu.json: L1/TEX 74-87% busy, DRAM 22-39%), halve. On an H200 q/k/v, o_proj and down_proj
# took 7%, 5% and 5% less time at their best shapes, and GLM-4-9B's nf4 step 3.4% less (nf4_paired.json).
PAIRED_ROWS = True

if triton is not None:
    # one weight byte in $2 -> its high nibble's value ($0) and its low nibble's ($1); $3 holds code[lane % 16] on
    # every lane. shfl.sync.idx reads only bits 0-4 of its lane operand, so the low nibble needs no mask: bit 4
    # picks lane i + 16, which holds the same value as lane i. (Four bytes packed in one register per asm call
    # cost more: Triton unpacks the 16-byte load into bytes and packs them again, 7 instructions a word on sm_90.)
    _SHUFFLE_ASM = tl.constexpr("""{
    .reg .b32 t;
    shr.b32 t, $2, 4;
    shfl.sync.idx.b32 $0, $3, t, 0x1f, 0xffffffff;
    shfl.sync.idx.b32 $1, $3, $2, 0x1f, 0xffffffff;
}""")

    @triton.jit
    def _lane_table(like, code_ptr):
        # a tensor shaped and laid out like `like` whose every element on lane i is code[i % 16], computed in that
        # layout (an element moved to another lane would carry another lane's value: only elementwise ops here)
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like.to(tl.int32) * 0], dtype=tl.int32,
                                         is_pure=True, pack=1) & 15
        lut = tl.where(lane == 0, tl.load(code_ptr), 0.0)
        for i in tl.static_range(1, 16):
            lut = tl.where(lane == i, tl.load(code_ptr + i), lut)
        return lut

    @triton.jit
    def _ld_f32(ptr):
        # a load that keeps its operand's layout: inline PTX (a tl.load gets a layout of its own when it has at
        # least as many elements as the program has threads, and the step would pass its sums through shared memory)
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _ld_u8(ptr):
        return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, idx, NESTED: tl.constexpr, BS2: tl.constexpr):
        # the fp32 scales of quantization blocks idx (bitsandbytes' double quantization, NESTED:
        # absmax = code2[absmax_q] * absmax2[idx // BS2] + offset)
        if NESTED:
            scale = tl.load(code2_ptr + tl.load(absmax_ptr + idx).to(tl.int32)) * tl.load(absmax2_ptr + idx // BS2) \
                + offset
        else:
            scale = tl.load(absmax_ptr + idx)
        return scale

    @triton.jit
    def _load_step(q_rows, a_rows, absmax_ptr, absmax2_ptr, code2_ptr, offset, kb0, byte0, blk0, bytes_per_row,
                   NESTED: tl.constexpr, PTX: tl.constexpr, HB: tl.constexpr, BS2: tl.constexpr):
        # the bytes [BLOCK_N, NB, HB] (each widened to 32 bits) and scales [BLOCK_N, NB] of the step at byte kb0;
        # past the row's end no byte is read (0: x is 0 there too) and the row's last scale is
        kb = kb0 + byte0
        ok = kb < bytes_per_row  # bytes_per_row is a whole number of quantization blocks: per block, as scales
        q = tl.load(q_rows + kb[None], mask=ok[None], other=0, eviction_policy="evict_first").to(tl.int32)
        a_idx = a_rows + tl.minimum(kb0 // HB + blk0[None, :], bytes_per_row // HB - 1)  # [BLOCK_N, NB]
        if PTX:  # widened here, once (the compiler would carry bytes to the next step and widen them again there)
            q = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
            if NESTED:  # bitsandbytes' double quantization: absmax = code2[absmax_q] * absmax2[i // 256] + offset
                scale = _ld_f32(code2_ptr + _ld_u8(absmax_ptr + a_idx)) * _ld_f32(absmax2_ptr + a_idx // BS2) + offset
            else:
                scale = _ld_f32(absmax_ptr + a_idx)
        else:
            scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, a_idx, NESTED, BS2)
        return q, scale

    @triton.jit
    def _dot_step(q, scale, x_even, x_odd, lut, code_ptr, MODE: tl.constexpr):
        # each block's partial sum [BLOCK_N, NB], scaled once (LOOKUP says how a nibble becomes its value)
        if MODE == 1:  # shuffle
            w_hi, w_lo = tl.inline_asm_elementwise(_SHUFFLE_ASM, "=r,=r,r,r", [q, lut],
                                                   dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        elif MODE == 2:  # pair: code_ptr is the 256-entry int64 table, the high nibble's value in the low word
            pair = tl.load(code_ptr + q)
            w_hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
            w_lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            w_hi = tl.load(code_ptr + (q >> 4))
            w_lo = tl.load(code_ptr + (q & 15))
        # two sums, not one of both: Triton 3.6 then fuses each product into its sum (one FMA per weight, not three
        # instructions per byte)
        return (tl.sum(w_hi * x_even, axis=2) + tl.sum(w_lo * x_odd, axis=2)) * scale

    @triton.jit
    def _rows_4bit(x_ptr, y_ptr, b_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, N,
                   bytes_per_row, blocks_per_row, sq_ptr, n_sq, eps, r_ptr, g_ptr, s_ptr, sq_out_ptr,
                   X16: tl.constexpr, XBF16: tl.constexpr, NESTED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, MODE: tl.constexpr, PTX: tl.constexpr, BS: tl.constexpr,
                   BS2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   NORMED: tl.constexpr, SQ_BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, PAIRED: tl.constexpr):
        # y[r] = sum_k w[r, k] x[k] for the BLOCK_N rows of row block `block` of one weight, w dequantized in
        # registers. A step covers BLOCK_K columns = NB quantization blocks of BS columns = HB bytes each: a tile
        # [BLOCK_N, NB, HB] of bytes, each byte an even column (high nibble) and the odd one after it (low nibble).
        # Each thread loads 16 contiguous bytes per row (one 128-bit load) and the 16 (even, odd) pairs of x that
        # go with them as 16 32-bit words (four 128-bit loads), which it reuses for every row it holds. The next
        # step's bytes and scales are loaded before this step's are summed, so that a load is always in flight.
        # With SWIGLU the weight has 2N rows (gate, then up) and y[r] = up[r] * silu(gate[r]). PAIRED (1): a second
        # tile of BLOCK_N rows, half the weight's rows further on, shares the thread's x (as SWIGLU's up rows do).
        # NORMED (one vector): x is x * g of a residual stream x (a NormedStream) and the product is W @ rmsnorm(x) * g:
        # the sums are multiplied by 1 / rms(x), from the n_sq partial sums of x^2 at sq_ptr (summed in a fixed order:
        # the same bits every run).
        # RESIDUAL (one vector): y = r + W @ x (W @ x rounded to y's dtype first, as PyTorch's r + F.linear rounds),
        # and the next norm's NormedStream of y: y * g at s_ptr and this row block's sum of y^2 at sq_out_ptr[block].
        NB: tl.constexpr = BLOCK_K // BS
        HB: tl.constexpr = BS // 2
        BLOCK_KB: tl.constexpr = BLOCK_K // 2
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = tl.where(row_ok, rows, 0)  # rows past N read row 0 (in bounds) and are not stored
        blk0 = tl.arange(0, NB)
        byte0 = blk0[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB] byte offsets within a step
        # bytes_per_row = K / 2 and blocks_per_row = K / BS come as arguments: Triton then knows when they divide
        # by 16, and loads 16 bytes at a time
        q_gate = q_ptr + rows[:, None, None] * bytes_per_row  # [BLOCK_N, 1, 1]
        a_gate = rows[:, None] * blocks_per_row  # [BLOCK_N, 1]
        rows2 = rows + tl.cdiv(N, 2 * BLOCK_N) * BLOCK_N  # PAIRED: the second tile's rows
        row2_ok = row_ok & (rows2 < N)
        rows2 = tl.where(row2_ok, rows2, 0)
        if PAIRED:
            q_up = q_ptr + rows2[:, None, None] * bytes_per_row
            a_up = rows2[:, None] * blocks_per_row
        else:
            q_up = q_gate + N * bytes_per_row
            a_up = a_gate + N * blocks_per_row
        if NESTED:
            offset = tl.load(offset_ptr)
        else:
            offset = 0.0
        acc = tl.zeros((BLOCK_N, BLOCK_K // BS), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K // BS), dtype=tl.float32)
        qg, ag = _load_step(q_gate, a_gate, absmax_ptr, absmax2_ptr, code2_ptr, offset, 0, byte0, blk0, bytes_per_row,
                            NESTED, PTX, HB, BS2)
        qu, au = qg, ag
        if SWIGLU or PAIRED:
            qu, au = _load_step(q_up, a_up, absmax_ptr, absmax2_ptr, code2_ptr, offset, 0, byte0, blk0, bytes_per_row,
                                NESTED, PTX, HB, BS2)
        if MODE == 1:
            lut = _lane_table(qg, code_ptr)
        else:
            lut = 0.0
        for kb0 in range(0, bytes_per_row, BLOCK_KB):
            # [BLOCK_N, NB, HB] byte index within the row = index of the (even, odd) pair of x: x is loaded in the
            # weights' own shape, so that Triton gives both one layout (a [NB, HB] load gets another, and each
            # step would then pass x through shared memory)
            kb = tl.broadcast_to((kb0 + byte0)[None], (BLOCK_N, BLOCK_K // BS, BS // 2))
            if X16:  # x as 32-bit words, each an (even, odd) pair of 16-bit values, the even one in the low half
                if EVEN_K:
                    xw = tl.load(x_ptr + kb)
                else:  # the last step runs past the row: x is 0 there
                    xw = tl.load(x_ptr + kb, mask=kb < bytes_per_row, other=0)
                if XBF16:
                    x_even = (xw << 16).to(tl.float32, bitcast=True)
                    x_odd = (xw & -65536).to(tl.float32, bitcast=True)
                else:
                    x_even = xw.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    x_odd = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:  # fp32 x (CPU tests, fp32 models): two strided loads
                if EVEN_K:
                    x_even = tl.load(x_ptr + 2 * kb)
                    x_odd = tl.load(x_ptr + 2 * kb + 1)
                else:
                    x_even = tl.load(x_ptr + 2 * kb, mask=kb < bytes_per_row, other=0.0)
                    x_odd = tl.load(x_ptr + 2 * kb + 1, mask=kb < bytes_per_row, other=0.0)
            next_qg, next_ag = _load_step(q_gate, a_gate, absmax_ptr, absmax2_ptr, code2_ptr, offset, kb0 + BLOCK_KB,
                                          byte0, blk0, bytes_per_row, NESTED, PTX, HB, BS2)
            acc += _dot_step(qg, ag, x_even, x_odd, lut, code_ptr, MODE)
            qg, ag = next_qg, next_ag
            if SWIGLU or PAIRED:
                next_qu, next_au = _load_step(q_up, a_up, absmax_ptr, absmax2_ptr, code2_ptr, offset, kb0 + BLOCK_KB,
                                              byte0, blk0, bytes_per_row, NESTED, PTX, HB, BS2)
                acc_up += _dot_step(qu, au, x_even, x_odd, lut, code_ptr, MODE)
                qu, au = next_qu, next_au
        out_dtype = y_ptr.dtype.element_ty
        y = tl.sum(acc, axis=1)
        up = tl.sum(acc_up, axis=1)
        if NORMED:  # rmsnorm's 1 / sqrt(mean(x^2) + eps), the same for every row: it factors out of the sums
            i = tl.arange(0, SQ_BLOCK)  # (asked for before the loop instead: slower, nf4_fused.json)
            squares = tl.sum(tl.load(sq_ptr + i, mask=i < n_sq, other=0.0), axis=0)
            rstd = 1.0 / tl.sqrt(squares / (2 * bytes_per_row) + eps)
            y = y * rstd
            up = up * rstd
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
            if PAIRED:
                up += tl.load(b_ptr + rows2).to(tl.float32)
        if SWIGLU:
            y = swiglu_as_pytorch(y, up, out_dtype)
        if RESIDUAL:
            y = _add_rounded(y, r_ptr + rows, out_dtype)
            tl.store(s_ptr + rows, (y * tl.load(g_ptr + rows).to(tl.float32)).to(out_dtype), mask=row_ok)
            squares = tl.sum(tl.where(row_ok, y * y, 0.0), axis=0)
            if PAIRED:
                up = _add_rounded(up, r_ptr + rows2, out_dtype)
                tl.store(s_ptr + rows2, (up * tl.load(g_ptr + rows2).to(tl.float32)).to(out_dtype), mask=row2_ok)
                squares += tl.sum(tl.where(row2_ok, up * up, 0.0), axis=0)
            tl.store(sq_out_ptr + block, squares)
        tl.store(y_ptr + rows, y.to(out_dtype), mask=row_ok)
        if PAIRED:
            tl.store(y_ptr + rows2, up.to(out_dtype), mask=row2_ok)

    @triton.jit
    def _add_rounded(y, r_ptrs, out_dtype: tl.constexpr):
        # r + y with y rounded to out_dtype first and the sum too, as PyTorch's r + F.linear(...) rounds (kept in fp32)
        return (y.to(out_dtype).to(tl.float32) + tl.load(r_ptrs).to(tl.float32)).to(out_dtype).to(tl.float32)

    @triton.jit
    def _segment(pid, n0, n1, SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr):
        # which of up to three weights of n0, n1, ... rows (q, k and v; one launch) row block `pid` is in, counted in
        # blocks of BLOCK_N rows: (that weight, its row block, the rows of the weights before it)
        p0 = tl.cdiv(n0, BLOCK_N)
        if SEGMENTS == 1:
            return 0, pid, 0
        p1 = p0 + tl.cdiv(n1, BLOCK_N)
        seg = tl.where(pid < p0, 0, tl.where(pid < p1, 1, 2))
        return seg, pid - _pick(seg, 0, p0, p1), _pick(seg, 0, n0, n0 + n1)

    @triton.jit
    def _pick(seg, first, second, third):
        # the argument of weight `seg` (0, 1 or 2)
        return tl.where(seg == 0, first, tl.where(seg == 1, second, third))

    @triton.jit
    def _gemv4_kernel(x_ptr, y_ptr, b_ptr, code_ptr,
                      q0, a0, a20, c20, o0, n0,
                      q1, a1, a21, c21, o1, n1,
                      q2, a2, a22, c22, o2, n2,
                      bytes_per_row, blocks_per_row, sq_ptr, n_sq, eps, r_ptr, g_ptr, s_ptr, sq_out_ptr,
                      SEGMENTS: tl.constexpr, X16: tl.constexpr,
                      XBF16: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
                      MODE: tl.constexpr, PTX: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, BATCH_AXIS: tl.constexpr, NORMED: tl.constexpr, SQ_BLOCK: tl.constexpr,
                      RESIDUAL: tl.constexpr, PAIRED: tl.constexpr, PDL: tl.constexpr):
        # one launch for up to three weights of the same columns (q, k and v), whose outputs lie side by side in
        # y: the first programs take the first weight's row blocks, the next the second's, and so on. Several
        # vectors x (a batch): one program per vector and row block, the vector on grid axis BATCH_AXIS (0 where
        # the row blocks fit axis 1: the programs of one row block then run side by side and share its weights
        # through the L2 cache). NORMED and RESIDUAL: see _rows_4bit (one vector). PDL: launched with programmatic
        # dependent launch (glmkit.gemv.wait_for_previous_kernel, first thing)
        wait_for_previous_kernel(PDL)
        pid = tl.program_id(1 - BATCH_AXIS)
        vector = tl.program_id(BATCH_AXIS)
        y_row = n0  # outputs per vector: the rows of the weights in use
        if SEGMENTS >= 2:
            y_row += n1
        if SEGMENTS >= 3:
            y_row += n2
        y_ptr += vector * y_row
        if X16:  # x as 32-bit words: bytes_per_row of them a vector
            x_ptr += vector * bytes_per_row
        else:
            x_ptr += vector * 2 * bytes_per_row
        seg, block, row0 = _segment(pid, n0, n1, SEGMENTS, BLOCK_N * (1 + PAIRED))
        _rows_4bit(x_ptr, y_ptr + row0, b_ptr + row0, _pick(seg, q0, q1, q2), _pick(seg, a0, a1, a2), code_ptr,
                   _pick(seg, a20, a21, a22), _pick(seg, c20, c21, c22), _pick(seg, o0, o1, o2), block,
                   _pick(seg, n0, n1, n2), bytes_per_row, blocks_per_row, sq_ptr, n_sq, eps, r_ptr, g_ptr, s_ptr,
                   sq_out_ptr, X16, XBF16, NESTED, HAS_BIAS, SWIGLU, MODE, PTX, BS, BS2, BLOCK_N, BLOCK_K, EVEN_K,
                   NORMED, SQ_BLOCK, RESIDUAL, PAIRED)


    # one weight byte ($1; $2 the same) -> both its values as a pair of 16-bit floats in one register ($0: the high
    # nibble's, the even column, in the low half); $3 ($4 the same) holds the 16-bit code[lane % 16] on every lane
    _SHUFFLE_PAIR_ASM = tl.constexpr("""{
    .reg .b32 t, a, b;
    shr.b32 t, $1, 4;
    shfl.sync.idx.b32 a, $3, t, 0x1f, 0xffffffff;
    shfl.sync.idx.b32 b, $3, $1, 0x1f, 0xffffffff;
    prmt.b32 $0, a, b, 0x5410;
}""")

    @triton.jit
    def _tc_rows(x_ptr, part_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, split, N,
                 row_out, n_total, vectors, bytes_per_row, blocks_per_row, blocks_per_split, NESTED: tl.constexpr,
                 SHUFFLE: tl.constexpr, IEEE: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, UNROLL: tl.constexpr):
        # the partial products over quantization blocks [split * blocks_per_split, ...) of BLOCK_N rows of one
        # weight with all vectors: per block, the weights [BLOCK_N, BS] in x's 16-bit type (each looked up once for
        # every vector) times the vectors' columns [BS, BLOCK_B] on the tensor cores, scaled by the block's scales
        # in fp32; written to part[split, vector, row_out + row] (fp32)
        HB: tl.constexpr = BS // 2
        WDT: tl.constexpr = x_ptr.dtype.element_ty
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = tl.where(row_ok, rows, 0)
        q_rows = q_ptr + rows[:, None] * bytes_per_row + tl.arange(0, HB)[None, :]  # [BLOCK_N, HB]
        a_rows = rows * blocks_per_row
        vb = tl.arange(0, BLOCK_B)
        x_cols = x_ptr + vb[None, :] * (2 * bytes_per_row) + tl.arange(0, BS)[:, None]  # [BS, BLOCK_B]
        x_ok = vb[None, :] < vectors
        if NESTED:
            offset = tl.load(offset_ptr)
        else:
            offset = 0.0
        if SHUFFLE:  # code[lane % 16] as a 16-bit float, in the bytes' layout (see _lane_table)
            lut = _lane_table(tl.load(q_rows).to(tl.int32), code_ptr).to(WDT).to(tl.int16, bitcast=True)
            lut = lut.to(tl.int32) & 0xFFFF
            luts = tl.join(lut, lut)
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        j0 = split * blocks_per_split
        for j1 in range(j0, tl.minimum(j0 + blocks_per_split, blocks_per_row), UNROLL):
            for u in tl.static_range(UNROLL):
                j = j1 + u
                q = tl.load(q_rows + j * HB, eviction_policy="evict_first").to(tl.int32)
                scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, a_rows + j, NESTED, BS2)
                if SHUFFLE:
                    w = tl.inline_asm_elementwise(_SHUFFLE_PAIR_ASM, "=r,r,r,r,r", [tl.join(q, q), luts],
                                                  dtype=tl.int16, is_pure=True, pack=2)
                    w = w.to(WDT, bitcast=True).reshape(BLOCK_N, BS)
                else:  # table loads, each weight rounded to x's type as the shuffle's table is
                    w_hi = tl.load(code_ptr + (q >> 4)).to(WDT)
                    w_lo = tl.load(code_ptr + (q & 15)).to(WDT)
                    w = tl.join(w_hi, w_lo).reshape(BLOCK_N, BS)
                xt = tl.load(x_cols + j * BS, mask=x_ok, other=0.0)
                if IEEE:  # fp32 products (not tf32); also 16-bit ones in the interpreter, whose 16-bit dot is wrong
                    part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(w, xt)
                acc += part * scale[:, None]
        out = part_ptr + (split * vectors + vb[None, :]) * n_total + row_out + rows[:, None]
        tl.store(out, acc, mask=row_ok[:, None] & x_ok)

    @triton.jit
    def _tc4_kernel(x_ptr, part_ptr, code_ptr,
                    q0, a0, a20, c20, o0, n0,
                    q1, a1, a21, c21, o1, n1,
                    q2, a2, a22, c22, o2, n2,
                    vectors, bytes_per_row, blocks_per_row, blocks_per_split, n_total, SEGMENTS: tl.constexpr,
                    NESTED: tl.constexpr, SHUFFLE: tl.constexpr, IEEE: tl.constexpr, BS: tl.constexpr,
                    BS2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, UNROLL: tl.constexpr):
        # a batch of vectors through up to three weights of the same columns (q, k and v): grid (row blocks of
        # all weights, splits of the columns); the first row blocks are the first weight's, and so on
        seg, block, row0 = _segment(tl.program_id(0), n0, n1, SEGMENTS, BLOCK_N)
        _tc_rows(x_ptr, part_ptr, _pick(seg, q0, q1, q2), _pick(seg, a0, a1, a2), code_ptr, _pick(seg, a20, a21, a22),
                 _pick(seg, c20, c21, c22), _pick(seg, o0, o1, o2), block, tl.program_id(1), _pick(seg, n0, n1, n2),
                 row0, n_total, vectors, bytes_per_row, blocks_per_row, blocks_per_split, NESTED, SHUFFLE, IEEE, BS,
                 BS2, BLOCK_N, BLOCK_B, UNROLL)

    @triton.jit
    def _tc_sum_kernel(part_ptr, y_ptr, b_ptr, splits, vectors, n_total, n_out, HAS_BIAS: tl.constexpr,
                       SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
        # y[vector, r] = the sum of the splits' partial products (+ bias); SWIGLU: rows r (gate) and n_out + r (up)
        # give up * silu(gate), each rounded to y's dtype as PyTorch would round them (as _rows_4bit)
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.program_id(1)
        ok = r < n_out
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(splits):
            row = part_ptr + (s * vectors + v) * n_total
            y += tl.load(row + r, mask=ok, other=0.0)
            if SWIGLU:
                up += tl.load(row + n_out + r, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + r, mask=ok, other=0.0).to(tl.float32)
        out_dtype = y_ptr.dtype.element_ty
        if SWIGLU:
            y = swiglu_as_pytorch(y, up, out_dtype)
        tl.store(y_ptr + v * n_out + r, y.to(out_dtype), mask=ok)


def _check(x: torch.Tensor, ws: tuple[Packed4bit, ...], swiglu: bool, bias: torch.Tensor | None = None) -> None:
    if triton is None:
        raise RuntimeError("glmkit.gemv4bit needs Triton: it comes with PyTorch's CUDA builds (pip install triton).")
    w = ws[0]
    if not (w.data.is_cuda or INTERPRETER):
        raise ValueError("gemv_4bit runs on a GPU (or in Triton's CPU interpreter, TRITON_INTERPRET=1); this weight is "
                         f"on {w.device}: use linear_4bit there.")
    k = w.shape[1]
    if x.device != w.device:
        raise ValueError(f"gemv_4bit needs x and the weight on one device, got {x.device} and {w.device}.")
    if x.shape[-1] != k:
        raise ValueError(f"gemv_4bit multiplies vectors of {k} values (the weight's columns), got a tensor of shape "
                         f"{tuple(x.shape)}.")
    if x.numel() > MAX_VECTORS * k:
        raise ValueError(f"gemv_4bit reads the weight once per vector: at most {MAX_VECTORS} vectors, got "
                         f"{x.numel() // k}; use linear_4bit (bitsandbytes dequantizes, then one GEMM).")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gemv_4bit multiplies bf16, fp16 or fp32 vectors, got {x.dtype}.")
    for v in ws:
        if k % v.blocksize or v.data.numel() >= 2**31:
            raise ValueError(f"gemv_4bit needs rows made of whole quantization blocks (k={k} is not a multiple of "
                             f"blocksize {v.blocksize}) and fewer than 2**32 weights; use linear_4bit.")
    _check_format(ws)
    if swiglu and w.shape[0] % 2:
        raise ValueError(f"gemv_4bit_swiglu needs a gate/up weight with an even number of rows, got {w.shape[0]}.")
    rows = sum(v.shape[0] for v in ws)
    if bias is not None and (swiglu or bias.numel() != rows or bias.device != x.device):
        raise ValueError("A 4-bit product's bias holds one value per row of its weights, on their device"
                         + (" (the SwiGLU product takes none: GLM's gate/up has no bias)." if swiglu else
                            f": {rows} values, got shape {tuple(bias.shape)} on {bias.device}."))


def _check_format(ws: tuple[Packed4bit, ...]) -> None:
    w = ws[0]
    for v in ws[1:]:
        if (v.device, v.shape[1], v.blocksize, v.quant_type, v.nested, v.nested_blocksize) != \
                (w.device, w.shape[1], w.blocksize, w.quant_type, w.nested, w.nested_blocksize):
            raise ValueError("gemv_4bit_multi needs weights of one format (device, columns, blocksize, nf4/fp4, "
                             "double quantization or not); multiply them one by one with gemv_4bit.")


T = TypeVar("T")


def _compiling_or_capturing() -> bool:
    """Whether this runs inside a compiled function or a CUDA graph capture, where nothing may be checked or built."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _first_run(answers: dict[Any, T], key: Any, check: Callable[[], T], meanwhile: T) -> T:
    """``check()``'s answer for ``key``, found the first time it is asked for outside a compiled function and a CUDA
    graph capture (where nothing can be checked: the decoders' eager warm-up steps come first) and kept for the
    process; ``meanwhile`` before that, and while the check itself runs (its own launches may ask again; a check
    that raises leaves ``meanwhile`` kept). The shape of glmkit's first-run checks of its 4-bit kernels on a GPU:
    ``check_lookup``, ``check_pair_lookup``, ``check_mma``, ``check_one``.

    >>> answers = {}
    >>> _first_run(answers, "gpu 0", lambda: False, True), answers
    (False, {'gpu 0': False})
    """
    if key in answers:
        return answers[key]
    if _compiling_or_capturing():
        return meanwhile
    answers[key] = meanwhile
    answers[key] = check()
    return answers[key]


_CHECKED: dict[torch.device, bool] = {}


def check_lookup(device: torch.device | str) -> str:
    """The lookup the kernels use on ``device``, checked once per GPU and process: the warp-shuffle lookup against
    plain table loads on two small weights (fp32 and double-quantized scales). Should they ever disagree (a
    Triton or driver the shuffle was not checked on), it warns and switches to the loads, which Triton's
    interpreter checks against bitsandbytes. A few seconds the first time (compiling), then nothing.

    >>> check_lookup("cpu") in LOOKUPS
    True
    """
    if torch.compiler.is_compiling() or LOOKUP != "shuffle":  # first: inside a compiled function, nothing else runs
        return LOOKUP
    device = torch.device(device)
    if device.type == "cuda":
        _first_run(_CHECKED, device, lambda: _row_shuffle_agrees(device), True)
    return LOOKUP


def _row_shuffle_agrees(device: torch.device) -> bool:
    """The first-run check of ``check_lookup``: on a disagreement it switches ``LOOKUP`` to the loads (once: a
    caller may set it back)."""
    global LOOKUP
    with torch.cuda.device(device):  # (asked for by weights on another GPU than the current one: a split's)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 1, 256, device=device, generator=g).to(torch.bfloat16)
        for double_quant in (False, True):
            w = quantize(torch.randn(64, 256, device=device, generator=g), "nf4", double_quant)
            if not _shuffle_agrees(device, "4-bit kernels",
                                   lambda lookup, w=w: _launch(x, (w,), None, False, None, lookup)):
                LOOKUP = "load"
                return False
    return True


_MMA_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}


def check_mma(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the tensor-core CUDA kernel (``glmkit.gemv4bit_mma``) runs on ``device`` for tokens of ``dtype``: the
    first time 2-8 tokens of ``dtype`` go through ``gemv_4bit`` on ``device`` in a process, outside a compiled
    function or a CUDA graph capture (a decoder's eager warm-up steps, which come before its capture), it is
    compiled and checked against ``dequantize`` + ``F.linear`` on small weights (fp32 and double-quantized scales,
    q/k/v with a bias, one weight, SwiGLU, 2 and 8 vectors; on an H200 6.7 s for the first dtype in a process, 1.8 s
    for the second: a decoder built for one sequence, ``batch_size=1``, never pays it; one for more pays it in its
    warm-up); an error or a disagreement turns it off for the process, with a warning that says why, and the Triton
    kernels run instead. Code that captures a CUDA graph around ``gemv_4bit`` itself must run it once eagerly first
    (as for any of glmkit's kernels: the first call compiles).

    >>> check_mma("cpu")
    False
    """
    return _checked(_MMA_CHECKED, device, dtype, _mma_disagreement, gemv4bit_mma)


def _checked(answers: dict[tuple[torch.device, torch.dtype], bool], device: torch.device | str, dtype: torch.dtype,
             disagreement: Callable[[torch.device, torch.dtype], str | None], kernel: Any,
             meanwhile: bool = True) -> bool:
    """The first-run check of one of glmkit's CUDA kernels (``check_mma``, ``check_one``,
    ``glmkit.gemv16_one.check``; ``kernel``: its module, or what names it) on ``device`` for ``dtype``:
    ``disagreement`` says what the kernel gets wrong (None: nothing); an error or a disagreement turns that kernel
    off on the device (``gemv4bit_mma.disable``). ``meanwhile``: the answer before it has run (``_first_run``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def agrees() -> bool:
        try:
            with torch.cuda.device(device):
                why = disagreement(device, dtype)
        except Exception as exc:  # NVRTC missing or failing, an error the launch reports: the Triton kernels take over
            why = _why(exc)
        if why and why != _NOT_HERE:  # (_NOT_HERE: nothing to check, the kernel does not run here)
            gemv4bit_mma.disable(device, why, kernel.NAME, kernel.LABEL)
        return not why

    return _first_run(answers, (device, dtype), agrees, meanwhile)


_NOT_HERE = "not usable here"


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def _mma_disagreement(device: torch.device, dtype: torch.dtype) -> str | None:
    """What the tensor-core kernel gets wrong on small weights against ``dequantize`` + ``F.linear`` in fp32 (no
    Triton kernel compiled for it), ``_NOT_HERE`` where it does not run, or None."""
    g = torch.Generator(device=device).manual_seed(0)
    k = 64 * 43  # 43 blocks a row: each warp sums whole stages, then a last one partly past its chunks
    for double_quant in (False, True):
        ws = tuple(quantize(torch.randn(n, k, device=device, generator=g) * 0.05, "nf4", double_quant)
                   for n in (48, 16, 24))
        w32 = torch.cat([w.dequantize(torch.float32) for w in ws])
        bias = torch.randn(88, device=device, generator=g).to(dtype)
        for vectors in (gemv4bit_mma.MIN_VECTORS, gemv4bit_mma.MAX_VECTORS):
            x = torch.randn(vectors, 1, k, device=device, generator=g).to(dtype)
            for args in ((ws, bias, False), (ws[:1], None, False), (ws[:1], None, True)):
                if not gemv4bit_mma.usable(x, args[0], args[2], env=False):
                    return _NOT_HERE
                got = gemv4bit_mma.gemv_4bit_mma(x, *args).float()
                want = F.linear(x.float(), w32[:sum(w.shape[0] for w in args[0])],
                                None if args[1] is None else args[1].float())
                if args[2]:
                    gate, up = want.chunk(2, dim=-1)
                    want = up * F.silu(gate)
                if not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item()):
                    err = ((got - want).norm() / want.norm()).item()
                    return (f"its products differ from dequantize + F.linear ({dtype}, double quantization "
                            f"{double_quant}, {vectors} vectors, {len(args[0])} weight(s), SwiGLU {args[2]}: "
                            f"relative error {err:.1e})")
    return None


_ONE_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}


def check_one(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the batch-1 CUDA kernel (``glmkit.gemv4bit_one``) runs on ``device`` for a token of ``dtype``: the
    first time one token of ``dtype`` goes through glmkit's 4-bit products on ``device`` in a process, outside a
    compiled function or a CUDA graph capture (a decoder's eager warm-up steps), it is compiled and checked against
    ``dequantize`` + ``F.linear`` on small weights (every form a decoder launches: ``_one_disagreement``); an error or
    a disagreement turns this kernel off for the process, with a warning that says why, and the Triton kernel runs
    instead.

    >>> check_one("cpu")
    False
    """
    return _checked(_ONE_CHECKED, device, dtype, _one_disagreement, gemv4bit_one)


def _one_disagreement(device: torch.device, dtype: torch.dtype) -> str | None:
    """What the batch-1 CUDA kernel gets wrong on small weights against ``dequantize`` + ``F.linear`` in fp32, with
    the norm and the residual add it folds in, ``_NOT_HERE`` where it does not run, or None. Every form a decoder
    launches: q/k/v with a bias, one weight, SwiGLU, each with the norm folded in (also an x so small that the norm's
    eps counts), a residual add (its ``NormedStream`` too), long rows (many stages a tile, as down_proj's) and, in
    bf16, an x past fp16's range (the kernel multiplies in fp16: ``gemv4bit_one.F16_PRODUCTS``)."""
    g = torch.Generator(device=device).manual_seed(0)
    k = 64 * 43  # 43 blocks a row: warps' runs of chunks end part-way through a stage
    ws = tuple(quantize(torch.randn(n, k, device=device, generator=g) * 0.05, "nf4") for n in (48, 16, 24))
    long = (quantize(torch.randn(40, 64 * 131, device=device, generator=g) * 0.05, "nf4"),)  # long rows
    bias = torch.randn(88, device=device, generator=g).to(dtype)
    cases = (("q/k/v with a bias", ws, bias, False, None, 1.0), ("one weight", ws[:1], None, False, None, 1.0),
             ("SwiGLU", ws[:1], None, True, None, 1.0), ("a folded norm", ws, bias, False, "normed", 1.0),
             ("SwiGLU with a folded norm", ws[:1], None, True, "normed", 1.0),
             ("a folded norm of an x where eps counts", ws[:1], None, False, "normed", 1e-3),
             ("a residual add", ws[:1], None, False, "residual", 1.0), ("rows of 8384 columns", long, None, False,
                                                                         "residual", 1.0),
             ("an x past fp16's range", ws, bias, False, None, 1e6 if dtype == torch.bfloat16 else 1.0))
    for what, wts, b, swiglu, fold, size in cases:
        x = (torch.randn(1, 1, wts[0].shape[1], device=device, generator=g) * size).to(dtype)
        if not gemv4bit_one.usable(x, wts, swiglu, env=False):
            return _NOT_HERE
        n = sum(w.shape[0] for w in wts)
        w32 = torch.cat([w.dequantize(torch.float32) for w in wts])
        norm = (torch.rand(x.shape[-1], device=device, generator=g) + 0.5).to(dtype)
        xn = x.float() * torch.rsqrt(x.float().pow(2).mean() + 1e-5) * norm.float()
        want = F.linear(xn if fold == "normed" else x.float(), w32, None if b is None else b.float())
        if swiglu:
            gate, up = want.chunk(2, dim=-1)
            want = up * F.silu(gate)
        if fold == "normed":
            got = gemv_4bit_normed(normed_stream(x, norm), wts, b, eps=1e-5, swiglu=swiglu)
        elif fold == "residual":
            r = torch.randn(1, 1, n, device=device, generator=g).to(dtype)
            norm_out = (torch.rand(n, device=device, generator=g) + 0.5).to(dtype)  # the norm after the add
            got, stream = gemv_4bit_residual(x, wts[0], r, norm_out)
            want = want + r.float()
            if not torch.allclose(stream.squares.sum(), got.float().pow(2).sum(), rtol=1e-3) or not \
                    torch.allclose(stream.scaled.float(), got.float() * norm_out.float(), rtol=1e-2, atol=1e-2):
                return f"the next norm's stream it writes after a residual add ({dtype}, {what}) is not y·g, Σy²"
        else:
            got = gemv4bit_one.gemv_4bit_one(x, wts, b, swiglu)
        if not torch.allclose(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item()):
            err = ((got.float() - want).norm() / want.norm()).item()
            return f"its products differ from dequantize + F.linear ({dtype}, {what}: relative error {err:.1e})"
    return None


def _shuffle_agrees(device: torch.device, kernels: str, run: Any) -> bool:
    """Whether ``run("shuffle")`` gives ``run("load")``'s products (within 1%); if not, a warning that names the
    kernels and says what they use instead."""
    if torch.allclose(run("shuffle").float(), run("load").float(), rtol=1e-2, atol=1e-2):
        return True
    warnings.warn(f"glmkit's {kernels}: the warp-shuffle lookup disagrees with table loads on "
                  f"{torch.cuda.get_device_name(device)}; using table loads (slower). Please report it.",
                  RuntimeWarning, stacklevel=3)
    return False


_PAIRS: dict[tuple[str, torch.device], torch.Tensor] = {}


def pair_table(code: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The "pair" lookup's table: for each byte value ``b`` one int64 holding ``code[b >> 4]`` (the high nibble's
    value, the even column) in its low 32 bits and ``code[b & 15]`` in its high 32 bits, as fp32 bit patterns
    ``[256]``. Made once per format and device (bitsandbytes' 16 values are fixed per format); the first call must
    come before a CUDA graph is captured (FastDecoder's warm-up steps do that).

    >>> pairs = pair_table(torch.arange(16, dtype=torch.float32), "example")
    >>> pairs.shape, pairs[0x2f:0x30].view(torch.float32).tolist()  # byte 0x2f: values 2 (high) and 15 (low)
    (torch.Size([256]), [2.0, 15.0])
    """
    key = (quant_type, code.device)
    if key not in _PAIRS:
        if code.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("glmkit's 'pair' lookup table is built on its first use, which must not be inside a CUDA "
                               "graph capture: run the product once before capturing.")
        b = torch.arange(256, device=code.device)
        bits = code.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        _PAIRS[key] = bits[b >> 4] | (bits[b & 15] << 32)
    return _PAIRS[key]


def _table_lookups(name: str) -> dict[tuple[str, int, int], str]:
    """(kernel, rows, columns) -> lookup from the launch-shape tables tuned on the device ``name`` (the entries'
    ``"lookup"``), read as ``glmkit.gemv.tables_for`` reads their shapes: shipped tables, then the user's."""
    def load(path: Path) -> tuple[str, dict[tuple[str, int, int], str | None]]:
        table = json.loads(path.read_text())
        # (a later table's shape without a lookup: the shape it was timed with used the default, None until the end)
        return table["tuned_on"], {(c.get("kernel", "bf16"), c["rows"], c["columns"]):
                                   c["lookup"] if c.get("lookup") in LOOKUPS else None for c in table["configs"]}
    return {key: lookup for key, lookup in read_tables(name, load).items() if lookup is not None}


_TUNED_LOOKUPS: dict[tuple[str, int, int], str] | None = None


def tuned_lookups() -> dict[tuple[str, int, int], str]:
    """The lookup tuned for each 4-bit shape on this machine's GPU (read once; empty on a CPU). ``glmkit tune``
    adds what it measures in this process (``notebooks/05_tuning.ipynb``).

    >>> lookups = tuned_lookups()  # {(kernel, rows, columns): lookup}, from the tables tuned on this card
    >>> all(kernel in ("nf4", "fp4") and lookup in LOOKUPS for (kernel, _, _), lookup in lookups.items())
    True
    """
    global _TUNED_LOOKUPS
    if _TUNED_LOOKUPS is None:
        _TUNED_LOOKUPS = {} if INTERPRETER else _table_lookups(device_name())
    return _TUNED_LOOKUPS


def lookup_for(weights: Packed4bit | Sequence[Packed4bit], swiglu: bool = False) -> str:
    """The lookup the kernels use for these weights at their default launch shape: the one tuned with that shape
    for this card (``tuned_lookups``), unless ``GLMKIT_4BIT_LOOKUP`` forces one or the warp shuffle failed its
    check here (``check_lookup``); else ``LOOKUP``.

    >>> lookup_for(quantize(torch.randn(64, 128), "nf4")) in LOOKUPS
    True
    """
    ws = _side_by_side(weights)
    default = check_lookup(ws[0].device)
    if default != "shuffle" or "GLMKIT_4BIT_LOOKUP" in os.environ:
        return default
    n = sum(w.shape[0] for w in ws)
    tuned = tuned_lookups().get((kernel_for(ws[0]), n // 2 if swiglu else n, ws[0].shape[1]))
    return tuned or default


class _Fusion(NamedTuple):
    """What a one-vector launch of the per-row kernel does besides the product (the fused batch-1 step,
    ``gemv_4bit_normed`` and ``gemv_4bit_residual``): with ``squares``, x is a ``NormedStream``'s ``scaled`` and the
    sums are multiplied by its 1 / rms; with ``residual``, the product is added to it and the next norm's
    ``NormedStream`` is written to ``scaled`` and ``partials`` (one sum of squares per row block); the batch-1 CUDA
    kernel leaves ``leave_sms`` SMs to the kernel after it (``glmkit.gemv4bit_one.LEAVE_SMS_MAX``)."""

    squares: torch.Tensor | None = None
    eps: float = 1e-5
    residual: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    scaled: torch.Tensor | None = None
    partials: torch.Tensor | None = None
    leave_sms: int = 0


_NO_FUSION = _Fusion()


def _launch(x: torch.Tensor, ws: tuple[Packed4bit, ...], bias: torch.Tensor | None, swiglu: bool,
            config: GemvConfig | None, lookup: str | None = None, batch_axis: int | None = None,
            mma: bool = True, fusion: _Fusion = _NO_FUSION) -> torch.Tensor:
    """The product through a CUDA kernel where one runs (a GPU, 16-bit x, no launch shape or lookup asked for,
    ``mma``: one vector ``glmkit.gemv4bit_one``'s, 2-8 ``glmkit.gemv4bit_mma``'s), else through a Triton kernel;
    ``fusion``: one vector, with a norm folded in or a residual add after it (``_Fusion``)."""
    _check(x, ws, swiglu, bias)
    w = ws[0]
    y = None
    if mma and _takes_one(x, ws, swiglu, config, lookup, batch_axis):
        f = fusion  # (partials sized for this kernel's tiles: if it fails, the caller sizes them again)
        y = _cuda_product(lambda: gemv4bit_one.gemv_4bit_one(x, ws, bias, swiglu, f.squares, f.eps, f.residual,
                                                             f.norm_weight, f.scaled, f.partials,
                                                             leave_sms=f.leave_sms),
                          x.device, gemv4bit_one, reraise=f.partials is not None)
    elif mma and fusion is _NO_FUSION and config is None and lookup is None and batch_axis is None and \
            gemv4bit_mma.usable(x, ws, swiglu) and check_mma(x.device, x.dtype):
        y = _cuda_product(lambda: gemv4bit_mma.gemv_4bit_mma(x, ws, bias, swiglu), x.device, gemv4bit_mma)
    if y is not None:
        return y
    if lookup is None:
        lookup = lookup_for(ws, swiglu) if config is None else check_lookup(x.device)
    if lookup == "shuffle" and INTERPRETER:
        raise ValueError("The warp-shuffle lookup runs PTX, which Triton's interpreter does not: use lookup='load' or "
                         "'pair' there (or a GPU).")
    k = w.shape[1]
    if x.numel() // k > ROW_KERNEL_MAX_VECTORS and tensor_cores(x.device):
        if config is not None or batch_axis is not None:
            raise ValueError(f"config and batch_axis set the per-row kernel's launch (up to {ROW_KERNEL_MAX_VECTORS} "
                             f"vectors); {x.numel() // k} vectors run the tensor-core kernel: leave them unset.")
        return _launch_tensor_cores(x, ws, bias, swiglu, check_pair_lookup(x.device, lookup))
    counts = [v.shape[0] // 2 if swiglu else v.shape[0] for v in ws]
    cfg = config or config_for(ws, swiglu)
    if cfg.block_k % w.blocksize or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"block_k={cfg.block_k} must be a power of two and a multiple of blocksize {w.blocksize}.")
    y = torch.empty(*x.shape[:-1], sum(counts), dtype=x.dtype, device=x.device)
    x = x.reshape(-1)  # the vectors, one after the other (contiguous)
    x16 = x.dtype != torch.float32
    if x16 and x.storage_offset() % 2:  # read as 32-bit pairs: a view starting mid-pair (a compiler's buffer) moves
        x = x.clone()
    segments = gemv4bit_mma.weight_slots(ws, counts)
    paired = _paired(swiglu)
    blocks, vectors = _row_blocks(counts, cfg, paired), x.numel() // k
    if batch_axis is None:  # the vectors on axis 0 unless the row blocks overflow axis 1 (at most 65535 programs)
        batch_axis = 0 if blocks < 65536 else 1
    grid = (vectors, blocks) if batch_axis == 0 else (blocks, vectors)
    table = pair_table(w.code, w.quant_type) if lookup == "pair" else w.code  # what the lookup reads
    f = fusion
    if f.partials is not None and f.partials.numel() != blocks:
        raise ValueError(f"{blocks} row blocks write {blocks} sums of squares, not {f.partials.numel()}.")
    n_sq = 0 if f.squares is None else f.squares.numel()
    with _on(x.device):  # Triton launches on the current GPU: make it the tensors'
        _gemv4_kernel[grid](x.view(torch.int32) if x16 else x, y, or_stand_in(bias, y), table, *segments,
                            k // 2, k // w.blocksize, or_stand_in(f.squares, y), n_sq, f.eps, or_stand_in(f.residual, y),
                            or_stand_in(f.norm_weight, y), or_stand_in(f.scaled, y), or_stand_in(f.partials, y),
                            SEGMENTS=len(ws), X16=x16, XBF16=x.dtype == torch.bfloat16,
                            NESTED=w.nested, HAS_BIAS=bias is not None, SWIGLU=swiglu, MODE=_MODE[lookup],
                            PTX=lookup != "load" and not INTERPRETER,
                            BS=w.blocksize, BS2=w.nested_blocksize, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                            EVEN_K=k % cfg.block_k == 0, BATCH_AXIS=batch_axis, NORMED=f.squares is not None,
                            SQ_BLOCK=triton.next_power_of_2(max(n_sq, 1)), RESIDUAL=f.residual is not None, PAIRED=paired,
                            num_warps=cfg.num_warps, **launch_options())
    return y


def _cuda_product(run: Callable[[], torch.Tensor], device: torch.device, kernel: Any,
                  reraise: bool = False) -> torch.Tensor | None:
    """``run()``'s product through one of glmkit's CUDA kernels (``kernel``: its module). A layout its first-run
    check did not build is compiled now (a decoder's warm-up steps, eagerly); if that or the launch fails outside a
    compile or a capture, the kernel is turned off on ``device`` and None comes back (the Triton kernels take over),
    or with ``reraise`` the error goes on (to a caller that sized its buffers for this kernel)."""
    try:
        return run()
    except Exception as exc:
        if _compiling_or_capturing():
            raise
        gemv4bit_mma.disable(device, _why(exc), kernel.NAME, kernel.LABEL)
        if reraise:
            raise
        return None


def _takes_one(x: torch.Tensor, ws: tuple[Packed4bit, ...], swiglu: bool, config: GemvConfig | None = None,
               lookup: str | None = None, batch_axis: int | None = None) -> bool:
    """Whether ``_launch`` multiplies this one token with the batch-1 CUDA kernel (``glmkit.gemv4bit_one``): no
    launch shape, lookup or grid asked for, where it is usable and passed its first-run check (``check_one``)."""
    return (config is None and lookup is None and batch_axis is None and gemv4bit_one.usable(x, ws, swiglu)
            and check_one(x.device, x.dtype))


def _paired(swiglu: bool) -> int:
    """Whether the per-row kernel gives each program a second tile of rows that shares its x (``PAIRED_ROWS``; the
    SwiGLU kernel's up rows always do)."""
    return int(PAIRED_ROWS and not swiglu)


def _row_blocks(counts: Sequence[int], cfg: GemvConfig, paired: int) -> int:
    """The programs the per-row kernel runs per vector for weights of ``counts`` rows side by side."""
    return sum(-(-n // (cfg.block_n * (1 + paired))) for n in counts)


def _on(device: torch.device) -> Any:
    """``device`` made the current GPU for the block (nothing on a CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernel_for_rows(device: torch.device | str, rows: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which of glmkit's 4-bit kernels multiplies ``rows`` tokens of ``dtype`` (bf16/fp16) by a weight of
    bitsandbytes' default blocksize on ``device`` (what ``gemv_4bit`` picks with no launch shape or lookup asked
    for): ``"per row"``, ``"CUDA, one token"`` (``glmkit.gemv4bit_one``: one row on a GPU of compute capability 8.0+,
    with plain fp32 scales; asking runs its first-run check, ``check_one``), ``"CUDA, tensor cores"``
    (``glmkit.gemv4bit_mma``: 2-8 rows there; ``check_mma``) or ``"Triton, tensor cores"``.
    ``notebooks/04_quantization.ipynb`` shows it per batch size.

    >>> kernel_for_rows("cpu", 1)
    'per row'
    """
    if rows == 1 and gemv4bit_one.runs_on(device, dtype) and check_one(device, dtype):
        return "CUDA, one token"
    if gemv4bit_mma.runs_on(device, rows, dtype) and check_mma(device, dtype):
        return "CUDA, tensor cores"
    return "Triton, tensor cores" if rows > ROW_KERNEL_MAX_VECTORS and tensor_cores(device) else "per row"


def tensor_cores(device: torch.device | str) -> bool:
    """Whether more than ``ROW_KERNEL_MAX_VECTORS`` vectors take the tensor-core kernel on ``device``: GPUs of compute
    capability 8.0 or newer (where it was built and measured; older ones keep the per-row kernel) and Triton's
    interpreter.

    >>> tensor_cores("cpu") == INTERPRETER
    True
    """
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER
    return torch.cuda.get_device_capability(device) >= (8, 0)


_PAIR_CHECKED: dict[torch.device, bool] = {}


def check_pair_lookup(device: torch.device | str, lookup: str) -> str:
    """The lookup the tensor-core kernel uses on ``device``: ``lookup``, unless it is the warp shuffle and that
    shuffle (into pairs of 16-bit values, ``_SHUFFLE_PAIR_ASM``) disagreed with table loads on a small weight the
    first time it ran on this GPU in this process: then a warning and table loads. Not checked inside a CUDA graph
    capture or a compiled function (the decoders' warm-up steps run it first, eagerly).

    >>> check_pair_lookup("cpu", "load")
    'load'
    """
    device = torch.device(device)
    if lookup != "shuffle" or device.type != "cuda":
        return lookup
    return lookup if _first_run(_PAIR_CHECKED, device, lambda: _pair_shuffle_agrees(device), True) else "load"


def _pair_shuffle_agrees(device: torch.device) -> bool:
    with torch.cuda.device(device):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(ROW_KERNEL_MAX_VECTORS + 1, 1, 256, device=device, generator=g).to(torch.bfloat16)
        w = quantize(torch.randn(64, 256, device=device, generator=g), "nf4", double_quant=True)
        return _shuffle_agrees(device, "4-bit tensor-core kernel",
                               lambda lookup: _launch_tensor_cores(x, (w,), None, False, lookup))


def _launch_tensor_cores(x: torch.Tensor, ws: tuple[Packed4bit, ...], bias: torch.Tensor | None, swiglu: bool,
                         lookup: str) -> torch.Tensor:
    """More than ``ROW_KERNEL_MAX_VECTORS`` vectors: ``_tc4_kernel`` (each weight looked up once for all of them,
    the products on the tensor cores), the columns split over enough programs to fill the GPU
    (``TC_TARGET_PROGRAMS``), then ``_tc_sum_kernel`` adds the splits' partial products (bias, SwiGLU)."""
    w = ws[0]
    k, rows = w.shape[1], [v.shape[0] for v in ws]
    n_total = sum(rows)
    n_out = n_total // 2 if swiglu else n_total
    vectors, blocks_per_row = x.numel() // k, k // w.blocksize
    row_blocks = sum(triton.cdiv(n, TC_BLOCK_N) for n in rows)
    splits, per_split, unroll = column_splits(blocks_per_row, row_blocks, TC_TARGET_PROGRAMS, TC_UNROLL)
    part = torch.empty(splits, vectors, n_total, dtype=torch.float32, device=x.device)
    segments = gemv4bit_mma.weight_slots(ws, rows)
    with _on(x.device):  # Triton launches on the current GPU: make it the tensors'
        _tc4_kernel[(row_blocks, splits)](
            x.reshape(vectors, k).contiguous(), part, w.code, *segments, vectors, k // 2, blocks_per_row, per_split,
            n_total, SEGMENTS=len(ws), NESTED=w.nested,
            SHUFFLE=lookup == "shuffle" and x.dtype != torch.float32 and not INTERPRETER,
            IEEE=x.dtype == torch.float32 or INTERPRETER, BS=w.blocksize, BS2=w.nested_blocksize, BLOCK_N=TC_BLOCK_N,
            BLOCK_B=max(16, triton.next_power_of_2(vectors)), UNROLL=unroll, num_warps=TC_WARPS, num_stages=TC_STAGES)
        y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
        _tc_sum_kernel[(triton.cdiv(n_out, 1024), vectors)](part, y, or_stand_in(bias, y), splits, vectors,
                                                            n_total, n_out, HAS_BIAS=bias is not None, SWIGLU=swiglu,
                                                            BLOCK=1024)
    return y

# The kernels as PyTorch operators (``torch.ops.glmkit.gemv_4bit``, ``..._multi``, ``..._swiglu``), opaque to
# torch.compile: dynamo records a call to the op (its output shape from the fake below) instead of tracing the
# Triton kernel, and Inductor compiles the norms, RoPE and residual adds around it while the op launches the kernel
# Triton built (Inductor's own build of this kernel failed on an H200: SubprocException). ``torch.library.triton_op``
# + ``wrap_triton`` would instead let Inductor trace into the kernel and build it itself, the step that failed; an
# opaque op also keeps the launch shape and lookup picked at run time, from the table of the card in hand.
# An op takes only tensors, ints, floats, bools and strings: a ``Packed4bit`` goes in as its tensors and numbers
# (``_weight_args``), a ``GemvConfig`` as three ints (0: pick at run time) and the lookup as a string ("": LOOKUP).
_WEIGHT_SCHEMA = ("Tensor data, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, Tensor? offset, "
                  "int rows, int columns, int blocksize, int nested_blocksize, str quant_type")
_LAUNCH_SCHEMA = "int block_n, int block_k, int num_warps, str lookup"


def _weight_args(w: Packed4bit) -> tuple:
    return (w.data, w.absmax, w.code, w.absmax2, w.code2, w.offset, w.shape[0], w.shape[1], w.blocksize,
            w.nested_blocksize, w.quant_type)


def _launch_args(config: GemvConfig | None, lookup: str | None = None) -> tuple[int, int, int, str]:
    if lookup is not None and lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, not {lookup!r}.")
    shape = (0, 0, 0) if config is None else (config.block_n, config.block_k, config.num_warps)
    return (*shape, lookup or "")


def _packed(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor | None,
            code2: torch.Tensor | None, offset: torch.Tensor | None, rows: int, columns: int, blocksize: int,
            nested_blocksize: int, quant_type: str) -> Packed4bit:
    """A ``Packed4bit`` again from an op's arguments (no bitsandbytes state: the kernels do not read it)."""
    return Packed4bit(data=data, absmax=absmax, code=code, shape=(rows, columns), blocksize=blocksize, dtype=None,
                      quant_type=quant_type, quant_state=None, absmax2=absmax2, code2=code2, offset=offset,
                      nested_blocksize=nested_blocksize)


def _config(block_n: int, block_k: int, num_warps: int) -> GemvConfig | None:
    return GemvConfig(block_n, block_k, num_warps) if block_n else None


def _fake_output(x: torch.Tensor, ws: tuple[Packed4bit, ...], swiglu: bool,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the op returns, for torch.compile's trace (checked as the kernel checks it, so errors come early)."""
    _check(x, ws, swiglu, bias)
    rows = sum(w.shape[0] for w in ws)
    return x.new_empty((*x.shape[:-1], rows // 2 if swiglu else rows))


@torch.library.custom_op("glmkit::gemv_4bit", mutates_args=(),
                         schema=f"(Tensor x, {_WEIGHT_SCHEMA}, Tensor? bias, {_LAUNCH_SCHEMA}) -> Tensor")
def _gemv_4bit_op(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                  quant_type, bias, block_n, block_k, num_warps, lookup):
    w = _packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type)
    return _launch(x, (w,), bias, False, _config(block_n, block_k, num_warps), lookup or None)


@_gemv_4bit_op.register_fake
def _(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type, bias,
      block_n, block_k, num_warps, lookup):
    w = _packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type)
    return _fake_output(x, (w,), False, bias)


@torch.library.custom_op("glmkit::gemv_4bit_swiglu", mutates_args=(),
                         schema=f"(Tensor x, {_WEIGHT_SCHEMA}, {_LAUNCH_SCHEMA}) -> Tensor")
def _gemv_4bit_swiglu_op(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                         quant_type, block_n, block_k, num_warps, lookup):
    w = _packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type)
    return _launch(x, (w,), None, True, _config(block_n, block_k, num_warps), lookup or None)


@_gemv_4bit_swiglu_op.register_fake
def _(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type,
      block_n, block_k, num_warps, lookup):
    w = _packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type)
    return _fake_output(x, (w,), True)


# several weights of one format: per weight its packed bytes, scales and rows (the nested lists empty without
# double quantization); the format (code table, columns, blocksizes) once
_MULTI_SCHEMA = ("(Tensor x, Tensor[] data, Tensor[] absmax, Tensor code, Tensor[] absmax2, Tensor[] code2, "
                 "Tensor[] offset, int[] rows, int columns, int blocksize, int nested_blocksize, str quant_type, "
                 f"Tensor? bias, {_LAUNCH_SCHEMA}) -> Tensor")


def _multi_packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                  quant_type) -> tuple[Packed4bit, ...]:
    nested = [(a2, c2, o) for a2, c2, o in zip(absmax2, code2, offset)] or [(None, None, None)] * len(data)
    return tuple(_packed(d, a, code, *n, r, columns, blocksize, nested_blocksize, quant_type)
                 for d, a, n, r in zip(data, absmax, nested, rows))


@torch.library.custom_op("glmkit::gemv_4bit_multi", mutates_args=(), schema=_MULTI_SCHEMA)
def _gemv_4bit_multi_op(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                        quant_type, bias, block_n, block_k, num_warps, lookup):
    ws = _multi_packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                       quant_type)
    return _launch(x, ws, bias, False, _config(block_n, block_k, num_warps), lookup or None)


@_gemv_4bit_multi_op.register_fake
def _(x, data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize, quant_type, bias,
      block_n, block_k, num_warps, lookup):
    ws = _multi_packed(data, absmax, code, absmax2, code2, offset, rows, columns, blocksize, nested_blocksize,
                       quant_type)
    return _fake_output(x, ws, False, bias)


def gemv_4bit(x: torch.Tensor, weight: Packed4bit, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None, lookup: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight.dequantize(), bias)`` for a few tokens ``[..., k]`` (up to ``MAX_VECTORS``), reading the
    packed weight once (the op ``torch.ops.glmkit.gemv_4bit``). ``config``/``lookup`` override the launch
    shape and nibble lookup (default: ``config_for`` and ``LOOKUP``, picked when the kernel runs); more than
    ``ROW_KERNEL_MAX_VECTORS`` tokens go through the tensor-core kernel, whose shape is ``TC_BLOCK_N`` and the
    constants beside it (``config`` is the per-row kernel's). Before capturing it in a CUDA graph, call it once
    eagerly with the same shapes: that compiles its kernels and runs their first-run checks (``check_mma``), which
    cannot run inside a capture."""
    return _gemv_4bit_op(x, *_weight_args(weight), bias, *_launch_args(config, lookup))


def gemv_4bit_multi(x: torch.Tensor, weights: Sequence[Packed4bit], bias: torch.Tensor | None = None,
                    config: GemvConfig | None = None, lookup: str | None = None) -> torch.Tensor:
    """``torch.cat([gemv_4bit(x, w) for w in weights], -1) + bias`` in one launch, for up to three weights of one
    format with the same columns (GLM's q, k and v: one kernel instead of three and a concatenation); ``bias`` is
    the concatenated bias. The launch shape is the one tuned for all their rows (``config_for``; more than
    ``ROW_KERNEL_MAX_VECTORS`` tokens: the tensor-core kernel's). The op:
    ``torch.ops.glmkit.gemv_4bit_multi``."""
    ws = tuple(weights)
    if not 1 <= len(ws) <= 3:
        raise ValueError(f"gemv_4bit_multi takes one to three weights, got {len(ws)}.")
    _check_format(ws)  # the op takes the format (code, columns, blocksizes) once: one for all, checked here
    w = ws[0]
    nested = w.nested
    return _gemv_4bit_multi_op(x, [v.data for v in ws], [v.absmax for v in ws], w.code,
                               [v.absmax2 for v in ws] if nested else [], [v.code2 for v in ws] if nested else [],
                               [v.offset for v in ws] if nested else [], [v.shape[0] for v in ws], w.shape[1],
                               w.blocksize, w.nested_blocksize, w.quant_type, bias, *_launch_args(config, lookup))


def gemv_4bit_swiglu(x: torch.Tensor, weight: Packed4bit, config: GemvConfig | None = None,
                     lookup: str | None = None) -> torch.Tensor:
    """GLM's MLP activation of up to ``MAX_VECTORS`` tokens, ``up * silu(gate)`` of a packed 4-bit gate/up weight
    ``[2n, k]`` (the op ``torch.ops.glmkit.gemv_4bit_swiglu``)."""
    return _gemv_4bit_swiglu_op(x, *_weight_args(weight), *_launch_args(config, lookup))


class NormedStream(NamedTuple):
    """A token's residual stream made ready for an RMSNorm that the next 4-bit GEMV folds in (``gemv_4bit_normed``):
    ``scaled``, the stream times the norm's weight (``x * g`` in x's dtype), and ``squares``, fp32 sums of ``x**2``
    over parts of it (their total is ``sum(x**2)``: the norm's ``1 / rms(x)`` multiplies the finished products, so no
    kernel normalises x apart). ``gemv_4bit_residual`` writes one as it adds its product to the stream (one sum a row
    block); ``normed_stream`` makes one from a stream. The fused batch-1 step of a 4-bit ``FastDecoder``.

    >>> s = normed_stream(torch.tensor([[[3.0, 4.0]]]), torch.tensor([1.0, 0.5]))
    >>> s.scaled.tolist(), s.squares.tolist()
    ([[[3.0, 2.0]]], [25.0])
    """

    scaled: torch.Tensor
    squares: torch.Tensor


if triton is not None:

    @triton.jit
    def _normed_stream_kernel(x_ptr, g_ptr, scaled_ptr, squares_ptr, K: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
        # one program: x * g (fp32 products, rounded to x's dtype) and the sum of x**2
        wait_for_previous_kernel(PDL)
        offs = tl.arange(0, BLOCK)
        ok = offs < K
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(scaled_ptr + offs, (x * g).to(scaled_ptr.dtype.element_ty), mask=ok)
        tl.store(squares_ptr, tl.sum(x * x, axis=0))


def normed_stream_torch(x: torch.Tensor, norm_weight: torch.Tensor) -> NormedStream:
    """``normed_stream`` as PyTorch computes it (five kernels on a GPU): where Triton does not run."""
    x32 = x.float()
    return NormedStream((x32 * norm_weight.float()).to(x.dtype), x32.pow(2).sum().reshape(1))


def normed_stream(x: torch.Tensor, norm_weight: torch.Tensor) -> NormedStream:
    """The ``NormedStream`` of one token's residual stream ``x`` ``[..., k]`` for the norm of weight ``norm_weight``
    ``[k]`` (the first layer's input norm: no GEMV before it writes one). One kernel where Triton runs (a GPU of
    compute capability 7.0+, or its CPU interpreter), not five PyTorch ones; else PyTorch's."""
    if x.numel() != x.shape[-1] or norm_weight.numel() != x.shape[-1]:
        raise ValueError(f"normed_stream takes one token [..., k] and a norm weight of k values, got shapes "
                         f"{tuple(x.shape)} and {tuple(norm_weight.shape)}.")
    gpu = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (7, 0)  # (where Triton compiles)
    if not (gpu or INTERPRETER) or not triton_available() or x.device != norm_weight.device:
        return normed_stream_torch(x, norm_weight)
    x, k = x.contiguous(), x.shape[-1]
    stream = NormedStream(torch.empty_like(x), torch.empty(1, dtype=torch.float32, device=x.device))
    with _on(x.device):
        _normed_stream_kernel[(1,)](x, norm_weight.contiguous(), stream.scaled, stream.squares, K=k,
                                    BLOCK=triton.next_power_of_2(k), num_warps=4, **launch_options())
    return stream


def gemv_4bit_normed(stream: NormedStream, weights: Packed4bit | Sequence[Packed4bit],
                     bias: torch.Tensor | None = None, eps: float = 1e-5, swiglu: bool = False,
                     leave_sms: int = 0) -> torch.Tensor:
    """``F.linear(rms_norm(x, g, eps), W, bias)`` of one token from its ``NormedStream`` (``x * g`` and the sums of
    ``x**2``) in one launch of the per-row kernel, with no norm kernel before it: the products of ``x * g`` are
    multiplied by ``1 / rms(x)`` as they are written (as ``glmkit.gemv.gemv``'s ``norm_weight``, but with x * g
    rounded once to x's dtype). Up to three weights side by side (q, k, v: ``gemv_4bit_multi``), or GLM's
    ``up * silu(gate)`` of a gate/up weight (``swiglu``, as ``gemv_4bit_swiglu``). ``leave_sms``: SMs the batch-1
    CUDA kernel leaves to the few programs of the kernel after it (``glmkit.gemv4bit_one.LEAVE_SMS_MAX``; only
    with programmatic dependent launch).

    >>> import torch.nn.functional as F
    >>> if triton_available():  # a GPU, or TRITON_INTERPRET=1 on a CPU
    ...     device = "cuda" if torch.cuda.is_available() else "cpu"
    ...     w, x, g = quantize(torch.randn(64, 128, device=device)), torch.randn(1, 1, 128), torch.rand(128)
    ...     x, g = x.to(device), g.to(device)
    ...     want = F.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g, w.dequantize())
    ...     assert torch.allclose(gemv_4bit_normed(normed_stream(x, g), w), want, atol=1e-4)
    """
    ws = _side_by_side(weights)
    x, squares = stream
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv_4bit_normed multiplies one token (a NormedStream of [..., k]), got {tuple(x.shape)}.")
    if squares.dtype != torch.float32 or squares.dim() != 1 or squares.device != x.device:
        raise ValueError("A NormedStream's squares are a 1-D float32 tensor on its device (normed_stream makes one).")
    return _launch(x, ws, bias, swiglu, None, fusion=_Fusion(squares=squares.contiguous(), eps=eps, leave_sms=leave_sms))


def sms_left_by(stream: NormedStream, weights: Packed4bit | Sequence[Packed4bit], programs: int) -> int:
    """SMs ``gemv_4bit_normed(stream, weights, leave_sms=programs)`` leaves to the ``programs`` programs of the kernel
    after it: one each where the batch-1 CUDA kernel runs it with programmatic dependent launch and they are few
    (``glmkit.gemv4bit_one.sms_left``), else none (the decode attention then reads a shorter first tile,
    ``glmkit.attention.decode_attention``'s ``early``).

    >>> sms_left_by(normed_stream(torch.ones(1, 1, 128), torch.ones(128)), quantize(torch.randn(64, 128)), 4)  # CPU
    0
    """
    ws = _side_by_side(weights)
    return gemv4bit_one.sms_left(stream.scaled.device, programs) if _takes_one(stream.scaled, ws, False) else 0


def gemv_4bit_residual(x: torch.Tensor, weight: Packed4bit, residual: torch.Tensor,
                       norm_weight: torch.Tensor) -> tuple[torch.Tensor, NormedStream]:
    """``residual + F.linear(x, W)`` of one token (rounded as PyTorch rounds it) in one launch of the per-row kernel,
    with the ``NormedStream`` of that sum for the norm of weight ``norm_weight`` that comes next (GLM: o_proj, then
    the post-attention norm; down_proj, then the next layer's input norm): no add or norm kernel of its own.

    >>> import torch.nn.functional as F
    >>> if triton_available():
    ...     device = "cuda" if torch.cuda.is_available() else "cpu"
    ...     w, x, r = quantize(torch.randn(64, 128, device=device)), torch.randn(1, 1, 128), torch.randn(1, 1, 64)
    ...     x, r, g = x.to(device), r.to(device), torch.rand(64, device=device)
    ...     y, after = gemv_4bit_residual(x, w, r, g)
    ...     assert torch.allclose(y, r + F.linear(x, w.dequantize()), atol=1e-4)
    ...     assert torch.allclose(after.scaled, y * g) and torch.allclose(after.squares.sum(), y.pow(2).sum())
    """
    n = weight.shape[0]
    if x.numel() != x.shape[-1] or residual.numel() != n or norm_weight.numel() != n:
        raise ValueError(f"gemv_4bit_residual takes one token [..., k], and a residual and a norm weight of the "
                         f"weight's {n} rows; got shapes {tuple(x.shape)}, {tuple(residual.shape)} and "
                         f"{tuple(norm_weight.shape)}.")
    if residual.dtype != x.dtype or residual.device != x.device or norm_weight.device != x.device:
        raise ValueError(f"gemv_4bit_residual needs x, the residual and the norm weight on one device and the residual "
                         f"in x's {x.dtype}; got {residual.dtype} on {residual.device} and {norm_weight.device}.")
    fusion = _Fusion(residual=residual.contiguous(), norm_weight=norm_weight.contiguous(),
                     scaled=torch.empty_like(residual.contiguous()))
    one = _takes_one(x, (weight,), False)
    try:
        return _residual_launch(x, weight, fusion, one)
    except Exception:
        if not one or _compiling_or_capturing():
            raise
        return _residual_launch(x, weight, fusion, False)  # the CUDA kernel failed (it is off now): the Triton kernel


def _residual_launch(x: torch.Tensor, weight: Packed4bit, fusion: _Fusion,
                     one: bool) -> tuple[torch.Tensor, NormedStream]:
    """``gemv_4bit_residual``'s launch through the batch-1 CUDA kernel (``one``: a sum of squares a tile of 16 rows)
    or the Triton kernel (a sum of squares a program)."""
    n = weight.shape[0]
    blocks = gemv4bit_one.tiles([n], False) if one else _row_blocks([n], config_for(weight), _paired(False))
    fusion = fusion._replace(partials=torch.empty(blocks, dtype=torch.float32, device=x.device))
    y = _launch(x, (weight,), None, False, None, mma=one, fusion=fusion)
    return y, NormedStream(fusion.scaled, fusion.partials)


def linear_4bit(x: torch.Tensor, weight: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of any number of rows through bitsandbytes' own ``matmul_4bit`` (what the model itself runs:
    its one-token kernel at batch 1 on a GPU, dequantize-then-GEMM beyond)."""
    import bitsandbytes as bnb

    y = bnb.matmul_4bit(x, weight.data.view(-1, 1).t(), quant_state=weight.quant_state, bias=bias)
    return y.to(x.dtype)


def reference_linear(x: torch.Tensor, weight: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_4bit`` then ``F.linear``: the reference the tests hold the kernels to."""
    return F.linear(x, weight.dequantize().to(x.dtype), bias)
