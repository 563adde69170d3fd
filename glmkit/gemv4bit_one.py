"""One token through a 4-bit weight on the tensor cores: the batch-1 CUDA kernel, compiled at run time by NVRTC.

At batch 1 glmkit's Triton kernel (``glmkit.gemv4bit``) is held back by the work it does per byte, not by memory:
two warp shuffles to look a byte's two nibbles up, two fp32 multiply-adds and x's conversions, about ten
instructions a byte (``benchmarks/results/nf4_ncu.json``). This kernel does a quarter of an instruction's products a
byte and one shared-memory load to look it up, as ``glmkit.gemv4bit_mma`` does for 2-8 tokens, but streams the bytes
the way one token needs them:

* every warp copies its own run of the weight's rows into shared memory with ``cp.async`` (whole 128-byte lines, a
  stage ahead, the block scales and x's matching part with them): no register holds a load in flight and no warp
  waits for another's bytes;
* one shared-memory load turns a byte into the pair of 16-bit values of its nibbles (a 256-entry table, a copy per
  lane: a warp's 32 lookups never wait on each other); that pair is one register of the operand of
  ``mma.m16n8k16``, which multiplies 16 rows by x;
* a CTA stays on its SM (one a SM) and its groups of warps take tiles of 16 rows (gate and up: 16 of each) in turn,
  so the table is built once a launch; each group sums its tile's warps in a fixed order (the same bits every run).

It also folds what the 4-bit one-token step folds (``glmkit.gemv4bit.gemv_4bit_normed``, ``gemv_4bit_residual``):
x may be a ``NormedStream`` (the sums are multiplied by ``1 / rms``), and the product may be added to the residual
stream, writing the next norm's ``NormedStream`` (one sum of squares a tile).

On an H200, GLM-4-9B's nf4 projections through it take 20% less time than through the Triton kernel for gate_up,
17% for down_proj, 8% for o_proj and about as long for q/k/v (``benchmarks/results/nf4_one.json``), and its
one-sequence step 12% less, 1.60x bf16's fast path (``nf4_one_step.json``); notebook ``04_quantization.ipynb``
shows both. Smaller cards get fewer warps a CTA where the H200's shape would not fit their shared memory
(``shape_for``).

Runs on NVIDIA GPUs of compute capability 8.0+ with x in bf16 or fp16, bitsandbytes' default blocksize (64) and
plain fp32 scales (double quantization takes the Triton kernel): ``usable`` says when. It is checked against
``dequantize`` + ``F.linear`` the first time it runs on a GPU (``glmkit.gemv4bit.check_one``).

>>> import torch
>>> from glmkit.gemv4bit import quantize
>>> if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
...     w = quantize(torch.randn(128, 256, device="cuda"), "nf4")
...     x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
...     y = gemv_4bit_one(x, (w,), None, False)
...     assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, rtol=2e-2, atol=5e-2)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from glmkit import gemv4bit_mma

__all__ = ["gemv_4bit_one", "usable", "runs_on", "OneShape", "shape_for", "smem_limit", "tiles", "SHAPE", "SHAPE_LONG",
           "SHAPE_SWIGLU", "source", "NAME"]

NAME = "glmkit_gemv4_one"
LABEL = "batch-1 4-bit CUDA kernel"  # its name in a warning


@dataclass(frozen=True)
class OneShape:
    """How the batch-1 CUDA kernel is launched: ``groups`` groups of ``warps`` warps a CTA (one CTA an SM), each warp
    copying ``depth`` stages ahead.

    >>> OneShape(4, 4, 2).smem_bytes(swiglu=False)  # bytes of shared memory a CTA
    123920
    """

    groups: int
    warps: int
    depth: int
    chunks: int = 4  # 64-weight chunks of each row a warp copies a stage (2 or 4)

    def stage_bytes(self, swiglu: bool) -> int:
        rows = 32 if swiglu else 16
        return rows * self.chunks * 32 + rows * self.chunks * 4 + self.chunks * 128  # bytes, scales, x

    def smem_bytes(self, swiglu: bool) -> int:
        rows = 32 if swiglu else 16
        warps = self.groups * self.warps
        return 256 * 32 * 4 + warps * self.depth * self.stage_bytes(swiglu) + warps * rows * 4 + 16


# The launch shapes, the fastest of 10 (7 for gate/up) timed on GLM-4-9B's projections on an H200
# (benchmarks/results/nf4_one.json): 16 warps an SM in 4 groups, 2 stages a warp; rows of 8192 columns or more
# (down_proj's 13696) 24 warps in 3 groups of 8, each warp's run of a row shorter
SHAPE = OneShape(4, 4, 2)
SHAPE_LONG = OneShape(3, 8, 2)
SHAPE_SWIGLU = OneShape(4, 4, 2)
LONG_ROWS = 8192


SMEM_H200 = 227 * 1024  # shared memory a CTA may ask for on an H100/H200 (shared_memory_per_block_optin)


def shape_for(k: int, swiglu: bool, smem_limit: int = SMEM_H200) -> OneShape | None:
    """The launch shape for weights of ``k`` columns (gate/up: ``swiglu``) on a GPU whose CTAs may take
    ``smem_limit`` bytes of shared memory: the H200's, with fewer groups (then fewer warps) where it would not fit
    (a consumer card's ~99 KiB); None where nothing fits (the Triton kernel runs there).

    >>> shape_for(4096, False) == SHAPE, shape_for(13696, False) == SHAPE_LONG
    (True, True)
    >>> shape_for(4096, True, 99 * 1024)  # an RTX 30/40-series card
    OneShape(groups=1, warps=4, depth=2, chunks=4)
    """
    shape = SHAPE_SWIGLU if swiglu else SHAPE_LONG if k >= LONG_ROWS else SHAPE
    while shape.smem_bytes(swiglu) > smem_limit:
        if shape.groups > 1:
            shape = replace(shape, groups=shape.groups // 2)
        elif shape.warps > 2:
            shape = replace(shape, warps=shape.warps // 2)
        else:
            return None
    return shape


def smem_limit(device: torch.device) -> int:
    """Shared memory a CTA may ask for on ``device`` (48 KiB where torch does not say)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


_SOURCE = gemv4bit_mma.PRELUDE + r"""
#if SWIGLU
#define TR 32  /* rows a tile: 16 gate rows, then their 16 up rows */
#else
#define TR 16
#endif
#define MT (TR / 16)  /* the mma's 16-row groups a tile */
/* CH (2 or 4): 64-weight chunks a stage, of each row (CH * 32 bytes) */
#define W_BYTES (TR * CH * 32)
#define S_BYTES (TR * CH * 4)
#define X_BYTES (CH * 128)
#define STAGE (W_BYTES + S_BYTES + X_BYTES)
#define TABLE (256 * 32)
#define GROUP_THREADS (WARPS * 32)

__device__ __forceinline__ void copy16(u32 dst, const void* src, bool ok) {  /* past the end: zeros */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void copy4(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(ok ? 4 : 0));
}

struct Tile { const unsigned char* q; const float* absmax; int n; int row0; int row_out; };

/* tile t of up to three weights side by side (q, k and v), each cut into tiles of 16 rows */
__device__ __forceinline__ Tile locate(int t, const unsigned char* q0, const float* a0, int n0,
                                       const unsigned char* q1, const float* a1, int n1,
                                       const unsigned char* q2, const float* a2, int n2) {
    Tile tile = {q0, a0, n0, 0, 0};
#if SEGMENTS >= 2
    const int t0 = (n0 + 15) / 16;
    if (t >= t0) {
        t -= t0; tile = Tile{q1, a1, n1, 0, n0};
#if SEGMENTS >= 3
        const int t1 = (n1 + 15) / 16;
        if (t >= t1) { t -= t1; tile = Tile{q2, a2, n2, 0, n0 + n1}; }
#endif
    }
#endif
    tile.row0 = 16 * t;
    return tile;
}

/* the weight row of tile row r (0..TR-1): rows past the end read the last (their sums are not stored) */
__device__ __forceinline__ int weight_row(const Tile& tile, int r) {
#if SWIGLU
    const int half = tile.n / 2;
    return min(tile.row0 + (r & 15), half - 1) + (r >> 4) * half;
#else
    return min(tile.row0 + r, tile.n - 1);
#endif
}

/* where 16-byte granule c16 of tile row r lies in a stage's bytes: rows of CH * 32 bytes, granules permuted per
   row so that a warp's 8-byte reads (lane (g, quad): rows g and g + 8, granule 2c + quad / 2) never share a bank */
__device__ __forceinline__ u32 granule_at(int r, int c16) {
#if CH == 4
    return r * 128 + ((c16 ^ (2 * (r & 3))) << 4);
#else
    return r * 64 + ((c16 ^ (2 * ((r >> 1) & 1))) << 4);
#endif
}

/* copy stage `local` of this warp's run of tile `tile` into slot `st` (shared address) */
__device__ __forceinline__ void copy_stage(u32 st, const Tile& tile, int chunk0, int chunk_end, int chunks,
                                           const u32* x, int lane) {
    const int bytes_per_row = chunks * 32;
#pragma unroll
    for (int j = 0; j < TR * CH / 16; ++j) {  /* bytes: granule gi = (row, 16 bytes) */
        const int gi = lane + 32 * j, r = gi / (2 * CH), c16 = gi % (2 * CH);
        const bool ok = chunk0 + (c16 >> 1) < chunk_end;
        const unsigned char* src = tile.q + (size_t)weight_row(tile, r) * bytes_per_row
                                   + (ok ? chunk0 * 32 + c16 * 16 : 0);
        copy16(st + granule_at(r, c16), src, ok);
    }
#pragma unroll
    for (int j = 0; j < TR * CH / 32; ++j) {  /* scales: [TR rows][CH chunks] */
        const int e = lane + 32 * j, r = e / CH, c = e % CH;
        const bool ok = chunk0 + c < chunk_end;
        const float* src = tile.absmax + (size_t)weight_row(tile, r) * chunks + (ok ? chunk0 + c : 0);
        copy4(st + W_BYTES + 4 * e, src, ok);
    }
    if (lane < CH * 8) {  /* x's words (pairs of 16-bit values) of the stage's chunks: [CH][32] */
        const int c = lane >> 3;
        const bool ok = chunk0 + c < chunk_end;
        copy16(st + W_BYTES + S_BYTES + 16 * lane, x + (ok ? (chunk0 + c) * 32 + (lane & 7) * 4 : 0), ok);
    }
}

/* the stage in slot st (shared address) summed into acc: lane (g, quad) holds rows g, g + 8 (+ 16, + 24) */
__device__ __forceinline__ void sum_stage(u32 st, u32 table, int g, int quad, float* acc) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int r0 = 16 * m + g, r1 = r0 + 8;
        float s0[CH], s1[CH];
#if CH == 4
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(s0[0]), "=f"(s0[1]), "=f"(s0[2]), "=f"(s0[3]) : "r"(st + W_BYTES + 16 * r0));
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(s1[0]), "=f"(s1[1]), "=f"(s1[2]), "=f"(s1[3]) : "r"(st + W_BYTES + 16 * r1));
#else
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(s0[0]), "=f"(s0[1]) : "r"(st + W_BYTES + 8 * r0));
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(s1[0]), "=f"(s1[1]) : "r"(st + W_BYTES + 8 * r1));
#endif
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            uint2 w0, w1;
            const int c16 = 2 * c + (quad >> 1);
            asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                         : "=r"(w0.x), "=r"(w0.y) : "r"(st + granule_at(r0, c16) + 8 * (quad & 1)));
            asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                         : "=r"(w1.x), "=r"(w1.y) : "r"(st + granule_at(r1, c16) + 8 * (quad & 1)));
            u32 xw[8];
            const u32 xa = st + W_BYTES + S_BYTES + c * 128 + quad * 32;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xw[0]), "=r"(xw[1]), "=r"(xw[2]), "=r"(xw[3]) : "r"(xa));
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xw[4]), "=r"(xw[5]), "=r"(xw[6]), "=r"(xw[7]) : "r"(xa + 16));
            /* two chains of two products, not one of four: each waits for half as many before it */
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < 4; i += 2) {
                mma(d, pair_of(table, w0, 2 * i), pair_of(table, w1, 2 * i), pair_of(table, w0, 2 * i + 1),
                    pair_of(table, w1, 2 * i + 1), xw[2 * i], xw[2 * i + 1]);
                mma(e, pair_of(table, w0, 2 * i + 2), pair_of(table, w1, 2 * i + 2), pair_of(table, w0, 2 * i + 3),
                    pair_of(table, w1, 2 * i + 3), xw[2 * i + 2], xw[2 * i + 3]);
            }
            acc[2 * m] += (d[0] + e[0]) * s0[c];
            acc[2 * m + 1] += (d[2] + e[2]) * s1[c];
        }
    }
}

__device__ __forceinline__ void group_sync(int group) {  /* the group's warps only (barrier 0 is the CTA's) */
    asm volatile("bar.sync %0, %1;" :: "r"(group + 1), "r"(GROUP_THREADS) : "memory");
}

extern __shared__ __align__(16) u32 smem[];

extern "C" __global__ void __launch_bounds__(GROUPS * WARPS * 32, 1)
glmkit_gemv4_one(const u32* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias,
                 const float* __restrict__ code,
                 const unsigned char* q0, const float* a0, int n0,
                 const unsigned char* q1, const float* a1, int n1,
                 const unsigned char* q2, const float* a2, int n2,
                 int chunks, int tiles, const float* __restrict__ squares, int n_squares, double eps,
                 const u16* __restrict__ residual, const u16* __restrict__ norm_weight, u16* __restrict__ scaled,
                 float* __restrict__ partials)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / WARPS, gw = warp % WARPS;  /* this warp's group, and its place in it */
    const int g = lane >> 2, quad = lane & 3;
    const int programs = gridDim.x;
    /* the group's tiles: slot = group * programs + blockIdx.x, then every programs * GROUPS tiles */
    const int first = group * programs + blockIdx.x, step = programs * GROUPS;
    const int my_tiles = first < tiles ? (tiles - first + step - 1) / step : 0;
    /* this warp's run of each row: chunks [gw * per_warp, ...), a whole number of stages */
    const int per_warp = ((chunks + WARPS - 1) / WARPS + CH - 1) / CH * CH;
    const int chunk_begin = gw * per_warp, chunk_end = min(chunk_begin + per_warp, chunks);
    const int per_tile = per_warp / CH;  /* stages a tile */
    const int total = my_tiles * per_tile;

    const u32 base = (u32)__cvta_generic_to_shared(smem);
    const u32 ring = base + TABLE * 4 + (u32)warp * DEPTH * STAGE;
    float* red = (float*)((char*)smem + TABLE * 4 + GROUPS * WARPS * DEPTH * STAGE) + group * WARPS * TR;
    float* shared_rstd = red - group * WARPS * TR + GROUPS * WARPS * TR;

#if NORMED  /* the partial sums of squares of x asked for now, summed after the table is written */
    float part[8];
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) part[j] = lane + 32 * j < n_squares ? squares[lane + 32 * j] : 0.0f;
    }
#endif
    /* the first stages in flight while the table is written */
    for (int s = 0; s < DEPTH - 1; ++s) {
        if (s < total) {
            const Tile tile = locate(first + (s / per_tile) * step, q0, a0, n0, q1, a1, n1, q2, a2, n2);
            copy_stage(ring + (s % DEPTH) * STAGE, tile, chunk_begin + (s % per_tile) * CH, chunk_end, chunks, x,
                       lane);
        }
        asm volatile("cp.async.commit_group;");
    }
    write_table(smem, code, threadIdx.x, GROUPS * WARPS * 32);
#if NORMED
    if (warp == 0) {  /* 1 / rms(x) from the partial sums of squares, added in a fixed order */
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += part[j];
        for (int i = lane + 256; i < n_squares; i += 32) sum += squares[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) *shared_rstd = 1.0f / sqrtf(sum / (float)(64 * chunks) + (float)eps);
    }
#endif
    __syncthreads();
#if NORMED
    const float rstd = *shared_rstd;
#endif
    const u32 table = base + 4 * lane;

    float acc[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) acc[i] = 0.0f;
    for (int s = 0; s < total; ++s) {
        const int ahead = s + DEPTH - 1;
        if (ahead < total) {
            const Tile tile = locate(first + (ahead / per_tile) * step, q0, a0, n0, q1, a1, n1, q2, a2, n2);
            copy_stage(ring + (ahead % DEPTH) * STAGE, tile, chunk_begin + (ahead % per_tile) * CH, chunk_end, chunks,
                       x, lane);
        }
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group %0;" :: "n"(DEPTH - 1));
        __syncwarp();
        sum_stage(ring + (s % DEPTH) * STAGE, table, g, quad, acc);
        __syncwarp();
        if (s % per_tile != per_tile - 1) continue;

        /* the tile's last stage: its warps' sums, added in order, and what comes after the product */
        if (quad == 0) {
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                red[gw * TR + 16 * m + g] = acc[2 * m];
                red[gw * TR + 16 * m + g + 8] = acc[2 * m + 1];
            }
        }
#pragma unroll
        for (int i = 0; i < 2 * MT; ++i) acc[i] = 0.0f;
        group_sync(group);
        if (gw == 0) {
            const Tile tile = locate(first + (s / per_tile) * step, q0, a0, n0, q1, a1, n1, q2, a2, n2);
            const int r = lane & 15, row = tile.row0 + r;
            const int n = SWIGLU ? tile.n / 2 : tile.n;
            const bool stored = lane < 16 && row < n;
            float sum = 0.0f;
#if SWIGLU
            float up = 0.0f;
#endif
            for (int v = 0; v < WARPS; ++v) {
                sum += red[v * TR + r];
#if SWIGLU
                up += red[v * TR + 16 + r];
#endif
            }
#if NORMED
            sum *= rstd;
#if SWIGLU
            up *= rstd;
#endif
#endif
#if HAS_BIAS
            if (stored) sum += from16(bias[tile.row_out + row]);
#endif
#if SWIGLU  /* up * silu(gate), each of gate, up and silu(gate) rounded as PyTorch rounds them */
            const float gate = round16(sum);
            const float silu = round16(gate / (1.0f + expf(-gate)));
            sum = round16(up) * silu;
#endif
#if RESIDUAL  /* r + W x, W x rounded first, then the next norm's x * g and this tile's sum of squares */
            float square = 0.0f;
            if (stored) {
                sum = round16(round16(sum) + from16(residual[row]));
                scaled[row] = (u16)to16(sum * from16(norm_weight[row]));
                square = sum * sum;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) square += __shfl_xor_sync(0xffffffffu, square, o);
            if (lane == 0) partials[first + (s / per_tile) * step] = square;
#endif
            if (stored) y[tile.row_out + row] = (u16)to16(sum);
        }
        group_sync(group);
    }
    asm volatile("cp.async.wait_group 0;");
}
"""


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``_options``)."""
    return _SOURCE


def _options(bf16: bool, swiglu: bool, bias: bool, segments: int, normed: bool, residual: bool,
             shape: OneShape) -> list[str]:
    flags = dict(BF16=int(bf16), SWIGLU=int(swiglu), HAS_BIAS=int(bias), SEGMENTS=segments, NORMED=int(normed),
                 RESIDUAL=int(residual), GROUPS=shape.groups, WARPS=shape.warps, DEPTH=shape.depth, CH=shape.chunks)
    return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"]


def runs_on(device: torch.device | str, dtype: torch.dtype, *, env: bool = True) -> bool:
    """Whether this kernel takes one token of ``dtype`` on ``device``: an NVIDIA GPU of compute capability 8.0+ where
    this kernel is not turned off (``gemv4bit_mma.disable(device, why, NAME, LABEL)``), bf16/fp16, and (``env``)
    ``GLMKIT_4BIT_KERNEL`` not ``triton``.

    >>> runs_on("cpu", torch.bfloat16)
    False
    """
    return gemv4bit_mma.cuda_kernel_runs(device, dtype, NAME, env=env)


def usable(x: torch.Tensor, ws: tuple[Any, ...], swiglu: bool = False, *, env: bool = True) -> bool:
    """Whether ``glmkit.gemv4bit`` multiplies the one token ``x`` by these ``Packed4bit`` weights with this kernel:
    where it runs (``runs_on``) with a launch shape that fits its shared memory (``shape_for``), bitsandbytes'
    default blocksize (64), fp32 scales (no double quantization) and the bytes 16-byte aligned.

    >>> usable(torch.zeros(1, 64), ())
    False
    """
    if not x.is_cuda or x.numel() != x.shape[-1]:
        return False
    readable = all(v.blocksize == 64 and not v.nested and v.data.data_ptr() % 16 == 0
                   and v.absmax.dtype == torch.float32 and v.absmax.is_contiguous() for v in ws)
    return readable and runs_on(x.device, x.dtype, env=env) and \
        shape_for(x.shape[-1], swiglu, smem_limit(x.device)) is not None


def _programs(device: torch.device, tiles: int) -> int:
    """CTAs a launch: one an SM, fewer when there are fewer tiles (tile t goes to CTA t % CTAs, so the SMs share
    the tiles evenly and a CTA's groups take them in turn)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms, tiles))


def gemv_4bit_one(x: torch.Tensor, ws: tuple[Any, ...], bias: torch.Tensor | None, swiglu: bool,
                  squares: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
                  norm_weight: torch.Tensor | None = None, scaled: torch.Tensor | None = None,
                  partials: torch.Tensor | None = None, shape: OneShape | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` of one token ``[..., k]`` for up to three ``Packed4bit`` weights side by side (q, k, v),
    or ``up * silu(gate)`` of a gate/up weight (``swiglu``); with ``squares`` (a ``NormedStream``'s), x is ``x * g``
    and the sums are multiplied by ``1 / rms``; with ``residual``, ``residual + W x`` is returned and the next norm's
    ``x * g`` written to ``scaled`` and one sum of squares a tile to ``partials`` (``tiles`` of them). The caller
    (``glmkit.gemv4bit``) has checked the inputs and ``usable``."""
    w = ws[0]
    k = w.shape[1]
    rows = [v.shape[0] for v in ws]
    n_out = rows[0] // 2 if swiglu else sum(rows)
    shape = shape or shape_for(k, swiglu, smem_limit(x.device))
    xf = x.reshape(k)
    if xf.data_ptr() % 16 or not xf.is_contiguous():  # copied 16 bytes at a time: a fresh, aligned copy
        xf = xf.clone(memory_format=torch.contiguous_format)
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    t = tiles(rows, swiglu)
    slots: list[Any] = []
    for v, n in zip(ws, rows):
        slots += [v.data, v.absmax, n]
    slots += slots[:3] * (3 - len(ws))
    stand_in = y
    options = _options(x.dtype == torch.bfloat16, swiglu, bias is not None, len(ws), squares is not None,
                       residual is not None, shape)
    # (eps goes as a Python float, which torch's launcher passes as a C double: the kernel takes a double)
    args = [xf, y, bias.to(x.dtype).contiguous() if bias is not None else stand_in, w.code, *slots, k // 64, t,
            squares if squares is not None else stand_in, 0 if squares is None else squares.numel(), float(eps),
            residual if residual is not None else stand_in,
            norm_weight.to(x.dtype).contiguous() if norm_weight is not None else stand_in,
            scaled if scaled is not None else stand_in, partials if partials is not None else stand_in]
    gemv4bit_mma.launch(x.device, options, (_programs(x.device, t), 1, 1),
                        (shape.groups * shape.warps * 32, 1, 1), args, shape.smem_bytes(swiglu), _SOURCE, NAME)
    return y


def tiles(rows: list[int], swiglu: bool) -> int:
    """Tiles of 16 rows (gate/up: 16 of each) of weights of ``rows`` rows side by side: the sums of squares a
    residual launch writes.

    >>> tiles([4096], False), tiles([27392], True)
    (256, 856)
    """
    return sum(-(-(n // 2 if swiglu else n) // 16) for n in rows)
