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
...     w = quantize(torch.randn(128, 256, device="cuda"), "nf4")
...     x = torch.randn(4, 1, 256, device="cuda", dtype=torch.bfloat16)
...     y = gemv_4bit_mma(x, (w,), None, False)
...     assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, rtol=2e-2, atol=5e-2)
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["gemv_4bit_mma", "usable", "layout", "runs_on", "weight_slots", "compile_cubin", "nvrtc_found", "source",
           "MIN_VECTORS", "MAX_VECTORS"]

MAX_VECTORS = 8  # the operand's 8 columns: vector v is column v
# Two layouts of the same lookups and products. "tiles": a program per 16 rows, its warps splitting the row, for
# 2-8 vectors: on an H200 (benchmarks/results/nf4_mma.json) 1.4-2.0x faster than the Triton kernels. "stream": a
# grid that fills the GPU once, each warp streaming its own share of (16 rows, 64 columns) pieces, for
# 1-STREAM_MAX_VECTORS vectors. MIN_VECTORS: the fewest vectors either takes (the Triton per-row kernel below).
MIN_VECTORS = 1
STREAM_MAX_VECTORS = 1
# The tiles' launch shape, the fastest of 6 timed at 2-8 vectors on an H200 (nf4_mma.json): WARPS warps a program,
# each taking every WARPS-th 64-weight chunk of the row, UNROLL chunks loaded at a time while the ones before are
# summed, MIN_BLOCKS programs an SM (registers per thread at most 65536 / (MIN_BLOCKS * 32 * WARPS)). Gate/up
# (SwiGLU), whose warps read twice the rows, is fastest with more programs of one chunk: 38-40 us against 44.
WARPS = 8
UNROLL, MIN_BLOCKS = 2, 2
UNROLL_SWIGLU, MIN_BLOCKS_SWIGLU = 1, 3
# The stream's launch shape: STREAM_WARPS warps a program, STREAM_BLOCKS programs an SM, each warp with a ring of
# STAGES pieces (16 rows by 4 blocks) in shared memory (STAGES_SWIGLU for gate/up, whose pieces are twice the rows).
STREAM_WARPS, STREAM_BLOCKS = 16, 1
STAGES, STAGES_SWIGLU = 4, 2
SPAN = 4  # a piece's blocks a row (4, 8 or 16)
NAME, NAME_STREAM = "glmkit_gemv4_mma", "glmkit_gemv4_stream"  # the kernels' names in the source
ROWS = 16  # weight rows per program: the operand's 16 rows
TABLE_BYTES = 256 * 32 * 4  # 256 pairs, one copy per lane; then the warps' sums (WARPS <= 16)
SHARED_LIMIT = 48 * 1024  # shared memory a program may take without asking the driver for more
EXTRA_OPTIONS: list[str] = []  # benchmarks/nf4_stream_probe.py: what reading alone costs (-DPROBE=1)
PART_FLOATS = 2 * 32 * 8  # a streaming warp's parts of the tiles it shares: two (its first and last), 32 lanes x 8

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#if SWIGLU
#define NR 4   /* rows a lane reads: gate g, g + 8, up g, g + 8 */
#else
#define NR 2
#endif
#define NACC (2 * NR)

#if BF16
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
__device__ __forceinline__ u32 to16(float f) {  /* round to nearest even, as PyTorch rounds */
    u32 u = __float_as_uint(f);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ float from16(u32 h) { return __uint_as_float(h << 16); }
#else
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
__device__ __forceinline__ u32 to16(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float from16(u32 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h)); return f;
}
#endif
__device__ __forceinline__ float round16(float f) { return from16(to16(f)); }

__device__ __forceinline__ uint2 load_weights(const unsigned char* p) {  /* read once: keep them out of L1 */
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
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

__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


/* the lookup table: entry e of lane l at word 32 e + l, (code[e >> 4], code[e & 15]) in x's type, the high nibble's
   value (the even column) in the low half; a thread writes an entry's 32 copies, 16 bytes at a time, starting at a
   different 16 bytes from its neighbours' (no two of 8 threads in one bank) */
__device__ __forceinline__ void build_table(const float* code) {
    for (int e = threadIdx.x; e < 256; e += WARPS * 32) {
        const u32 v = to16(code[e >> 4]) | (to16(code[e & 15]) << 16);
#pragma unroll
        for (int i = 0; i < 8; ++i) *(uint4*)(smem + 32 * e + 4 * ((i + e) & 7)) = make_uint4(v, v, v, v);
    }
}

#if STREAM
/* ---- glmkit_gemv4_stream: every warp of a grid that fills the GPU once streams its own run of (tile, span)
   pieces, where a tile is 16 rows (16 gate and 16 up rows with SwiGLU) and a span SPAN 64-weight blocks of each of
   its rows, so that all warps read the same bytes whatever the weight's shape: no second wave, and the table is built
   once a program. A warp copies each piece into its own ring of STAGES pieces in shared memory (cp.async: 128
   contiguous bytes of each row, four rows an instruction, nothing held in registers while in flight), then reads
   each lane's 8 bytes of two rows a block from there. A tile's sum is stored by the warp that read all of it; a tile
   split between warps (at most at each end of a warp's run) is summed by the last of them to finish, in the order of
   the warps (a ticket, as in glmkit.attention): the same sums every run. */
/* SPAN: blocks of a row in a piece (4: 128 bytes, 8 lanes of 16) */
#define NROWS (8 * NR)  /* rows of a piece: 16, or 16 gate and 16 up */
#define LPR (2 * SPAN)  /* lanes that copy a row, 16 bytes each */
#define RPI (32 / LPR)  /* rows a copy instruction */
#define CI (NROWS / RPI)  /* copy instructions a piece */
#define SPL (NROWS * SPAN / 32)  /* scales a lane copies */
#define PITCH (SPAN * 32 + 32)  /* a piece's row in shared memory: 40 words, so that 4 rows of 8 lanes' 8 bytes
                                   each fall in 32 different banks */
#define STAGE_BYTES (NROWS * PITCH + (NESTED ? 0 : NROWS * SPAN * 4))  /* bytes, then fp32 scales */

struct Seg { Weight w; int row_out, tile, n; };  /* the weight a tile lies in, its first output row, the tile in it */

__device__ __forceinline__ Seg locate(int tile, const Weight& w0, const Weight& w1, const Weight& w2) {
    Seg s{w0, 0, tile, SWIGLU ? w0.n / 2 : w0.n};
#if SEGMENTS >= 2
    int tiles = (s.n + 15) / 16;
    if (s.tile >= tiles) {
        s.tile -= tiles; s.row_out = w0.n; s.w = w1; s.n = w1.n; tiles = (w1.n + 15) / 16;
#if SEGMENTS >= 3
        if (s.tile >= tiles) { s.tile -= tiles; s.row_out = w0.n + w1.n; s.w = w2; s.n = w2.n; }
#endif
    }
#endif
    return s;
}

/* the row of the weight that row lr of a piece of tile s reads (rows past the weight's end read its last row and
   are not stored) */
__device__ __forceinline__ int row_of(const Seg& s, int lr) {
    return min(s.tile * 16 + (lr & 15), s.n - 1) + (lr >> 4) * s.n;
}

/* what a lane copies of a tile: 16 bytes of rows lane / LPR + RPI i, scales of rows (lane + 32 i) / SPAN */
struct Src { const unsigned char* q; const float* absmax; int bytes[CI]; int scales[SPL]; };

__device__ __forceinline__ Src source(const Seg& s, int lane, int bytes_per_row, int blocks_per_row) {
    Src src{s.w.q, (const float*)s.w.absmax, {}, {}};
#pragma unroll
    for (int i = 0; i < CI; ++i) src.bytes[i] = row_of(s, lane / LPR + RPI * i) * bytes_per_row;
#pragma unroll
    for (int i = 0; i < SPL; ++i) src.scales[i] = row_of(s, (lane + 32 * i) / SPAN) * blocks_per_row;
    return src;
}

__device__ __forceinline__ void copy16(u32 to, const void* from, bool real) {  /* real: else zeros */
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" :: "r"(to), "l"(from), "r"(real ? 16 : 0));
}
__device__ __forceinline__ void copy4(u32 to, const void* from, bool real) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(to), "l"(from), "r"(real ? 4 : 0));
}

/* start copying span sp of a tile into the stage at shared address `to`; blocks past the row's end are not read */
__device__ __forceinline__ void copy_piece(u32 to, const Src& src, int sp, int lane, int blocks_per_row) {
    const int col = lane % LPR, blk = sp * SPAN + (col >> 1), real = blk < blocks_per_row;
#pragma unroll
    for (int i = 0; i < CI; ++i)
        copy16(to + (lane / LPR + RPI * i) * PITCH + 16 * col,
               src.q + src.bytes[i] + (real ? blk * 32 + 16 * (col & 1) : 0), real);
#if !NESTED
    const int b = sp * SPAN + lane % SPAN;
#pragma unroll
    for (int i = 0; i < SPL; ++i)
        copy4(to + NROWS * PITCH + (lane + 32 * i) * 4, src.absmax + src.scales[i] + (b < blocks_per_row ? b : 0),
              b < blocks_per_row);
#endif
}

__device__ __forceinline__ uint2 shared8(u32 at) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(at));
    return v;
}
__device__ __forceinline__ float shared4(u32 at) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(at));
    return v;
}

#ifndef PROBE
#define PROBE 0
#endif
/* a piece: for each of its blocks (n of them) and each half (gate, up), the lane's 8 bytes of rows g and g + 8
   looked up into 4 products; each block's sums scaled by its rows' scales. cbase: the lane's rows' first blocks
   (double quantization: their scales are read here) */
__device__ __forceinline__ void sum_piece(u32 st, const u32* xp, int n, int g, int quad, u32 table, const Seg& cs,
                                          const int* cbase, int first_block, float offset, float* acc) {
#pragma unroll
  for (int b0 = 0; b0 < SPAN; b0 += 4) {  /* x of 4 blocks at a time */
    if (b0 >= n) break;
    uint4 xs[8];
#pragma unroll
    for (int b = 0; b < 4; ++b)
        if (b0 + b < n) { xs[2 * b] = load_x(xp + 32 * (b0 + b)); xs[2 * b + 1] = load_x(xp + 32 * (b0 + b) + 4); }
#pragma unroll
    for (int bb = 0; bb < 4; ++bb) {
        const int b = b0 + bb;
        if (b >= n) break;
        const u32 xw[8] = {xs[2 * bb].x, xs[2 * bb].y, xs[2 * bb].z, xs[2 * bb].w,
                           xs[2 * bb + 1].x, xs[2 * bb + 1].y, xs[2 * bb + 1].z, xs[2 * bb + 1].w};
#pragma unroll
        for (int h = 0; h < NR / 2; ++h) {
            const int ra = 16 * h + g, rb = ra + 8;
            const uint2 r0 = shared8(st + ra * PITCH + 32 * b + 8 * quad), r1 = shared8(st + rb * PITCH + 32 * b + 8 * quad);
#if NESTED  /* bitsandbytes' double quantization: absmax = code2[absmax_q] * absmax2[i / BS2] + offset */
            const int i0 = cbase[2 * h] + first_block + b, i1 = cbase[2 * h + 1] + first_block + b;
            const unsigned char* aq = (const unsigned char*)cs.w.absmax;
            const float s0 = __ldg(cs.w.code2 + __ldg(aq + i0)) * __ldg(cs.w.absmax2 + i0 / BS2) + offset;
            const float s1 = __ldg(cs.w.code2 + __ldg(aq + i1)) * __ldg(cs.w.absmax2 + i1 / BS2) + offset;
#else
            const float s0 = shared4(st + NROWS * PITCH + (ra * SPAN + b) * 4);
            const float s1 = shared4(st + NROWS * PITCH + (rb * SPAN + b) * 4);
#endif
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if PROBE == 1  /* the bytes, scales and x read, nothing looked up or multiplied */
            d[0] = __uint_as_float(((r0.x ^ r0.y ^ r1.x ^ r1.y ^ xw[0] ^ xw[7]) & 0x007fffffu) | 0x3f800000u);
#else
#pragma unroll
            for (int i = 0; i < 4; ++i)
                mma(d, pair_of(table, r0, 2 * i), pair_of(table, r1, 2 * i), pair_of(table, r0, 2 * i + 1),
                    pair_of(table, r1, 2 * i + 1), xw[2 * i], xw[2 * i + 1]);
#endif
            acc[4 * h + 0] += d[0] * s0;
            acc[4 * h + 1] += d[1] * s0;
            acc[4 * h + 2] += d[2] * s1;
            acc[4 * h + 3] += d[3] * s1;
        }
    }
  }
}

/* lane l's v[e] is row g (+8 for e & 2) of vector 2 quad + (e & 1); with SwiGLU v[4 + e] is its up row */
__device__ __forceinline__ void store_tile(const float* v, const Seg& s, int g, int quad, int vectors,
                                           u16* __restrict__ y, int y_row, const u16* __restrict__ bias) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = s.tile * 16 + g + 8 * (e >> 1), vec = 2 * quad + (e & 1);
        if (r < s.n && vec < vectors) {
            float sum = v[e];
#if HAS_BIAS
            sum += from16(bias[s.row_out + r]);
#endif
#if SWIGLU  /* up * silu(gate), each of gate, up and silu(gate) rounded as PyTorch rounds them */
            const float gate = round16(sum);
            const float silu = round16(gate / (1.0f + expf(-gate)));
            sum = round16(v[4 + e]) * silu;
#endif
            y[(size_t)vec * y_row + s.row_out + r] = (u16)to16(sum);
        }
    }
}

/* the warp whose run holds piece u: runs are [floor(w W / T), floor((w + 1) W / T)) */
__device__ __forceinline__ int warp_of(long long u, long long W, int T) { return (int)(((u + 1) * T - 1) / W); }
__device__ __forceinline__ int run_start(int w, long long W, int T) { return (int)(W * w / T); }

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
glmkit_gemv4_stream(const u32* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias,
                    const float* __restrict__ code,
                    const unsigned char* q0, const void* a0, const float* a20, const float* c20, const float* o0, int n0,
                    const unsigned char* q1, const void* a1, const float* a21, const float* c21, const float* o1, int n1,
                    const unsigned char* q2, const void* a2, const float* a22, const float* c22, const float* o2, int n2,
                    int vectors, int bytes_per_row, int blocks_per_row, int y_row, int tiles, float* part, int* tickets)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, quad = lane & 3;
    const Weight w0{q0, a0, a20, c20, o0, n0}, w1{q1, a1, a21, c21, o1, n1}, w2{q2, a2, a22, c22, o2, n2};
    const int spans = (blocks_per_row + SPAN - 1) / SPAN;  /* pieces a tile */
    const long long W = (long long)tiles * spans;  /* pieces, tile after tile */
    const int T = gridDim.x * WARPS, gw = blockIdx.x * WARPS + warp;  /* T <= W: no warp's run is empty */
    const int begin = run_start(gw, W, T), end = run_start(gw + 1, W, T);
    const u32 ring = (u32)__cvta_generic_to_shared(smem) + TABLE * 4 + warp * STAGES * STAGE_BYTES;

    /* the first STAGES - 1 pieces on their way while the table is written (one group each, even if empty) */
    int lt = begin / spans, ls = begin - lt * spans;
    Src src = source(locate(lt, w0, w1, w2), lane, bytes_per_row, blocks_per_row);
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) {
        if (begin + j < end) {
            copy_piece(ring + j * STAGE_BYTES, src, ls, lane, blocks_per_row);
            if (++ls == spans) { ls = 0; src = source(locate(++lt, w0, w1, w2), lane, bytes_per_row, blocks_per_row); }
        }
        asm volatile("cp.async.commit_group;");
    }
    build_table(code);
    __syncthreads();

    const u32 table = (u32)__cvta_generic_to_shared(smem) + 4 * lane;
    /* vector g is the operand's column g (lanes past the last vector read the last one; their sums are not stored) */
    const u32* xrow = x + (size_t)min(g, vectors - 1) * bytes_per_row + 8 * quad;
    int ct = begin / spans, cp = begin - ct * spans;
    Seg cs = locate(ct, w0, w1, w2);
    int cbase[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) cbase[r] = row_of(cs, g + 8 * (r & 1) + 16 * (r >> 1)) * blocks_per_row;
    float offset = NESTED ? *cs.w.offset : 0.0f;
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
    int next = STAGES - 1, here = 0;  /* the stages the next copy goes to and this piece is read from */
    for (int u = begin; u < end; ++u) {
        if (u + STAGES - 1 < end) {
            copy_piece(ring + next * STAGE_BYTES, src, ls, lane, blocks_per_row);
            if (++ls == spans) { ls = 0; src = source(locate(++lt, w0, w1, w2), lane, bytes_per_row, blocks_per_row); }
        }
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1));  /* this piece's copy is done */
        __syncwarp();
        sum_piece(ring + here * STAGE_BYTES, xrow + 32 * SPAN * cp, min(SPAN, blocks_per_row - SPAN * cp), g, quad,
                  table, cs, cbase, SPAN * cp, offset, acc);
        __syncwarp();  /* every lane is done with the stage before the next copy into it */
        next = next + 1 == STAGES ? 0 : next + 1;
        here = here + 1 == STAGES ? 0 : here + 1;
        if (++cp < spans && u + 1 < end) continue;
        /* the end of a tile, or of the run */
        const long long t0 = (long long)ct * spans;
        if (begin <= t0 && end >= t0 + spans) {  /* all of it read here */
            store_tile(acc, cs, g, quad, vectors, y, y_row, bias);
        } else {  /* this warp's part, then the last of the tile's warps to finish adds them up, in order */
            const int first = warp_of(t0, W, T), last = warp_of(t0 + spans - 1, W, T);
            float4* mine = (float4*)(part + ((size_t)(2 * gw + (ct == begin / spans ? 0 : 1)) * 32 + lane) * NACC);
#pragma unroll
            for (int i = 0; i < NACC / 4; ++i)
                __stcg(mine + i, make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
            __threadfence();
            __syncwarp();
            int ticket = 0;
            if (lane == 0) ticket = atomicAdd(tickets + ct, 1);
            ticket = __shfl_sync(0xffffffffu, ticket, 0);
            if (ticket == last - first) {
                __threadfence();
                float v[NACC];
#pragma unroll
                for (int i = 0; i < NACC; ++i) v[i] = 0.0f;
#pragma unroll 1
                for (int w = first; w <= last; ++w) {
                    const int slot = ct == run_start(w, W, T) / spans ? 0 : 1;
                    const float4* p = (const float4*)(part + ((size_t)(2 * w + slot) * 32 + lane) * NACC);
#pragma unroll
                    for (int i = 0; i < NACC / 4; ++i) {
                        const float4 q = __ldcg(p + i);
                        v[4 * i] += q.x; v[4 * i + 1] += q.y; v[4 * i + 2] += q.z; v[4 * i + 3] += q.w;
                    }
                }
                if (lane == 0) tickets[ct] = 0;  /* ready for the next launch */
                store_tile(v, cs, g, quad, vectors, y, y_row, bias);
            }
        }
        if (u + 1 < end) {
#pragma unroll
            for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
            cp = 0;
            cs = locate(++ct, w0, w1, w2);
#pragma unroll
            for (int r = 0; r < NR; ++r) cbase[r] = row_of(cs, g + 8 * (r & 1) + 16 * (r >> 1)) * blocks_per_row;
            if (NESTED) offset = *cs.w.offset;
        }
    }
    asm volatile("cp.async.wait_group 0;");  /* nothing left in flight when the program ends */
}
#else
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

    build_table(code);
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
#endif  /* STREAM */
"""

_KERNELS: dict[tuple[Any, ...], Any] = {}
_BROKEN: dict[int, str] = {}  # device index -> why the kernel cannot run there (compile error, failed check)


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``_options``)."""
    return _SOURCE


def _options(bf16: bool, nested: bool, swiglu: bool, bias: bool, segments: int, nested_blocksize: int,
             stream: bool = False) -> list[str]:
    flags = dict(BF16=int(bf16), NESTED=int(nested), SWIGLU=int(swiglu), HAS_BIAS=int(bias), SEGMENTS=segments,
                 BS2=nested_blocksize, STREAM=int(stream))
    if stream:
        flags.update(WARPS=STREAM_WARPS, MIN_BLOCKS=STREAM_BLOCKS, STAGES=STAGES_SWIGLU if swiglu else STAGES,
                     SPAN=SPAN)
    else:
        flags.update(WARPS=WARPS, UNROLL=UNROLL_SWIGLU if swiglu else UNROLL,
                     MIN_BLOCKS=MIN_BLOCKS_SWIGLU if swiglu else MIN_BLOCKS)
    return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"] + (EXTRA_OPTIONS if stream else [])


def _name(options: list[str]) -> str:
    return NAME_STREAM if "-DSTREAM=1" in options else NAME


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


def compile_cubin(options: list[str], arch: str) -> bytes:
    """The kernel built by NVRTC for ``arch`` (``"sm_90"``) with ``options`` (``_options``): its cubin. Needs no CUDA
    toolkit (the kernel includes no header); ``tests/test_gemv4bit_mma.py`` builds it for sm_90 on a CPU.

    >>> if nvrtc_found():  # PyTorch's CUDA build, or the dev extra's nvidia-cuda-nvrtc wheel
    ...     assert compile_cubin(_options(True, False, False, False, 1, 256), "sm_90")[1:4] == b"ELF"
    """
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), _SOURCE.encode(), f"{NAME}.cu".encode(), 0, None, None):
        raise RuntimeError("NVRTC could not create the program.")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        failed = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        if failed:
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile glmkit's 4-bit kernel:\n{log.value.decode()}")
        cubin = ctypes.create_string_buffer(0)
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == 0:
            cubin = ctypes.create_string_buffer(size.value)
        if size.value == 0 or lib.nvrtcGetCUBIN(prog, cubin):
            raise RuntimeError(f"NVRTC compiled glmkit's 4-bit kernel but gave no cubin for {arch}.")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _kernel(device: torch.device, options: list[str], shared: int = 0) -> Any:
    key = (device.index, *options)
    if key not in _KERNELS:  # (with device current: _run)
        try:
            kernel = torch.cuda._compile_kernel(_SOURCE, _name(options), nvcc_options=options)
        except OSError:  # torch asks for a CUDA toolkit's headers (CUDA_HOME); this kernel includes none
            from torch.cuda._utils import _cuda_load_module

            major, minor = torch.cuda.get_device_capability(device)
            name = _name(options)
            loaded = _cuda_load_module(compile_cubin(options, f"sm_{major}{minor}"), [name])
            kernel = loaded[name] if isinstance(loaded, dict) else getattr(loaded, name)
        if shared > SHARED_LIMIT:  # asked of the driver once
            kernel.set_shared_memory_config(shared)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def _run(device: torch.device, options: list[str], grid: tuple[int, int, int], block: tuple[int, int, int],
         args: list[Any], shared: int) -> None:
    """Compile (once) and launch the kernel with ``device`` current: the launch goes to the current device's context
    and stream, and another GPU's tensors need theirs."""
    with torch.cuda.device(device):
        _kernel(device, options, shared)(grid, block, args, shared_mem=shared)


def _stream_shared_bytes(swiglu: bool, nested: bool) -> int:
    """Shared memory of one stream program: the lookup table, then each warp's ring of pieces (bytes, fp32 scales)."""
    rows = 32 if swiglu else 16
    stage = rows * (SPAN * 32 + 32) + (0 if nested else rows * SPAN * 4)  # the kernel's PITCH a row
    return TABLE_BYTES + STREAM_WARPS * (STAGES_SWIGLU if swiglu else STAGES) * stage


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
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or (env and os.environ.get("GLMKIT_4BIT_KERNEL") == "triton"):
        return False
    return (_index(device) not in _BROKEN and hasattr(torch.cuda, "_compile_kernel")
            and torch.cuda.get_device_capability(device) >= (8, 0) and dtype in (torch.bfloat16, torch.float16)
            and MIN_VECTORS <= vectors <= MAX_VECTORS)


def layout(x: torch.Tensor, ws: tuple[Any, ...], swiglu: bool = False, *, env: bool = True) -> str | None:
    """How ``glmkit.gemv4bit`` multiplies ``x`` by these ``Packed4bit`` weights with this kernel, or None where it
    does not: where it runs (``runs_on``: the GPU, x's dtype and vectors), bitsandbytes' default blocksize (64) with
    the bytes 8-byte aligned, then ``"stream"`` for 1-``STREAM_MAX_VECTORS`` vectors (16-byte aligned bytes, at least
    ``STREAM_WARPS`` pieces of 16 rows by 256 columns, a program's shared memory within what the GPU allows one, and
    inside a CUDA graph capture the scratch memory made before it), else
    ``"tiles"`` where a program's shared memory stays within ``SHARED_LIMIT`` (rows of up to 16320 columns; 8128
    for gate/up).

    >>> layout(torch.zeros(1, 64), ())
    """
    if not x.is_cuda:
        return None
    w = ws[0]
    k, vectors = w.shape[1], x.numel() // w.shape[1]
    if not (runs_on(x.device, vectors, x.dtype, env=env) and w.blocksize == 64
            and all(v.data.data_ptr() % 8 == 0 for v in ws)):
        return None
    if vectors <= STREAM_MAX_VECTORS:
        return "stream" if streams(x.device, ws, swiglu) else None
    return "tiles" if vectors >= 2 and _shared_bytes(k, swiglu) <= SHARED_LIMIT else None


def usable(x: torch.Tensor, ws: tuple[Any, ...], swiglu: bool = False, *, env: bool = True) -> bool:
    """Whether ``glmkit.gemv4bit`` multiplies ``x`` by these ``Packed4bit`` weights with this kernel (``layout``).

    >>> usable(torch.zeros(1, 64), ())
    False
    """
    return layout(x, ws, swiglu, env=env) is not None


def streams(device: torch.device, ws: tuple[Any, ...], swiglu: bool) -> bool:
    """Whether the stream layout takes these weights on ``device`` (a GPU where ``runs_on``): bytes copied 16 at a
    time (16-byte aligned), at least one piece of 16 rows by 256 columns for each warp of a program, its shared
    memory within what the GPU grants one program that asks, and inside a CUDA graph capture the scratch memory
    (``_scratch``) made before it."""
    pieces = _tiles(ws, swiglu) * -(-ws[0].shape[1] // (64 * SPAN))
    ready = not torch.cuda.is_current_stream_capturing() or _scratch(device, _tiles(ws, swiglu), make=False)
    return (all(v.data.data_ptr() % 16 == 0 for v in ws) and pieces >= STREAM_WARPS and bool(ready)
            and _stream_shared_bytes(swiglu, ws[0].nested) <= _shared_optin(device))


def _shared_optin(device: torch.device) -> int:
    """The shared memory a program may have on ``device`` when it asks (``set_shared_memory_config``)."""
    try:
        from torch.cuda._utils import _CudaKernel
    except ImportError:
        return SHARED_LIMIT
    if not hasattr(_CudaKernel, "set_shared_memory_config"):  # an older PyTorch: what every program gets
        return SHARED_LIMIT
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", SHARED_LIMIT)


def _tiles(ws: tuple[Any, ...], swiglu: bool) -> int:
    return sum(-(-(v.shape[0] // 2 if swiglu else v.shape[0]) // ROWS) for v in ws)


_SCRATCH: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_KEPT: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown scratch a captured CUDA graph may still point at


def _slots(device: torch.device) -> int:
    """Programs of the stream's grid: ``STREAM_BLOCKS`` an SM."""
    return torch.cuda.get_device_properties(device).multi_processor_count * STREAM_BLOCKS


def _scratch(device: torch.device, tiles: int, make: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stream's scratch on ``device``: a ticket per tile (zero between launches: the last warp of a tile sets it
    back) and each warp's parts of the tiles it shares. Made, or grown, outside CUDA graph captures only (``make``);
    one per GPU, for launches one after the other (one stream at a time)."""
    index = _index(device)
    have = _SCRATCH.get(index)
    if have is not None and have[0].numel() >= tiles:
        return have
    if not make:
        return None
    if have is not None:
        _KEPT.append(have)
    tickets = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    parts = torch.empty(_slots(device) * STREAM_WARPS * PART_FLOATS, dtype=torch.float32, device=device)
    _SCRATCH[index] = (tickets, parts)
    return _SCRATCH[index]


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
                  how: str | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for up to three ``Packed4bit`` weights of one format side by side (q, k, v), or
    ``up * silu(gate)`` of one gate/up weight ``[2n, k]`` (``swiglu``), for 1-``MAX_VECTORS`` vectors ``[..., k]``;
    y in x's dtype, in the layout ``how`` (``"stream"`` or ``"tiles"``; by default ``layout``'s). The caller
    (``glmkit.gemv4bit._launch``) has checked the inputs and ``usable``."""
    w = ws[0]
    k = w.shape[1]
    rows = [v.shape[0] for v in ws]
    n_out = rows[0] // 2 if swiglu else sum(rows)
    vectors = x.numel() // k
    how = how or ("stream" if vectors <= STREAM_MAX_VECTORS else "tiles")
    xf = x.reshape(vectors, k).contiguous()
    if xf.data_ptr() % 16:  # read as 16-byte words
        xf = xf.clone()
    if bias is not None:  # read in x's type
        bias = bias.to(x.dtype).contiguous()
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    tiles = _tiles(ws, swiglu)
    options = _options(x.dtype == torch.bfloat16, w.nested, swiglu, bias is not None, len(ws), w.nested_blocksize,
                       how == "stream")
    args = [xf, y, bias if bias is not None else y, w.code, *weight_slots(ws, rows), vectors, k // 2,
            k // w.blocksize, n_out]
    if how == "stream":  # as many programs as the GPU holds at once, but no warp without a piece
        if not streams(x.device, ws, swiglu):
            raise ValueError("the stream layout does not take these weights here (streams())")
        scratch = _scratch(x.device, tiles, make=not torch.cuda.is_current_stream_capturing())
        programs = max(1, min(_slots(x.device), tiles * -(-k // (64 * SPAN)) // STREAM_WARPS))
        _run(x.device, options, (programs, 1, 1), (STREAM_WARPS * 32, 1, 1), [*args, tiles, scratch[1], scratch[0]],
             _stream_shared_bytes(swiglu, w.nested))
    else:
        _run(x.device, options, (tiles, 1, 1), (WARPS * 32, 1, 1), args, _shared_bytes(k, swiglu))
    return y


def disable(device: torch.device, why: str) -> None:
    """Stop using this kernel on ``device`` for the rest of the process (the Triton kernels take over), warning why."""
    index = _index(torch.device(device))
    if index not in _BROKEN:
        _BROKEN[index] = why
        warnings.warn(f"glmkit's 4-bit tensor-core kernel is off on {torch.cuda.get_device_name(device)}: {why}. "
                      "The Triton kernels run instead (slower). Please report it.", RuntimeWarning, stacklevel=3)
