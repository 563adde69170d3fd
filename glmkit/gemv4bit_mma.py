"""4-bit products of 2-8 tokens on the tensor cores: one CUDA kernel, compiled at run time by NVRTC.

Why a CUDA kernel beside the Triton ones (``glmkit.gemv4bit``): a few tokens through a 4-bit weight cost the
lookups of its nibbles, not its bytes. Triton's per-row kernel looks every weight up again for every token, and its
tensor-core kernel moves the looked-up weights through shared memory into the operand layout. This kernel looks
each byte up once for all tokens, straight into a tensor-core operand:

* one shared-memory load turns a byte (two nibbles) into a pair of 16-bit values, from a 256-entry table of pairs
  of which every lane has its own copy (32 KiB: entry ``e`` of lane ``l`` in bank ``l``, so a warp's 32 lookups
  never wait on each other); a byte permute and a multiply-add form the address;
* that pair *is* one register of the operand: ``mma.m16n8k16`` multiplies 16 weight rows by up to 8 vectors (the
  operand's 8 columns), so the products cost a quarter of an instruction a byte;
* the 4 lanes that share a row in the operand read 8 bytes each of the same 64-weight quantization block, so each
  block's sum is scaled once, in fp32, by its scale (read from shared memory, double quantization undone once per
  program).

On an H200 it multiplies 2-8 vectors by GLM-4-9B's projections 1.4-2.0x faster than the Triton kernels, and GLM-4-9B
in nf4 decodes 2-8 sequences faster with it (``benchmarks/results/nf4_mma.json``, ``nf4_batch_mma.json``); one vector
it multiplies no faster (``MIN_VECTORS``). Each weight is rounded to x's 16-bit type before the product (the scale
is applied to each block's sum in fp32), as the Triton tensor-core kernel does. bitsandbytes' layout is read as it
is (see ``glmkit.gemv4bit``): no repacking, no second copy.

Runs on NVIDIA GPUs of compute capability 8.0+ with x in bf16 or fp16 and bitsandbytes' default blocksize (64):
``usable`` says when. ``glmkit.gemv4bit`` calls it for those and keeps its Triton kernels for the rest (and for
Triton's CPU interpreter, where the tests run): this kernel runs on a GPU only, checked there against
``dequantize`` + ``F.linear`` the first time it runs (``glmkit.gemv4bit.check_mma``;
``benchmarks/gpu_smoke_4bit.py`` checks it against float64 and the Triton kernels). ``GLMKIT_4BIT_KERNEL=triton``
turns it off. Notebook ``04_quantization.ipynb`` shows its speed.

>>> import torch
>>> from glmkit.gemv4bit import quantize
>>> if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
...     _ = torch.manual_seed(0)
...     w = quantize(torch.randn(128, 256, device="cuda"), "nf4")
...     x = torch.randn(4, 1, 256, device="cuda", dtype=torch.bfloat16)
...     y = gemv_4bit_mma(x, (w,), None, False)
...     assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, rtol=2e-2, atol=5e-2)
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmkit import gemv

__all__ = ["gemv_4bit_mma", "usable", "runs_on", "cuda_kernel_runs", "weight_slots", "compile_cubin", "nvrtc_found",
           "source", "or_stand_in", "MIN_VECTORS", "MAX_VECTORS", "MmaShape", "default_shape", "launch_shape",
           "TABLE_KERNEL"]

MAX_VECTORS = 8  # the operand's 8 columns: vector v is column v
# From 2 vectors: on an H200 (benchmarks/results/nf4_mma.json) this kernel multiplies 2-8 vectors by GLM-4-9B's
# projections 1.4-2.0x faster than the Triton kernels, but one vector no faster (0.88-1.06x): on gate_up Nsight
# Compute (nf4_mma_ncu.json) finds DRAM 34% busy and each warp waiting mostly on its loads from memory (5.2 cycles
# per issued instruction), with 21 warps an SM and 0.38 instructions a cycle per scheduler. Batch 1 stays with the
# Triton kernel. A layout for one vector that fills the GPU once (each warp streaming its own share through a ring in
# shared memory) was slower still over a layer (nf4_stream.json: 8.4 us a launch that does not grow with the
# weight, even when it only reads).
MIN_VECTORS = 2
# The launch shape, the fastest of 6 timed at 2-8 vectors on an H200 (nf4_mma.json): WARPS warps a program, each
# taking every WARPS-th 64-weight chunk of the row, UNROLL chunks loaded at a time while the ones before are summed,
# MIN_BLOCKS programs an SM (registers per thread at most 65536 / (MIN_BLOCKS * 32 * WARPS)). Gate/up (SwiGLU), whose
# warps read twice the rows, is fastest with more programs of one chunk: 38-40 us against 44 at GLM-4-9B's shape.
# `glmkit tune` measures the card in hand's (``launch_shape``).
WARPS = 8
UNROLL, MIN_BLOCKS = 2, 2
UNROLL_SWIGLU, MIN_BLOCKS_SWIGLU = 1, 3


@dataclass(frozen=True)
class MmaShape:
    """How the kernel is launched: ``warps`` warps a program, ``unroll`` 64-weight chunks a warp loads at a time while
    the ones before are summed, ``min_blocks`` programs an SM holds (registers a thread: at most 65536 / (min_blocks
    * 32 * warps)).

    >>> MmaShape(8, 2, 2).registers()
    128
    """

    warps: int
    unroll: int
    min_blocks: int

    def registers(self) -> int:
        """Registers a thread may take (``__launch_bounds__``), at most 255."""
        return min(255, 65536 // (self.min_blocks * 32 * self.warps))

    def valid(self) -> bool:
        """Whether the kernel builds at this shape: 4 to 32 warps (its first 128 threads gather the sums; 1024
        threads at most), a chunk or more at a time, a program or more an SM with at least 32 registers a thread.

        >>> MmaShape(8, 2, 2).valid(), MmaShape(2, 2, 2).valid(), MmaShape(32, 1, 4).valid()
        (True, False, False)
        """
        return 4 <= self.warps <= 32 and self.unroll >= 1 and self.min_blocks >= 1 and self.registers() >= 32


def default_shape(swiglu: bool) -> MmaShape:
    """The shape an untuned card launches (``WARPS``, ``UNROLL``, ``MIN_BLOCKS``; gate/up: ``UNROLL_SWIGLU``,
    ``MIN_BLOCKS_SWIGLU``), chosen on an H200.

    >>> default_shape(False), default_shape(True)
    (MmaShape(warps=8, unroll=2, min_blocks=2), MmaShape(warps=8, unroll=1, min_blocks=3))
    """
    return MmaShape(WARPS, UNROLL_SWIGLU if swiglu else UNROLL, MIN_BLOCKS_SWIGLU if swiglu else MIN_BLOCKS)


TABLE_KERNEL = "4bit-mma"  # this kernel's name in the launch-shape tables (nf4 and fp4 take the same kernel)


def launch_shape(rows: int, k: int, swiglu: bool) -> MmaShape:
    """The shape of a launch of ``rows`` output rows (gate/up: of one half; q/k/v: all three) of ``k`` columns: the one
    ``glmkit tune`` measured fastest on this card (the user's table, else a shipped one:
    ``glmkit.gemv.active_cuda_shapes``), else ``default_shape``."""
    return gemv.tuned_cuda_shape(TABLE_KERNEL, rows, k, MmaShape, MmaShape.valid) or default_shape(swiglu)


NAME = "glmkit_gemv4_mma"  # the kernel's name in its source
LABEL = "4-bit tensor-core kernel (2-8 tokens)"  # and in a warning
ROWS = 16  # weight rows per program: the operand's 16 rows
TABLE_BYTES = 256 * 32 * 4  # 256 pairs, one copy per lane; then the warps' sums (in its place: WARPS * 32 * NACC words)
SHARED_LIMIT = 48 * 1024  # shared memory a program may take without asking the driver for more

# What glmkit's CUDA kernels are made of (this module's, glmkit.gemv4bit_one's and glmkit.gemv16_one's): x's 16-bit
# type (BF16), cp.async's 16-byte copy, programmatic dependent launch's two steps and the wait's fence for pointers,
# the tensor-core product, and the 4-bit kernels' byte-pair lookup and lookup table
PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#ifndef F16_PRODUCTS  /* 1: the tensor cores multiply in fp16 whatever x's type (the kernel converts x) */
#define F16_PRODUCTS 0
#endif
__device__ __forceinline__ u32 to_f16(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
#if BF16
__device__ __forceinline__ u32 to16(float f) {  /* round to nearest even, as PyTorch rounds */
    u32 u = __float_as_uint(f);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ float from16(u32 h) { return __uint_as_float(h << 16); }
#else
__device__ __forceinline__ u32 to16(float f) { return to_f16(f); }
__device__ __forceinline__ float from16(u32 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h)); return f;
}
#endif
#if BF16 && !F16_PRODUCTS  /* the products' type, and the lookup table's values in it */
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
__device__ __forceinline__ u32 to_operand(float f) { return to16(f); }
#else
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
__device__ __forceinline__ u32 to_operand(float f) { return to_f16(f); }
#endif
__device__ __forceinline__ float round16(float f) { return from16(to16(f)); }

/* the pair of 16-bit values of byte i (0-7) of a lane's 8 bytes, from the lane's copy of the table (at shared
   address lane_table + 128 byte): a byte permute extracts the byte, one multiply-add forms the address */
__device__ __forceinline__ u32 pair_of(u32 lane_table, uint2 w, int i) {
    const u32 word = i < 4 ? w.x : w.y;
    u32 v, byte;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(byte) : "r"(word), "r"(0x4440 + (i & 3)));
    /* volatile: kept between the barriers that bracket the table's life (it is written, then reused for the sums) */
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(byte * 128u + lane_table));
    return v;
}

__device__ __forceinline__ void copy16(u32 dst, const void* src, bool ok) {  /* not ok: zeros (cp.async) */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

/* programmatic dependent launch (Hopper on; a no-op where the launch did not ask for it): the next kernel may
   launch now; wait for the kernel before to end (and its writes to show) */
__device__ __forceinline__ void let_next_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* p, as a value the compiler knows only after this point: a load through it cannot be hoisted above the asm before
   (griddepcontrol.wait), which it would otherwise do with a read-only input */
template <typename T> __device__ __forceinline__ T* after_wait(T* p) {
    asm volatile("" : "+l"(p) :: "memory");
    return p;
}

__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* the lookup table in smem, written by thread `thread` of `threads`: entry e of lane l at word stride * e + l
   (stride 32, or 64: every entry's 32 copies then 128 unused bytes), (code[e >> 4], code[e & 15]) in the products'
   type, the high nibble's value (the even column) in the low half; a thread writes an entry's 32 copies, 16 bytes at
   a time, starting at a different 16 bytes from its neighbours' (no two of 8 threads in one bank) */
__device__ __forceinline__ void write_table(u32* smem, const float* code, int thread, int threads, int stride = 32) {
    for (int e = thread; e < 256; e += threads) {
        const u32 v = to_operand(code[e >> 4]) | (to_operand(code[e & 15]) << 16);
#pragma unroll
        for (int i = 0; i < 8; ++i) *(uint4*)(smem + stride * e + 4 * ((i + e) & 7)) = make_uint4(v, v, v, v);
    }
}
"""

_SOURCE = PRELUDE + r"""
#if SWIGLU
#define NR 4   /* rows a lane reads: gate g, g + 8, up g, g + 8 */
#else
#define NR 2
#endif
#define NACC (2 * NR)

__device__ __forceinline__ uint2 load_weights(const unsigned char* p) {  /* read once: keep them out of L1 */
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 load_x(const u32* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

struct Weight {
    const unsigned char* q; const void* absmax; const float* absmax2; const float* code2; const float* offset; int n;
};

extern __shared__ __align__(16) u32 smem[];  /* the lookup table (TABLE words), then this program's scales */
#define TABLE (256 * 32)
static_assert(WARPS >= 4, "the sums are gathered by the first 128 threads");
static_assert(WARPS * 32 * NACC <= TABLE, "the warps' sums are gathered in the table's place");

/* a lane's rows: where each starts (at the lane's 8 bytes of its warp's first chunk) and where its scales lie in
   shared memory; x's pairs that go with those bytes */
struct Rows {
    const unsigned char* w[NR];
    const float* s[NR];
    const u32* x;
};

template <int U> struct Stage {  /* U chunks of 64 weights a row: bytes (x and scales are read as they are summed) */
    uint2 w[U][NR];
};

/* a warp's j-th chunk is chunk warp + WARPS j; stage t holds its chunks t U, ..., t U + U - 1. The last stage
   (TAIL) may run past the warp's `count` chunks: those slots read the warp's last chunk again and count 0 */
template <int U, bool TAIL>
__device__ __forceinline__ void load_stage(Stage<U>& st, int t, int count, const Rows& rows) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int j = TAIL ? min(t * U + u, count - 1) : t * U + u;
#pragma unroll
        for (int r = 0; r < NR; ++r) st.w[u][r] = load_weights(rows.w[r] + 32 * WARPS * j);
    }
}

template <int U, bool TAIL>
__device__ __forceinline__ void sum_stage(const Stage<U>& st, int t, int count, const Rows& rows, u32 table,
                                          float* acc) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int j = TAIL ? min(t * U + u, count - 1) : t * U + u;
        const uint4 xa = load_x(rows.x + 32 * WARPS * j), xb = load_x(rows.x + 32 * WARPS * j + 4);
        const u32 xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int h = 0; h < NR / 2; ++h) {  /* gate (or the only weight), then up */
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const uint2 r0 = st.w[u][2 * h], r1 = st.w[u][2 * h + 1];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                mma(d, pair_of(table, r0, 2 * i), pair_of(table, r1, 2 * i), pair_of(table, r0, 2 * i + 1),
                    pair_of(table, r1, 2 * i + 1), xw[2 * i], xw[2 * i + 1]);
            float s0 = rows.s[2 * h][WARPS * j], s1 = rows.s[2 * h + 1][WARPS * j];
            if (TAIL && t * U + u >= count) s0 = s1 = 0.0f;
            acc[4 * h + 0] += d[0] * s0;
            acc[4 * h + 1] += d[1] * s0;
            acc[4 * h + 2] += d[2] * s1;
            acc[4 * h + 3] += d[3] * s1;
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
glmkit_gemv4_mma(const u32* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias,
                 const float* __restrict__ code,
                 const unsigned char* q0, const void* a0, const float* a20, const float* c20, const float* o0, int n0,
                 const unsigned char* q1, const void* a1, const float* a21, const float* c21, const float* o1, int n1,
                 const unsigned char* q2, const void* a2, const float* a22, const float* c22, const float* o2, int n2,
                 int vectors, int bytes_per_row, int blocks_per_row, int y_row)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, quad = lane & 3;

    /* which weight (q, k or v) and which 16 rows of it */
    int tile = blockIdx.x, row_out = 0;
    Weight w = {q0, a0, a20, c20, o0, n0};
#if SEGMENTS >= 2
    int tiles = ((SWIGLU ? n0 / 2 : n0) + 15) / 16;
    if (tile >= tiles) {
        tile -= tiles; row_out = n0; w = Weight{q1, a1, a21, c21, o1, n1}; tiles = (n1 + 15) / 16;
#if SEGMENTS >= 3
        if (tile >= tiles) { tile -= tiles; row_out = n0 + n1; w = Weight{q2, a2, a22, c22, o2, n2}; }
#endif
    }
#endif
    const int n = SWIGLU ? w.n / 2 : w.n;
    const int chunks = bytes_per_row / 32;  /* 64 weights a row each: one quantization block */
    const int stride = blocks_per_row | 1;  /* the scales' row stride in shared memory: odd, so 8 rows hit 8 banks */
    float* scales = (float*)(smem + TABLE);
    Rows rows;
#pragma unroll
    for (int r = 0; r < NR; ++r) {  /* rows past the weight's end read its last row and are not stored */
        const int lr = g + 8 * (r & 1) + 16 * (r >> 1);  /* the row within this program's (gate, then up) */
        rows.w[r] = w.q + (size_t)(min(tile * 16 + (lr & 15), n - 1) + (lr >> 4) * n) * bytes_per_row + 8 * quad
                    + 32 * warp;
        rows.s[r] = scales + lr * stride + warp;
    }
    /* vector g is the operand's column g, and only column g of the product holds its sums: lanes of a column
       past the last vector read the last one (their sums are not stored) */
    rows.x = x + (size_t)min(g, vectors - 1) * bytes_per_row + 8 * quad + 32 * warp;
    const int count = (chunks - warp + WARPS - 1) / WARPS;  /* this warp's chunks */
    const int full = count / UNROLL, stages = (count + UNROLL - 1) / UNROLL;
    Stage<UNROLL> a, b;
    int t = 0;
    if (full > 0) load_stage<UNROLL, false>(a, 0, count, rows);  /* in flight while the tables are written */
    else if (stages > 0) load_stage<UNROLL, true>(a, 0, count, rows);

    write_table(smem, code, threadIdx.x, WARPS * 32);
    /* this program's scales, fp32 (double quantization undone here, once) */
    for (int lr = warp; lr < 16 * (NR / 2); lr += WARPS) {
        const int base = (min(tile * 16 + (lr & 15), n - 1) + (lr >> 4) * n) * blocks_per_row;
        for (int blk = lane; blk < blocks_per_row; blk += 32) {
            const int idx = base + blk;
#if NESTED  /* bitsandbytes' double quantization: absmax = code2[absmax_q] * absmax2[i / BS2] + offset */
            const float s = w.code2[((const unsigned char*)w.absmax)[idx]] * w.absmax2[idx / BS2] + *w.offset;
#else
            const float s = ((const float*)w.absmax)[idx];
#endif
            scales[lr * stride + blk] = s;
        }
    }
    __syncthreads();

    const u32 table = (u32)__cvta_generic_to_shared(smem) + 4 * lane;
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
    /* the next stage in flight while this one is summed; two a turn, so that neither is copied into the other */
    for (; t + 1 < full; t += 2) {
        load_stage<UNROLL, false>(b, t + 1, count, rows);
        sum_stage<UNROLL, false>(a, t, count, rows, table, acc);
        if (t + 2 < full) load_stage<UNROLL, false>(a, t + 2, count, rows);
        else if (t + 2 < stages) load_stage<UNROLL, true>(a, t + 2, count, rows);
        sum_stage<UNROLL, false>(b, t + 1, count, rows, table, acc);
    }
    if (t < full) {  /* one full stage left, maybe a tail after it */
        if (t + 1 < stages) load_stage<UNROLL, true>(b, t + 1, count, rows);
        sum_stage<UNROLL, false>(a, t, count, rows, table, acc);
        if (++t < stages) sum_stage<UNROLL, true>(b, t, count, rows, table, acc);
    } else if (t < stages) {
        sum_stage<UNROLL, true>(a, t, count, rows, table, acc);
    }

    /* the warps' partial sums, added up (in the table's place): lane l's acc[e] is row g (+8 for e & 2) of vector
       2 quad + (e & 1) */
    __syncthreads();
    float* red = (float*)smem;
#pragma unroll
    for (int i = 0; i < NACC; ++i) red[(warp * 32 + lane) * NACC + i] = acc[i];
    __syncthreads();
    if (threadIdx.x < 128) {
        const int l = threadIdx.x & 31, e = threadIdx.x >> 5;
        float sum = 0.0f;
#if SWIGLU
        float up = 0.0f;
#endif
        for (int v = 0; v < WARPS; ++v) {
            sum += red[(v * 32 + l) * NACC + e];
#if SWIGLU
            up += red[(v * 32 + l) * NACC + 4 + e];
#endif
        }
        const int r = tile * 16 + (l >> 2) + 8 * (e >> 1), vec = 2 * (l & 3) + (e & 1);
        if (r < n && vec < vectors) {
#if HAS_BIAS
            sum += from16(bias[row_out + r]);
#endif
#if SWIGLU  /* up * silu(gate), each of gate, up and silu(gate) rounded as PyTorch rounds them */
            const float gate = round16(sum);
            const float silu = round16(gate / (1.0f + expf(-gate)));
            sum = round16(up) * silu;
#endif
            y[(size_t)vec * y_row + row_out + r] = (u16)to16(sum);
        }
    }
}
"""

_KERNELS: dict[tuple[Any, ...], Any] = {}
_BROKEN: dict[tuple[int, str], str] = {}  # (device index, kernel) -> why it cannot run there (compile error, check)


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``_options``)."""
    return _SOURCE


def _options(bf16: bool, nested: bool, swiglu: bool, bias: bool, segments: int, nested_blocksize: int,
             shape: MmaShape | None = None) -> list[str]:
    shape = shape or default_shape(swiglu)
    flags = dict(BF16=int(bf16), NESTED=int(nested), SWIGLU=int(swiglu), HAS_BIAS=int(bias), SEGMENTS=segments,
                 BS2=nested_blocksize, WARPS=shape.warps, UNROLL=shape.unroll, MIN_BLOCKS=shape.min_blocks)
    return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"]


def _nvrtc() -> ctypes.CDLL:
    """NVRTC: the library PyTorch's CUDA build loads (its CUDA's major version, which the driver runs), else that
    version's from NVIDIA's wheels; on a CPU build (the tests), an nvidia-cuda-nvrtc wheel's."""
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    if major:
        try:
            from torch.cuda._utils import _get_nvrtc_library

            return _get_nvrtc_library()
        except (ImportError, OSError):
            pass
    try:
        import nvidia  # the namespace of NVIDIA's CUDA wheels
    except ImportError:
        raise OSError("NVRTC not found: install PyTorch's CUDA build, or the nvidia-cuda-nvrtc wheel.") from None
    patterns = [f"cu{major}/lib/libnvrtc.so.{major}", f"cuda_nvrtc/lib/libnvrtc.so.{major}"] if major else \
        ["cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"]
    for folder in nvidia.__path__:
        for pattern in patterns:
            for lib in sorted(Path(folder).glob(pattern)):
                return ctypes.CDLL(str(lib))
    raise OSError(f"NVRTC {major or ''} not found: install PyTorch's CUDA build, or the nvidia-cuda-nvrtc wheel.")


def nvrtc_found() -> bool:
    """Whether ``compile_cubin`` finds NVRTC here.

    >>> isinstance(nvrtc_found(), bool)
    True
    """
    try:
        _nvrtc()
    except OSError:
        return False
    return True


def compile_cubin(options: list[str], arch: str, source: str | None = None, name: str = NAME) -> bytes:
    """The kernel built by NVRTC for ``arch`` (``"sm_90"``) with ``options`` (``_options``): its cubin (``source``:
    another of glmkit's CUDA kernels, named ``name``: ``glmkit.gemv4bit_one``'s). Needs no CUDA toolkit (the kernels
    include no header); ``tests/test_gemv4bit_mma.py`` builds them for sm_90 on a CPU.

    >>> if nvrtc_found():  # PyTorch's CUDA build, or the dev extra's nvidia-cuda-nvrtc wheel
    ...     assert compile_cubin(_options(True, False, False, False, 1, 256), "sm_90")[1:4] == b"ELF"
    """
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), (source or _SOURCE).encode(), f"{name}.cu".encode(), 0, None,
                              None):
        raise RuntimeError("NVRTC could not create the program.")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        failed = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        if failed:
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile glmkit's CUDA kernel {name}:\n{log.value.decode()}")
        cubin = ctypes.create_string_buffer(0)
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == 0:
            cubin = ctypes.create_string_buffer(size.value)
        if size.value == 0 or lib.nvrtcGetCUBIN(prog, cubin):
            raise RuntimeError(f"NVRTC compiled glmkit's CUDA kernel {name} but gave no cubin for {arch}.")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _kernel(device: torch.device, options: list[str], source: str | None = None, name: str = NAME) -> Any:
    key = (device.index, name, *options)
    if key not in _KERNELS:  # (with device current: _run)
        try:
            kernel = torch.cuda._compile_kernel(source or _SOURCE, name, nvcc_options=options)
        except OSError:  # torch asks for a CUDA toolkit's headers (CUDA_HOME); this kernel includes none
            from torch.cuda._utils import _cuda_load_module

            major, minor = torch.cuda.get_device_capability(device)
            loaded = _cuda_load_module(compile_cubin(options, f"sm_{major}{minor}", source, name), [name])
            kernel = loaded[name] if isinstance(loaded, dict) else getattr(loaded, name)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def launch(device: torch.device, options: list[str], grid: tuple[int, int, int], block: tuple[int, int, int],
           args: list[Any], shared: int, source: str | None = None, name: str = NAME, pdl: bool = False) -> None:
    """Compile (once) and launch one of glmkit's CUDA kernels (this module's, or ``source`` named ``name``) with
    ``device`` current (the launch goes to the current device's context and stream, and another GPU's tensors need
    theirs), asking the driver for more than 48 KiB of shared memory where ``shared`` needs it; ``pdl``: with
    programmatic dependent launch (``launch_dependent``), for a kernel that waits (``griddepcontrol.wait``) before
    it reads or writes what the kernels before it write."""
    with torch.cuda.device(device):
        kernel = _kernel(device, options, source, name)
        if shared >= SHARED_LIMIT and getattr(kernel, "_max_shared_mem_bytes", shared) < shared:
            kernel.set_shared_memory_config(shared)
        if pdl and not dependent_launch_refused(device):
            try:
                launch_dependent(kernel, grid, block, args, shared)
                return
            except (AttributeError, OSError, DependentLaunchRefused) as exc:  # (no cuLaunchKernelEx, or refused)
                _PLAIN_ONLY.add(_index(device))
                warnings.warn(f"glmkit's CUDA 4-bit kernels: programmatic dependent launch failed on {device} "
                              f"({exc}); they launch plainly there instead.", RuntimeWarning, stacklevel=2)
        kernel(grid, block, args, shared_mem=shared)


_PLAIN_ONLY: set[int] = set()  # device indices where a launch with programmatic dependent launch failed


def dependent_launch_refused(device: torch.device) -> bool:
    """Whether a launch with programmatic dependent launch failed on ``device`` (its kernels launch plainly there)."""
    return _index(device) in _PLAIN_ONLY


class _LaunchAttribute(ctypes.Structure):  # the driver's CUlaunchAttribute: an id, then a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # the driver's CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("count", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
REFUSED = {1: "CUDA_ERROR_INVALID_VALUE", 801: "CUDA_ERROR_NOT_SUPPORTED"}  # what a driver without it answers


class DependentLaunchRefused(RuntimeError):
    """The driver does not launch with programmatic dependent launch here (``REFUSED``): launch plainly."""


@functools.cache
def _launch_kernel_ex() -> Any:
    """The driver's ``cuLaunchKernelEx`` (looked up once)."""
    from torch.cuda import _utils

    driver = getattr(_utils, "_get_gpu_runtime_library", None) or _utils._get_cuda_library  # (older torch)
    return driver().cuLaunchKernelEx


def launch_dependent(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
                     shared: int) -> None:
    """Launch a kernel torch compiled (``torch.cuda._compile_kernel``) on the current stream with programmatic
    dependent launch (``cuLaunchKernelEx``): it may start while the kernel before it finishes, and its
    ``griddepcontrol.wait`` waits for that kernel's end. Its arguments as torch's launcher passes them: a tensor
    as its address, an int as a C ``int``, a float as a C ``double``."""
    values: list[Any] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, int):
            values.append(ctypes.c_int(arg))
        elif isinstance(arg, float):
            values.append(ctypes.c_double(arg))
        else:
            raise TypeError(f"launch_dependent: an argument of type {type(arg).__name__}: tensors, ints and floats")
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared,
                           torch.cuda.current_stream()._as_parameter_, ctypes.pointer(attribute), 1)
    status = _launch_kernel_ex()(ctypes.byref(config), kernel.func, pointers, None)
    if status in REFUSED:
        raise DependentLaunchRefused(f"cuLaunchKernelEx answered {REFUSED[status]}")
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {status}")


def _shared_bytes(k: int, swiglu: bool) -> int:
    """Shared memory of one program: the lookup table, then its rows' scales (16 rows, 32 with SwiGLU)."""
    return TABLE_BYTES + (32 if swiglu else 16) * ((k // 64) | 1) * 4


def runs_on(device: torch.device | str, vectors: int, dtype: torch.dtype, *, env: bool = True) -> bool:
    """Whether this kernel takes ``vectors`` tokens of ``dtype`` on ``device``: an NVIDIA GPU of compute capability
    8.0+ where it has not been turned off (``disable``), bf16/fp16, ``MIN_VECTORS`` to ``MAX_VECTORS`` of them, and
    (``env``) ``GLMKIT_4BIT_KERNEL`` not ``triton``.

    >>> runs_on("cpu", 4, torch.bfloat16)
    False
    """
    return MIN_VECTORS <= vectors <= MAX_VECTORS and cuda_kernel_runs(device, dtype, NAME, env=env)


def cuda_kernel_runs(device: torch.device | str, dtype: torch.dtype, kernel: str, *, env: bool = True) -> bool:
    """Whether glmkit's CUDA 4-bit kernel ``kernel`` (this module's or ``glmkit.gemv4bit_one``'s) takes tokens of
    ``dtype`` on ``device``: an NVIDIA GPU of compute capability 8.0+ where it has not been turned off (``disable``),
    with torch's run-time compiler, bf16/fp16, and (``env``) ``GLMKIT_4BIT_KERNEL`` not ``triton``.

    >>> cuda_kernel_runs("cpu", torch.bfloat16, NAME)
    False
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or (env and os.environ.get("GLMKIT_4BIT_KERNEL") == "triton"):
        return False
    return (enabled(device, kernel) and hasattr(torch.cuda, "_compile_kernel")
            and torch.cuda.get_device_capability(device) >= (8, 0) and dtype in (torch.bfloat16, torch.float16))


def usable(x: torch.Tensor, ws: tuple[Any, ...], swiglu: bool = False, *, env: bool = True) -> bool:
    """Whether ``glmkit.gemv4bit`` multiplies ``x`` by these ``Packed4bit`` weights with this kernel: where it runs
    (``runs_on``: the GPU, x's dtype and vectors), bitsandbytes' default blocksize (64) with the bytes 8-byte
    aligned, and the program's shared memory within ``SHARED_LIMIT`` (rows of up to 16320 columns; 8128 for gate/up).

    >>> usable(torch.zeros(1, 64), ())
    False
    """
    if not x.is_cuda:
        return False
    w = ws[0]
    return (runs_on(x.device, x.numel() // w.shape[1], x.dtype, env=env) and w.blocksize == 64
            and all(v.data.data_ptr() % 8 == 0 for v in ws) and _shared_bytes(w.shape[1], swiglu) <= SHARED_LIMIT)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def weight_slots(ws: tuple[Any, ...], rows: Sequence[int]) -> list[Any]:
    """The three weight slots (q, k and v) of glmkit's 4-bit kernels, this one's and ``glmkit.gemv4bit``'s Triton
    kernels: per ``Packed4bit`` its packed bytes, scales, nested scales and table, offset, and the rows the kernel
    reads of it; the pointers a plain weight does not use get a tensor of the right kind, never read, and unused
    slots repeat the first (never reached: SEGMENTS)."""
    slots: list[Any] = []
    for v, n in zip(ws, rows):
        nested = v.nested
        slots += [v.data, v.absmax, v.absmax2 if nested else v.absmax, v.code2 if nested else v.code,
                  v.offset if nested else v.code, n]
    return slots + slots[:6] * (3 - len(ws))


def gemv_4bit_mma(x: torch.Tensor, ws: tuple[Any, ...], bias: torch.Tensor | None, swiglu: bool,
                  shape: MmaShape | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for up to three ``Packed4bit`` weights of one format side by side (q, k, v), or
    ``up * silu(gate)`` of one gate/up weight ``[2n, k]`` (``swiglu``), for 1-``MAX_VECTORS`` vectors ``[..., k]``;
    y in x's dtype. The caller (``glmkit.gemv4bit._launch``) has checked the inputs and ``usable``. ``shape``: the
    launch shape (default: ``launch_shape``'s, tuned for the card where ``glmkit tune`` ran)."""
    w = ws[0]
    k = w.shape[1]
    rows = [v.shape[0] for v in ws]
    n_out = rows[0] // 2 if swiglu else sum(rows)
    vectors = x.numel() // k
    xf = x.reshape(vectors, k).contiguous()
    if xf.data_ptr() % 16:  # read as 16-byte words
        xf = xf.clone()
    if bias is not None:  # read in x's type
        bias = bias.to(x.dtype).contiguous()
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    tiles = sum(-(-(n // 2 if swiglu else n) // ROWS) for n in rows)
    shape = shape or launch_shape(n_out, k, swiglu)
    options = _options(x.dtype == torch.bfloat16, w.nested, swiglu, bias is not None, len(ws), w.nested_blocksize,
                       shape)
    launch(x.device, options, (tiles, 1, 1), (shape.warps * 32, 1, 1),
         [xf, y, or_stand_in(bias, y), w.code, *weight_slots(ws, rows), vectors, k // 2,
          k // w.blocksize, n_out],
         _shared_bytes(k, swiglu))
    return y


def or_stand_in(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A kernel's pointer argument (glmkit's CUDA and Triton 4-bit kernels): ``tensor``, or a tensor never read
    there (its flag is off)."""
    return tensor if tensor is not None else stand_in


def enabled(device: torch.device, kernel: str = NAME) -> bool:
    """Whether glmkit's CUDA 4-bit kernel ``kernel`` (this module's, or ``glmkit.gemv4bit_one.NAME``) runs on
    ``device``: it has not failed there (``disable``)."""
    return (_index(torch.device(device)), kernel) not in _BROKEN


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened, as a kernel that reads it 16 bytes at a time needs it: itself where contiguous and 16-byte
    aligned, else a fresh copy (glmkit's batch-1 CUDA kernels' x, norm weight).

    >>> aligned16(torch.zeros(2, 8)).shape, aligned16(torch.zeros(8, 2).t()).is_contiguous()
    (torch.Size([16]), True)
    """
    t = t.reshape(-1)
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


class OffSwitch:
    """One of glmkit's CUDA kernels' off switch for the process: ``turned_off()`` (nested blocks count) and the
    environment variable ``env`` set to ``triton``; ``on()`` says whether neither holds (``glmkit.gemv16_one``'s,
    ``glmkit.mlp16_one``'s).

    >>> switch = OffSwitch("GLMKIT_EXAMPLE_KERNEL")
    >>> with switch.turned_off():
    ...     switch.on()
    False
    >>> switch.on()
    True
    """

    def __init__(self, env: str) -> None:
        self.env, self.depth = env, 0

    @contextmanager
    def turned_off(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def on(self) -> bool:
        return not self.depth and os.environ.get(self.env) != "triton"

    def runs_on(self, device: torch.device | str, dtype: torch.dtype, kernel: str,
                capability: tuple[int, int] = (8, 0)) -> bool:
        """Whether the CUDA kernel ``kernel`` this switches runs on ``device`` for ``dtype``: switched on,
        ``cuda_kernel_runs`` (not disabled there, bf16/fp16, compute capability 8.0+) and at least ``capability``.

        >>> OffSwitch("GLMKIT_EXAMPLE_KERNEL").runs_on("cpu", torch.bfloat16, NAME)
        False
        """
        if not (self.on() and cuda_kernel_runs(device, dtype, kernel, env=False)):
            return False
        return torch.cuda.get_device_capability(torch.device(device)) >= capability


def disable(device: torch.device, why: str, kernel: str = NAME, label: str = LABEL) -> None:
    """Stop using the CUDA kernel ``kernel`` (the warning calls it ``label``) on ``device`` for the rest of the
    process (the Triton kernels take over), warning why; glmkit's other CUDA kernel stays on."""
    key = (_index(torch.device(device)), kernel)
    if key not in _BROKEN:
        _BROKEN[key] = why
        warnings.warn(f"glmkit's {label} is off on {torch.cuda.get_device_name(device)}: "
                      f"{why}. The Triton kernels run instead (slower). Please report it.", RuntimeWarning,
                      stacklevel=3)
