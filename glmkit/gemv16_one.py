"""One token through a 16-bit weight on the tensor cores: the batch-1 CUDA kernel for q/k/v and o_proj (NVRTC).

glmkit's Triton GEMV (``glmkit.gemv``) holds each weight load in flight in registers: to keep enough bytes in flight
on an H200 its q/k/v launch fills every SM's registers with small programs (2304 of 2 warps). The decode attention
that comes next then finds no room on any SM until q/k/v ends, and only then reads its first cache tile. This kernel
keeps its loads in flight in shared memory instead, as ``glmkit.gemv4bit_one`` does for 4-bit weights:

* one CTA an SM, in groups of warps that take tiles of 16 rows in turn; each warp copies its own run of a tile's
  columns into a ring in shared memory with ``cp.async`` (16 bytes a lane, whole 64-byte runs of 8 rows an
  instruction), its first stages before it waits for the kernel before (programmatic dependent launch);
* ``mma.m16n8k16`` multiplies 16 rows by x straight from those bytes: a lane's 16 bytes of a row are its part of
  the operand, and every lane gives x's values of its own columns, so each of the product's 8 columns is the sum;
* the RMSNorm before it is folded in (the operand is x times the norm's weight, rounded to x's type; the sums are
  multiplied by ``1 / rms``, which every CTA forms from x while its first stages arrive), and the bias or the residual
  add after it (``r + W x``, ``W x`` rounded first);
* launched with programmatic dependent launch before a kernel of few programs (the decode attention at batch 1 on a
  short cache), it leaves an SM to each of them (``leave_sms``): they start while it runs and read their cache tiles
  meanwhile.

``FastDecoder``'s bf16 batch-1 step runs q/k/v and o_proj through it where q/k/v then leaves SMs to the decode
attention (``glmkit.fast_decode.gemv16_sms_left``): GLM-4-9B's step took 1.5-1.6% less time around 160 cached tokens
on four H200s, the same below 128 (``benchmarks/results/gemv16_step*.json``); notebook ``05_tuning.ipynb`` teaches it.
It is checked against ``F.linear`` in fp32 the first time it runs on a GPU (``check``); a disagreement or an error
turns it off for the process, with a warning, and the Triton kernel runs. ``GLMKIT_16BIT_KERNEL=triton`` turns it
off.

>>> import torch
>>> if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
...     w = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16) * 0.05
...     x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
...     assert torch.allclose(gemv_16_one(x, w).float(), x.float() @ w.float().T, rtol=2e-2, atol=2e-2)
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from glmkit import gemv, gemv4bit_mma, gemv4bit_one
from glmkit.gemv4bit import _NOT_HERE, _checked
from glmkit.gemv4bit_mma import or_stand_in
from glmkit.gemv4bit_one import LEAVE_SMS_MAX, SMEM_H200, smem_limit, sms_left  # (the 4-bit batch-1 kernel's)

__all__ = ["gemv_16_one", "usable", "takes", "runs_on", "turned_off", "check", "Shape16", "ROLES", "LATE_ROLES", "shape_for",
           "launch_shape", "TABLE_KERNEL",
           "source", "NAME", "STAGE_COLUMNS", "LEAVE_SMS_MAX", "sms_left"]

NAME = "glmkit_gemv16_one"
LABEL = "batch-1 16-bit CUDA kernel"  # its name in a warning
STAGE_COLUMNS = 128  # columns of a stage (16 rows: 4 KiB); a warp's run of a row is a whole number of stages


@dataclass(frozen=True)
class Shape16:
    """How the kernel is launched: ``groups`` groups of ``warps`` warps a CTA (one CTA an SM), each warp with a ring
    of ``depth`` stages, ``early`` of them copied before it waits for the kernel before (at most ``depth - 1``).

    >>> Shape16(4, 4, 3, 2).smem_bytes(4096)
    205904
    """

    groups: int
    warps: int
    depth: int
    early: int

    def valid(self) -> bool:
        """Whether the kernel builds at this shape: at most 15 groups (each syncs on a hardware barrier of its own,
        the CTA on barrier 0), at most 1024 threads, a stage or more a warp's ring, 0 to depth - 1 copied early.

        >>> Shape16(4, 4, 3, 2).valid(), Shape16(16, 2, 3, 2).valid(), Shape16(2, 8, 2, 2).valid()
        (True, False, False)
        """
        return (1 <= self.groups <= 15 and self.warps >= 1 and self.groups * self.warps <= 32 and self.depth >= 1
                and 0 <= self.early < self.depth)

    def smem_bytes(self, k: int) -> int:
        """Shared memory a CTA takes for rows of ``k`` columns: the warps' rings and sums (``x_at``), then x in
        16 bits and one sum of squares a warp."""
        return self.x_at() + 2 * k + 4 * self.groups * self.warps

    def x_at(self) -> int:
        """Where x starts in a CTA's shared memory (the kernel's ``X_AT``): after every warp's ring of ``depth``
        stages (16 rows of ``STAGE_COLUMNS`` 16-bit values) and the warps' sums of a tile (16 each, then 16 bytes).

        >>> Shape16(4, 4, 3, 2).x_at()
        197648
        """
        warps = self.groups * self.warps
        return warps * self.depth * 16 * STAGE_COLUMNS * 2 + warps * 16 * 4 + 16


# The launch shape of each projection the fast step gives this kernel, the fastest of those timed in the step on H200s
# (benchmarks/results/gemv16_variants.json): q/k/v (4608 rows: 288 tiles) in 4 groups of 4 warps, o_proj (256 tiles)
# in 2 groups of 8 (with 4 groups of 4 a step took 4900 µs against 4694), 3 stages a warp, 2 of them copied early.
# `glmkit tune` times them in the step on the card in hand (glmkit.step_tuning; launch_shape reads what it keeps).
ROLES = {"qkv": Shape16(4, 4, 3, 2), "o_proj": Shape16(2, 8, 3, 2)}
# Where the next kernel is one of glmkit's Triton GEMVs (o_proj, then gate/up), this kernel lets it launch only as
# each CTA ends: launched first thing, gate/up's small programs would start on SMs still set out for this kernel's
# shared memory, with little L1 left, and run slower there (GLM-4-9B bf16 on an H200: a step 4822 µs against 4571)
LATE_ROLES = ("o_proj",)


def shape_for(k: int, smem_limit: int = SMEM_H200, role: str = "qkv") -> Shape16 | None:
    """The launch shape of projection ``role`` (``ROLES``) for rows of ``k`` columns on a GPU whose CTAs may take
    ``smem_limit`` bytes of shared memory, with fewer groups, then fewer warps, where it would not fit; None where a
    row is not whole stages of every warp's run at the role's shape (rows of 1024 columns and more, as measured), or
    nothing fits (the Triton kernel runs there).

    >>> shape_for(4096), shape_for(4096, 99 * 1024), shape_for(4100), shape_for(4096, role="o_proj").warps
    (Shape16(groups=4, warps=4, depth=3, early=2), Shape16(groups=1, warps=4, depth=3, early=2), None, 8)
    """
    if role not in ROLES:
        raise ValueError(f"glmkit.gemv16_one has launch shapes for {sorted(ROLES)}, not {role!r}.")
    shape = ROLES[role]
    if k % (shape.warps * STAGE_COLUMNS):
        return None
    while shape.smem_bytes(k) > smem_limit:
        if shape.groups > 1:
            shape = replace(shape, groups=shape.groups // 2)
        elif shape.warps > 2 and k % (shape.warps // 2 * STAGE_COLUMNS) == 0:
            shape = replace(shape, warps=shape.warps // 2)
        else:
            return None
    return shape


TABLE_KERNEL = "16bit-one"  # this kernel's name in the launch-shape tables (bf16 and fp16 take the same shapes)


def launch_shape(device: torch.device, n: int, k: int, role: str = "qkv") -> Shape16 | None:
    """The shape of projection ``role``'s launch on ``device`` for a weight ``[n, k]``: the one ``glmkit tune`` measured
    fastest in the decode step on this card (``glmkit.gemv.active_cuda_shapes``) where it fits, else ``shape_for``'s."""
    limit = smem_limit(device)

    def fits(shape: Shape16) -> bool:
        return shape.valid() and shape.smem_bytes(k) <= limit and k % (shape.warps * STAGE_COLUMNS) == 0
    return gemv.tuned_cuda_shape(TABLE_KERNEL, n, k, Shape16, fits) or shape_for(k, limit, role)


_SOURCE = gemv4bit_mma.PRELUDE + r"""
#define TR 16                       /* rows a tile */
#define SC 128                      /* columns a stage */
#define ROW_BYTES (SC * 2)          /* 256: 16 granules of 16 bytes */
#define STAGE (TR * ROW_BYTES)      /* 4 KiB */
#define WARPS_ALL (GROUPS * WARPS)
#define RING (DEPTH * STAGE)
#define RED_AT (WARPS_ALL * RING)
#define X_AT (RED_AT + WARPS_ALL * 16 * 4 + 16)
#define GROUP_THREADS (WARPS * 32)
#ifdef EXPECT_X_AT  /* (the tests: the layout the Python side sizes, Shape16.x_at) */
static_assert(X_AT == EXPECT_X_AT, "X_AT: the layout differs from the shared memory asked for");
#endif


/* granule c16 (0-15) of stage row r, swizzled so that a quarter warp's 16-byte accesses (2 rows x 4 granules) fall
   in 8 different groups of 4 banks */
__device__ __forceinline__ u32 granule_at(int r, int c16) { return r * ROW_BYTES + ((c16 ^ (4 * (r & 1))) << 4); }

__device__ __forceinline__ void group_sync(int group) {
    asm volatile("bar.sync %0, %1;" :: "r"(group + 1), "r"(GROUP_THREADS) : "memory");
}

extern __shared__ __align__(16) u32 smem[];

extern "C" __global__ void __launch_bounds__(GROUPS * WARPS * 32, 1)
glmkit_gemv16_one(const u16* x, u16* __restrict__ y, const u16* w, int n, int k, const u16* bias,
                  const u16* norm_weight, double eps, const u16* residual)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / WARPS, gw = warp % WARPS;
    const int g = lane >> 2, quad = lane & 3;
    const int tiles = (n + TR - 1) / TR;
    const int first = group * gridDim.x + blockIdx.x, step = gridDim.x * GROUPS;
    const int my_tiles = first < tiles ? (tiles - first + step - 1) / step : 0;
    const int run = k / WARPS;            /* a warp's columns of a row: whole stages (the caller checks) */
    const int col_begin = gw * run;
    const int per_tile = run / SC;
    const int total = my_tiles * per_tile;
#if !LATE
    let_next_launch();
#endif

    const u32 base = (u32)__cvta_generic_to_shared(smem);
    u32 dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (dynamic_bytes < X_AT + 2 * k + 4 * WARPS_ALL || run % SC) {  /* not the layout asked for: NaNs, no sums */
        wait_for_previous();
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
            y[i] = (u16)to16(__int_as_float(0x7fc00000));
        return;
    }
    const u32 ring = base + warp * RING;
    float* red = (float*)((char*)smem + RED_AT) + group * WARPS * 16;

    /* lane (r, q) copies granules q, q + 4, q + 8, q + 12 of tile rows r and r + 8 */
    const int cr = lane >> 2, cq = lane & 3;
    const u16* src = w;
    u32 rows_ok = 0;
    int copied = 0, slot_in = 0, stage_in = 0, tile_in = first;
    auto begin_tile = [&](int t) {
        const int row0 = t * TR;
        src = w + (size_t)(row0 + cr) * k + col_begin + cq * 8;
        rows_ok = (u32)(row0 + cr < n) | ((u32)(row0 + cr + 8 < n) << 1);
    };
    if (my_tiles > 0) begin_tile(first);
    auto copy_next = [&]() {
        if (copied < total) {
            const u32 st = ring + slot_in * STAGE;
#pragma unroll
            for (int v = 0; v < 2; ++v) {
                const bool ok = (rows_ok >> v) & 1;
                const u16* row = src + (size_t)v * 8 * k;
#pragma unroll
                for (int h = 0; h < 4; ++h)
                    copy16(st + granule_at(cr + 8 * v, cq + 4 * h), ok ? (const void*)(row + 32 * h) : (const void*)w, ok);
            }
            src += SC;
            ++copied;
            if (++stage_in == per_tile && copied < total) {
                stage_in = 0;
                tile_in += step;
                begin_tile(tile_in);
            }
        }
        slot_in = slot_in + 1 == DEPTH ? 0 : slot_in + 1;
        asm volatile("cp.async.commit_group;");
    };
    /* the first stages in flight while the kernel before ends; then what it wrote */
    for (int s = 0; s < EARLY; ++s) copy_next();
    wait_for_previous();
    x = after_wait(x);
    bias = after_wait(bias);
    norm_weight = after_wait(norm_weight);
    residual = after_wait(residual);
    for (int s = EARLY; s < DEPTH - 1; ++s) copy_next();

    /* x into shared memory as the operand (with the norm: x times its weight, rounded; the sums are multiplied by
       1 / rms at the tile's end, from the warps' sums of squares added in a fixed order) */
    u16* xs = (u16*)((char*)smem + X_AT);
    constexpr int THREADS = GROUPS * WARPS * 32;
#if NORM
    float sq = 0.0f;
    for (int i = threadIdx.x; i < k / 8; i += THREADS) {
        const uint4 v = ((const uint4*)x)[i], gv = ((const uint4*)norm_weight)[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w}, g4[4] = {gv.x, gv.y, gv.z, gv.w};
        u32 out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float a = from16(words[j] & 0xFFFFu), b = from16(words[j] >> 16);
            sq += a * a + b * b;
            out[j] = to16(a * from16(g4[j] & 0xFFFFu)) | (to16(b * from16(g4[j] >> 16)) << 16);
        }
        ((uint4*)xs)[i] = make_uint4(out[0], out[1], out[2], out[3]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    float* squares = (float*)((char*)smem + X_AT + 2 * k);  /* one a warp */
    if (lane == 0) squares[warp] = sq;
#else
    for (int i = threadIdx.x; i < k / 8; i += THREADS) ((uint4*)xs)[i] = ((const uint4*)x)[i];
#endif
    __syncthreads();
#if NORM
    float rstd;
    {
        float s = 0.0f;
        for (int i = 0; i < WARPS_ALL; ++i) s += squares[i];
        rstd = 1.0f / sqrtf(s / (float)k + (float)eps);
    }
#endif

    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int slot = 0, stage = 0, tile_index = first;
    float early_add = 0.0f;  /* the tile's bias or residual, asked for as the tile starts */
    const u32 x_lane = base + X_AT + 2 * (col_begin + 8 * quad);
    u32 x_at = x_lane;
    for (int s = 0; s < total; ++s) {
        copy_next();
#if HAS_BIAS || RESIDUAL
        if (stage == 0 && gw == 0 && lane < 16 && tile_index * TR + lane < n) {
#if HAS_BIAS
            early_add = from16(bias[tile_index * TR + lane]);
#else
            early_add = from16(residual[tile_index * TR + lane]);
#endif
        }
#endif
        asm volatile("cp.async.wait_group %0;" :: "n"(DEPTH - 1));
        __syncwarp();
        const u32 st = ring + slot * STAGE;
#pragma unroll
        for (int c = 0; c < SC / 32; ++c) {  /* 32 columns: lane (g, quad) has 8 of rows g and g + 8 */
            uint4 w0, w1, xv;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(w0.x), "=r"(w0.y), "=r"(w0.z), "=r"(w0.w) : "r"(st + granule_at(g, 4 * c + quad)));
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(w1.x), "=r"(w1.y), "=r"(w1.z), "=r"(w1.w) : "r"(st + granule_at(g + 8, 4 * c + quad)));
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xv.x), "=r"(xv.y), "=r"(xv.z), "=r"(xv.w) : "r"(x_at + 64 * c));
            mma(d, w0.x, w1.x, w0.y, w1.y, xv.x, xv.y);
            mma(e, w0.z, w1.z, w0.w, w1.w, xv.z, xv.w);
        }
        __syncwarp();
        slot = slot + 1 == DEPTH ? 0 : slot + 1;
        x_at += 2 * SC;
        if (++stage != per_tile) continue;
        stage = 0;
        x_at = x_lane;
        /* the tile's end: the warps' sums of rows g and g + 8, added in order by the group's first warp */
        if (quad == 0) {
            red[gw * 16 + g] = d[0] + e[0];
            red[gw * 16 + g + 8] = d[2] + e[2];
        }
        d[0] = d[1] = d[2] = d[3] = e[0] = e[1] = e[2] = e[3] = 0.0f;
        group_sync(group);
        const int row = tile_index * TR + lane;
        if (gw == 0 && lane < 16 && row < n) {
            float sum = 0.0f;
            for (int v = 0; v < WARPS; ++v) sum += red[v * 16 + lane];
#if NORM
            sum *= rstd;
#endif
#if HAS_BIAS
            sum += early_add;
#endif
#if RESIDUAL
            sum = round16(sum) + early_add;
#endif
            y[row] = (u16)to16(sum);
        }
        tile_index += step;
        group_sync(group);
    }
    asm volatile("cp.async.wait_group 0;");
#if LATE
    let_next_launch();
#endif
}
"""


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``_options``)."""
    return _SOURCE


def _options(bf16: bool, norm: bool, bias: bool, residual: bool, shape: Shape16, late: bool = False) -> list[str]:
    flags = dict(BF16=int(bf16), NORM=int(norm), HAS_BIAS=int(bias), RESIDUAL=int(residual), LATE=int(late),
                 GROUPS=shape.groups,
                 WARPS=shape.warps, DEPTH=shape.depth, EARLY=min(shape.early, shape.depth - 1))
    return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"]


_SWITCH = gemv4bit_mma.OffSwitch("GLMKIT_16BIT_KERNEL")  # turned_off() and GLMKIT_16BIT_KERNEL=triton


def turned_off() -> AbstractContextManager[None]:
    """Within it, glmkit's Triton GEMVs take what this kernel would (as ``GLMKIT_16BIT_KERNEL=triton`` does for the
    whole process); a decoder keeps the kernels of the graphs it captured.

    >>> with turned_off():
    ...     runs_on("cuda", torch.bfloat16)
    False
    """
    return _SWITCH.turned_off()


def runs_on(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this kernel takes one token of ``dtype`` on ``device``: an NVIDIA GPU of compute capability 8.0+ where
    it has not been turned off (its first-run check, ``turned_off``, ``GLMKIT_16BIT_KERNEL=triton``), bf16/fp16.

    >>> runs_on("cpu", torch.bfloat16)
    False
    """
    return _SWITCH.runs_on(device, dtype, NAME)


def takes(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, role: str = "qkv") -> bool:
    """Whether this kernel multiplies one token of ``dtype`` on ``device`` by ``weight`` ``[n, k]`` as projection
    ``role``: where it runs (``runs_on``), the weight in that dtype on that device, contiguous and 16-byte aligned,
    and a launch shape for it (``launch_shape``).

    >>> takes(torch.zeros(8, 512), torch.float32, torch.device("cpu"))
    False
    """
    if weight.dim() != 2 or weight.dtype != dtype or weight.device != device or not weight.is_contiguous():
        return False
    if weight.data_ptr() % 16 or not runs_on(device, dtype):
        return False
    return launch_shape(device, weight.shape[0], weight.shape[1], role) is not None


def usable(x: torch.Tensor, weight: torch.Tensor, role: str = "qkv") -> bool:
    """Whether this kernel multiplies the one token ``x`` ``[..., k]`` by ``weight`` ``[n, k]`` (``takes``).

    >>> usable(torch.zeros(1, 512), torch.zeros(8, 512))
    False
    """
    one = x.numel() == x.shape[-1] and weight.dim() == 2 and weight.shape[1] == x.shape[-1]
    return one and x.is_cuda and takes(weight, x.dtype, x.device, role)


def gemv_16_one(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
                leave_sms: int = 0, role: str = "qkv", shape: Shape16 | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` of one token ``[..., k]``; with ``norm_weight``, of ``rms_norm(x, norm_weight,
    eps)``; with ``residual``, ``residual + F.linear(x, weight)`` (the product rounded first, as PyTorch rounds).
    ``role`` picks the launch shape (``launch_shape``: the card's tuned one from ``glmkit tune``, else ``ROLES``; or
    ``shape``) and whether the next kernel launches only as its CTAs end (``LATE_ROLES``). Launched with programmatic
    dependent launch (inside ``glmkit.gemv.dependent_launches``), it leaves ``leave_sms`` SMs to the kernel after it
    (``sms_left``). The caller has checked ``usable``."""
    n, k = weight.shape
    late = role in LATE_ROLES
    shape = shape or launch_shape(x.device, n, k, role)
    if shape is None or k % (shape.warps * STAGE_COLUMNS):
        raise ValueError(f"glmkit.gemv16_one has no launch shape for rows of {k} columns: every warp's run of a row "
                         f"must be whole stages of {STAGE_COLUMNS} columns (see usable).")
    if bias is not None and residual is not None:
        raise ValueError("gemv_16_one adds a bias or a residual, not both.")
    bias = None if bias is None else bias.to(x.dtype).contiguous()  # (both read in x's type)
    residual = None if residual is None else residual.to(x.dtype).contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    xf = gemv4bit_mma.aligned16(x)
    norm16 = None if norm_weight is None else gemv4bit_mma.aligned16(norm_weight.to(x.dtype))
    args = [xf, y, weight, n, k, or_stand_in(bias, y), or_stand_in(norm16, y), float(eps), or_stand_in(residual, y)]
    options = _options(x.dtype == torch.bfloat16, norm_weight is not None, bias is not None, residual is not None,
                       shape, late)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = -(-n // 16)
    programs = max(1, min(sms - sms_left(x.device, leave_sms), tiles))
    gemv4bit_mma.launch(x.device, options, (programs, 1, 1), (shape.groups * shape.warps * 32, 1, 1), args,
                        shape.smem_bytes(k), _SOURCE, NAME, pdl=gemv4bit_one._dependent(x.device))
    return y


_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}  # (GPU, dtype) -> passed its first-run check


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
               eps: float, residual: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(rms_norm(x), weight, bias)`` (or ``residual + F.linear(x, weight)``, the product rounded first) in
    fp32 from the 16-bit inputs: what the kernel computes, but for its own roundings."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    return y if residual is None else y.to(x.dtype).float() + residual.float()


def _disagreement(device: torch.device, dtype: torch.dtype) -> str | None:
    """What the kernel gets wrong on small weights against ``_reference``, or None: q/k/v's form (norm and bias),
    o_proj's (residual), plain; rows that end inside a tile; rows of one stage and of several a warp; and, in one
    group a CTA, more tiles than CTAs (a group takes its next tile). Launched plainly, as a decoder's warm-up may
    not (programmatic dependent launch)."""
    with gemv.dependent_launches(False):
        return _products_disagree(device, dtype)


def _products_disagree(device: torch.device, dtype: torch.dtype) -> str | None:
    g = torch.Generator(device=device).manual_seed(0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    one_group = Shape16(1, 4, 3, 2)
    x = torch.randn(1, 1, 1024, device=device, generator=g).to(dtype)
    w = (torch.randn(16 * (sms + 5) - 8, 1024, device=device, generator=g) * 0.05).to(dtype)
    bias = torch.randn(w.shape[0], device=device, generator=g).to(dtype)
    norm = torch.rand(1024, device=device, generator=g) + 0.5
    if usable(x, w):
        got = gemv_16_one(x, w, bias, norm_weight=norm, shape=one_group).float()
        want = _reference(x, w, bias, norm.to(dtype), 1e-5, None)
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            return f"its products differ from F.linear ({dtype}, {tuple(w.shape)} in one group a CTA)"
    for n, k in ((40, 8 * STAGE_COLUMNS), (200, 32 * STAGE_COLUMNS)):
        w = (torch.randn(n, k, device=device, generator=g) * 0.05).to(dtype)
        x = torch.randn(1, 1, k, device=device, generator=g).to(dtype)
        bias = torch.randn(n, device=device, generator=g).to(dtype)
        norm = (torch.rand(k, device=device, generator=g) + 0.5).to(dtype)
        residual = torch.randn(1, 1, n, device=device, generator=g).to(dtype)
        for role, form in (("qkv", dict(bias=bias, norm_weight=norm)), ("o_proj", dict(residual=residual)),
                           ("qkv", {})):
            if not usable(x, w, role):
                return _NOT_HERE
            got = gemv_16_one(x, w, **form, role=role).float()
            want = _reference(x, w, form.get("bias"), form.get("norm_weight"), 1e-5, form.get("residual"))
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                err = ((got - want).norm() / want.norm()).item()
                return f"its products differ from F.linear ({dtype}, {n}x{k}, {sorted(form)}: relative error {err:.1e})"
    return None


def check(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this kernel runs on ``device`` for a token of ``dtype``: the first time it is asked in a process
    (outside a compiled function or a CUDA graph capture, where it answers False: a decoder's eager warm-up comes
    first), it is compiled and checked against ``F.linear``; an error or a disagreement turns it off for the process,
    with a warning that says why (``glmkit.gemv4bit``'s first-run checks, as for the 4-bit CUDA kernels).

    >>> check("cpu")
    False
    """
    return runs_on(device, dtype) and _checked(_CHECKED, device, dtype, _disagreement, _KERNEL, meanwhile=False)


_KERNEL = SimpleNamespace(NAME=NAME, LABEL=LABEL)  # what names this kernel in a first-run check's warning
