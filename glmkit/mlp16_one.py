"""GLM's whole MLP for one token in one CUDA kernel (NVRTC, Hopper): RMSNorm, gate/up, SwiGLU, down, residual add.

glmkit's batch-1 step used to run the MLP as two Triton GEMVs, gate/up (the norm and SwiGLU folded in) and down (the
residual add folded in). Each streams its weight well, but each ends and starts: the last programs of one drain while
the first of the next wait, and the memory bus idles between them. This kernel streams both weights without a gap:

* one CTA an SM; a producer warp copies the CTA's share of the weights into a ring in shared memory with TMA bulk
  copies (``cp.async.bulk``, one per stage, an ``mbarrier`` a slot), starting before the kernel before has ended
  (programmatic dependent launch: weights are not written by any kernel of the step);
* first the gate/up rows of the CTA's units of 8 intermediate rows (units ``c, c + G, ...``): 16 consumer warps sum
  8 columns a thread against the normalised x (fp32), and form h = round(up) * round(silu(round(gate))) rounded, as
  PyTorch's ``F.linear``/``F.silu`` and the product round it; h goes to a buffer in global memory;
* a grid barrier (every CTA resident: one an SM) while the producer goes on copying the CTA's down rows; then each
  CTA multiplies its own down rows (``ROW_STARTS``: 31 or 32 of GLM-4-9B's 4096 on an H200, the extra rows given to
  the CTAs with one unit fewer) by h and writes ``x + round(down)``, as the decoder's residual add rounds.

Every sum runs in a fixed order: the output is the same bit for bit launch after launch. The grid barrier needs every
CTA on an SM at once: launches of this kernel must not run at the same time on two streams of one GPU (each would hold
some SMs and wait for the rest); a decoder's steps run one after another on one stream. ``FastDecoder``'s bf16 and fp16
batch-1 steps on Hopper run their MLP through it (``glmkit.fast_decode.decoder_layer``); notebook
``05_tuning.ipynb`` teaches it, with the step measured against the two Triton GEMVs in
``benchmarks/results/mlp16_step*.json``. It is checked against fp32 the first time it runs on a GPU (``check``); a
disagreement or an error turns it off for the process, with a warning, and the Triton GEMVs run.
``GLMKIT_MLP_KERNEL=triton`` turns it off.

>>> import torch
>>> if usable_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16, 512, 1024):
...     x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
...     wgu = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16) * 0.05
...     wd = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16) * 0.05
...     norm = torch.ones(512, device="cuda", dtype=torch.bfloat16)
...     y = mlp_16_one(x, wgu, wd, norm, 1e-5, Workspace(x.device, 512, 1024, x.dtype))
...     assert torch.allclose(y.float(), reference(x, wgu, wd, norm, 1e-5).float(), rtol=2e-2, atol=2e-2)
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from glmkit import gemv, gemv4bit_mma
from glmkit.gemv4bit import _NOT_HERE, _checked, _why
from glmkit.gemv4bit_one import SMEM_H200, _dependent, smem_limit

__all__ = ["mlp_16_one", "Workspace", "MlpShape", "shape_for", "usable", "usable_on", "runs_on", "turned_off",
           "check", "reference", "row_starts", "source", "NAME", "RING", "MAX_ROWS", "mlp_16_one_or_off", "TABLE_KERNEL"]

NAME = "glmkit_mlp16_one"
LABEL = "batch-1 16-bit CUDA MLP kernel"  # its name in a warning
# slots of the ring a CTA (16 KiB each at GLM-4-9B's hidden size: 2 rows of gate/up), fewer where shared memory is
# short: the fastest in GLM-4-9B's bf16 step on an H200, two runs on one card: a step 4516 / 4510 µs against 4545 with
# 4 slots, 4536 / 4527 with 8 (the first run copying at most 4 stages of gate/up rows ahead), 4532 with 13, and 4570
# with 12 copying at most 4 of gate/up ahead; the Triton GEMVs 4573 / 4570 (mlp16_ring*.json)
RING = 12
MAX_ROWS = 64  # down rows a CTA may take (its sums' shared memory)
STATIC_SMEM = 1024  # shared memory sm_90 reserves for a kernel that uses mbarriers, beside the dynamic
MAX_HIDDEN = 4096  # wider rows (up to 1024 threads a CTA, 64 registers each) are not measured: the Triton GEMVs take them
MAX_CHUNKS = 8  # a down row is read in at most this many chunks of at most `hidden` columns


@dataclass(frozen=True)
class MlpShape:
    """How the kernel reads an MLP of ``hidden`` x ``inter``: a down row in ``chunks`` chunks of ``chunk`` columns
    (each at most ``hidden``: a consumer thread's 8 columns), a ring of ``ring`` stages of 2 rows of ``hidden``
    (``shape_for``: ``RING``, fewer where shared memory is short).

    >>> shape_for(4096, 13696)
    MlpShape(hidden=4096, inter=13696, chunks=4, chunk=3424, ring=12)
    >>> shape_for(4096, 13696).smem_bytes()
    203008
    """

    hidden: int
    inter: int
    chunks: int
    chunk: int
    ring: int = RING

    @property
    def consumer_warps(self) -> int:
        return self.hidden // 256

    def smem_bytes(self) -> int:
        """The ring, its full and empty barriers, the warps' sums of a unit (two, in turn), their squares, and their
        sums of the CTA's down rows."""
        warps = self.consumer_warps
        return self.ring * 4 * self.hidden + 16 * self.ring + 2 * warps * 16 * 4 + warps * 4 + warps * MAX_ROWS * 4

    def options(self, bf16: bool) -> list[str]:
        """The kernel's ``-D`` flags."""
        flags = dict(BF16=int(bf16), HIDDEN=self.hidden, INTER=self.inter, NCH=self.chunks, DCOLS=self.chunk,
                     RING=self.ring, MAX_ROWS=MAX_ROWS)
        return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"]


def shape_for(hidden: int, inter: int, smem_limit: int = SMEM_H200) -> MlpShape | None:
    """The launch shape for an MLP of ``hidden`` x ``inter`` on a GPU whose CTAs may take ``smem_limit`` bytes of
    shared memory (``RING`` slots, fewer where they would not fit beside ``STATIC_SMEM``, at least 2), or None where
    the kernel does not take it: hidden a multiple of 256 up to ``MAX_HIDDEN`` (a consumer thread per 8 columns,
    whole warps), inter a multiple of 8 (units of 8 rows) whose rows split into at most ``MAX_CHUNKS`` equal chunks of
    whole 8-column groups, each at most ``hidden``.

    >>> shape_for(4096, 13696).chunks, shape_for(512, 1024).chunk, shape_for(64, 128), shape_for(4096, 13697)
    (4, 512, None, None)
    >>> shape_for(2048, 5632).ring, shape_for(4096, 13696, 99 * 1024).ring, shape_for(7936, 13696)
    (12, 5, None)
    """
    if hidden % 256 or not 256 <= hidden <= MAX_HIDDEN or inter % 8 or inter <= 0:
        return None
    for chunks in range(1, MAX_CHUNKS + 1):
        if inter % chunks == 0 and (inter // chunks) % 8 == 0 and inter // chunks <= hidden:
            shape = MlpShape(hidden, inter, chunks, inter // chunks)
            room = smem_limit - STATIC_SMEM - shape.smem_bytes() + RING * (4 * hidden + 16)
            ring = min(RING, room // (4 * hidden + 16))
            return replace(shape, ring=ring) if ring >= 2 else None
    return None


def row_starts(hidden: int, ctas: int, inter: int) -> list[int]:
    """Where each CTA's down rows start (and, last, ``hidden``): ``hidden // ctas`` each, and the ``hidden % ctas``
    left over to the CTAs that take one unit of gate/up rows fewer (the last ones: units go ``c, c + G, ...``), so
    every CTA reads about as many bytes.

    >>> starts = row_starts(4096, 132, 13696)
    >>> [b - a for a, b in zip(starts, starts[1:])][126:], starts[-1]
    ([31, 31, 32, 32, 32, 32], 4096)
    """
    base, extra = divmod(hidden, ctas)
    counts = [base + (c >= ctas - extra) for c in range(ctas)]
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    return starts


class Workspace:
    """What one decoder's launches of the kernel on one GPU share: h (``inter`` values), the grid barrier's counter
    (it only grows, by the number of CTAs a launch) and the CTAs' down-row starts. One decoder's steps run one after
    another; two decoders each hold their own, so their launches never meet at one barrier.

    >>> Workspace(torch.device("cpu"), 512, 1024, torch.bfloat16, ctas=4).row_start.tolist()
    [0, 128, 256, 384, 512]
    """

    def __init__(self, device: torch.device, hidden: int, inter: int, dtype: torch.dtype, ctas: int | None = None) -> None:
        if ctas is None:
            ctas = torch.cuda.get_device_properties(device).multi_processor_count
        self.device, self.hidden, self.inter, self.dtype, self.ctas = device, hidden, inter, dtype, ctas
        self.h = torch.zeros(inter, dtype=dtype, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.row_start = torch.tensor(row_starts(hidden, ctas, inter), dtype=torch.int32, device=device)

    def fits(self, x: torch.Tensor, inter: int) -> bool:
        """Whether it serves a launch for token ``x`` with ``inter`` intermediate rows."""
        return (x.device == self.device and x.dtype == self.dtype and x.shape[-1] == self.hidden
                and inter == self.inter)


_SOURCE = gemv4bit_mma.PRELUDE + r"""
#define CT (HIDDEN / 8)                 /* consumer threads: 8 columns of a row each */
#define CW (CT / 32)                    /* consumer warps */
#define SLOT (4 * HIDDEN)               /* bytes a ring slot: 2 rows of HIDDEN 16-bit values */
#define UNITS (INTER / 8)               /* units of 8 intermediate rows */
#define GU_STAGES 8                     /* a unit's: 4 stages of its gate rows, then 4 of its up rows */
#define DBYTES (DCOLS * 2)              /* a chunk of a down row */
#define FULL_AT (RING * SLOT)
#define EMPTY_AT (FULL_AT + 8 * RING)
#define RED_AT (EMPTY_AT + 8 * RING)
#define SQ_AT (RED_AT + 2 * CW * 16 * 4)
#define DRED_AT (SQ_AT + CW * 4)
#define SMEM_END (DRED_AT + CW * MAX_ROWS * 4)
#ifdef EXPECT_SMEM  /* (the tests: the layout the Python side sizes, MlpShape.smem_bytes) */
static_assert(SMEM_END == EXPECT_SMEM, "SMEM_END: the layout differs from the shared memory asked for");
#endif
static_assert(DCOLS <= HIDDEN && DCOLS % 8 == 0 && DCOLS * NCH == INTER && INTER % 8 == 0, "the chunks of a down row");

extern __shared__ __align__(128) unsigned char smem[];

__device__ __forceinline__ void bar_consumers() { asm volatile("bar.sync 1, %0;" :: "n"(CT) : "memory"); }

__device__ __forceinline__ void wait_phase(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

__device__ __forceinline__ void release(u32 bar) {  /* a consumer warp is done with a slot */
    __syncwarp();
    if ((threadIdx.x & 31) == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, int bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void unpack(u32 w, float& a, float& b) {
#if BF16
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xFFFF0000u);
#else
    a = from16(w & 0xFFFFu);
    b = from16(w >> 16);
#endif
}

__device__ __forceinline__ float dot8(uint4 w, const float* v) {
    float a, b, s = 0.0f;
    unpack(w.x, a, b); s += a * v[0]; s += b * v[1];
    unpack(w.y, a, b); s += a * v[2]; s += b * v[3];
    unpack(w.z, a, b); s += a * v[4]; s += b * v[5];
    unpack(w.w, a, b); s += a * v[6]; s += b * v[7];
    return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(CT + 32, 1)
glmkit_mlp16_one(const u16* x, u16* __restrict__ y, const u16* wgu, const u16* wd, const u16* norm_weight,
                 u16* hbuf, unsigned long long* counter, const int* row_start, double eps)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = gridDim.x;
    const int my_units = blockIdx.x < UNITS ? (UNITS - 1 - blockIdx.x) / G + 1 : 0;
    const int r0 = row_start[blockIdx.x];  /* (no kernel of a step writes it) */
    const int rows = min(row_start[blockIdx.x + 1] - r0, MAX_ROWS);
    const int pairs = (rows + 1) / 2;
    const int gu_total = my_units * GU_STAGES, total = gu_total + pairs * NCH;
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    u32 dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (dynamic_bytes < SMEM_END || blockDim.x != CT + 32) {  /* not the launch asked for (every CTA alike): NaNs */
        wait_for_previous();
        for (int i = blockIdx.x * blockDim.x + tid; i < HIDDEN; i += G * blockDim.x)
            y[i] = (u16)to16(__int_as_float(0x7fc00000));
        return;
    }
    if (tid == 0) {
        for (int i = 0; i < RING; ++i) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(base + FULL_AT + 8 * i));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(base + EMPTY_AT + 8 * i), "n"(CW));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == CW) {  /* the producer: every stage of the CTA, in order, as slots free (weights: before the wait) */
        if (lane == 0) {
            for (int s = 0; s < total; ++s) {
                const int slot = s % RING, fill = s / RING;
                if (fill > 0) wait_phase(base + EMPTY_AT + 8 * slot, (fill - 1) & 1);
                const u32 full = base + FULL_AT + 8 * slot, dst = base + slot * SLOT;
                if (s < gu_total) {
                    const int unit = blockIdx.x + (s / GU_STAGES) * G, part = s % GU_STAGES;
                    const int row = part < 4 ? 8 * unit + 2 * part : INTER + 8 * unit + 2 * (part - 4);
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(full), "n"(SLOT) : "memory");
                    bulk_copy(dst, wgu + (size_t)row * HIDDEN, SLOT, full);
                } else {
                    const int d = s - gu_total, row = r0 + 2 * (d / NCH), col = (d % NCH) * DCOLS;
                    const bool two = row + 1 < r0 + rows;
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                                 :: "r"(full), "r"(two ? 2 * DBYTES : DBYTES) : "memory");
                    bulk_copy(dst, wd + (size_t)row * INTER + col, DBYTES, full);
                    if (two) bulk_copy(dst + DBYTES, wd + (size_t)(row + 1) * INTER + col, DBYTES, full);
                }
            }
        }
        return;
    }

    /* the consumers: x, normalised (fp32, as the Triton GEMV: x times the norm's weight, the sums times 1 / rms) */
    wait_for_previous();
    x = after_wait(x);
    norm_weight = after_wait(norm_weight);
    float xg[8];
    {
        const uint4 v = ((const uint4*)x)[tid], g = ((const uint4*)norm_weight)[tid];
        const u32 vw[4] = {v.x, v.y, v.z, v.w}, gw[4] = {g.x, g.y, g.z, g.w};
        float sq = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float a, b, ga, gb;
            unpack(vw[i], a, b);
            unpack(gw[i], ga, gb);
            sq += a * a + b * b;
            xg[2 * i] = a * ga;
            xg[2 * i + 1] = b * gb;
        }
        sq = warp_sum(sq);
        if (lane == 0) ((float*)(smem + SQ_AT))[warp] = sq;
    }
    bar_consumers();
    float rstd;
    {
        float s = 0.0f;
        for (int i = 0; i < CW; ++i) s += ((float*)(smem + SQ_AT))[i];
        rstd = 1.0f / sqrtf(s / (float)HIDDEN + (float)eps);
    }

    /* gate/up: a unit's 8 gate and 8 up sums a thread, then the warps' in order; h to global memory */
    int s = 0;
    for (int ui = 0; ui < my_units; ++ui) {
        float acc[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = 0.0f;
#pragma unroll
        for (int part = 0; part < GU_STAGES; ++part, ++s) {
            const int slot = s % RING;
            wait_phase(base + FULL_AT + 8 * slot, (s / RING) & 1);
            const unsigned char* st = smem + slot * SLOT;
            acc[2 * part] += dot8(((const uint4*)st)[tid], xg);
            acc[2 * part + 1] += dot8(((const uint4*)(st + 2 * HIDDEN))[tid], xg);
            release(base + EMPTY_AT + 8 * slot);
        }
        float* red = (float*)(smem + RED_AT) + (ui & 1) * CW * 16;  /* two in turn: one barrier a unit */
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = warp_sum(acc[i]);
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < 16; ++i) red[warp * 16 + i] = acc[i];
        }
        bar_consumers();
        if (tid < 8) {
            float gsum = 0.0f, usum = 0.0f;
            for (int w = 0; w < CW; ++w) {
                gsum += red[w * 16 + tid];
                usum += red[w * 16 + 8 + tid];
            }
            const float gate = round16(gsum * rstd), up = round16(usum * rstd);
            const float silu = round16(gate / (1.0f + expf(-gate)));
            hbuf[8 * (blockIdx.x + ui * G) + tid] = (u16)to16(up * silu);
        }
    }

    /* every CTA's h written: a grid barrier (the producer copies down rows meanwhile) */
    bar_consumers();
    if (tid == 0) {
        __threadfence();
        const unsigned long long old = atomicAdd(counter, 1ull);
        const unsigned long long target = (old / G + 1) * G;
        unsigned long long now;
        do {
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(counter) : "memory");
        } while (now < target);
        __threadfence();
    }
    bar_consumers();

    /* down: this CTA's rows, 2 a stage in NCH chunks of DCOLS columns; a thread's 8 columns of each chunk of h */
    const bool cols = 8 * tid < DCOLS;
    float hv[NCH][8];
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
        const uint4 v = cols ? __ldcg((const uint4*)(hbuf + q * DCOLS) + tid) : make_uint4(0, 0, 0, 0);
        unpack(v.x, hv[q][0], hv[q][1]);
        unpack(v.y, hv[q][2], hv[q][3]);
        unpack(v.z, hv[q][4], hv[q][5]);
        unpack(v.w, hv[q][6], hv[q][7]);
    }
    let_next_launch();  /* (after reading h: no later launch may write it before this) */
    float* dred = (float*)(smem + DRED_AT);
    for (int p = 0; p < pairs; ++p) {
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
        for (int q = 0; q < NCH; ++q, ++s) {
            const int slot = s % RING;
            wait_phase(base + FULL_AT + 8 * slot, (s / RING) & 1);
            const unsigned char* st = smem + slot * SLOT;
            if (cols) {
                a0 += dot8(((const uint4*)st)[tid], hv[q]);
                a1 += dot8(((const uint4*)(st + DBYTES))[tid], hv[q]);  /* (no second row: unused) */
            }
            release(base + EMPTY_AT + 8 * slot);
        }
        a0 = warp_sum(a0);
        a1 = warp_sum(a1);
        if (lane == 0) {
            dred[warp * MAX_ROWS + 2 * p] = a0;
            if (2 * p + 1 < rows) dred[warp * MAX_ROWS + 2 * p + 1] = a1;
        }
    }
    bar_consumers();
    if (tid < rows) {
        float sum = 0.0f;
        for (int w = 0; w < CW; ++w) sum += dred[w * MAX_ROWS + tid];
        y[r0 + tid] = (u16)to16(round16(sum) + from16(x[r0 + tid]));
    }
}
"""


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``MlpShape.options``)."""
    return _SOURCE


_SWITCH = gemv4bit_mma.OffSwitch("GLMKIT_MLP_KERNEL")  # turned_off() and GLMKIT_MLP_KERNEL=triton


def turned_off() -> AbstractContextManager[None]:
    """Within it, the decoder's MLP takes glmkit's two Triton GEMVs (as ``GLMKIT_MLP_KERNEL=triton`` does for the
    whole process); a decoder keeps the kernels of the graphs it captured.

    >>> with turned_off():
    ...     runs_on("cuda", torch.bfloat16)
    False
    """
    return _SWITCH.turned_off()


def runs_on(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this kernel runs on ``device`` for ``dtype``: an NVIDIA GPU of compute capability 9.0+ (TMA bulk
    copies and transaction barriers are Hopper's) where it has not been turned off (its first-run check,
    ``turned_off``, ``GLMKIT_MLP_KERNEL=triton``), bf16/fp16.

    >>> runs_on("cpu", torch.bfloat16)
    False
    """
    return _SWITCH.runs_on(device, dtype, NAME, capability=(9, 0))


TABLE_KERNEL = "16bit-mlp"  # this kernel's name in the launch-shape tables: (kernel, inter, hidden) -> its ring


def _shape_on(device: torch.device, hidden: int, inter: int) -> MlpShape | None:
    """``shape_for`` on ``device`` with the ring ``glmkit tune`` measured fastest in the decode step on this card where
    it fits (``glmkit.gemv.active_cuda_shapes``); None where a CTA (one an SM) would take more down rows than
    ``MAX_ROWS`` or than it has consumer threads (one a row for the last sums)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    shape = shape_for(hidden, inter, smem_limit(device)) if -(-hidden // sms) <= min(MAX_ROWS, hidden // 8) else None
    tuned = None if shape is None else gemv.tuned_cuda_shape(TABLE_KERNEL, inter, hidden, lambda ring: ring,
                                                              lambda ring: 2 <= ring <= shape.ring)
    return shape if tuned is None else replace(shape, ring=tuned)


def usable_on(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """Whether the kernel takes a token of ``dtype`` through an MLP of ``hidden`` x ``inter`` on ``device``
    (``runs_on``, and a shape there: ``_shape_on``, at most ``MAX_ROWS`` down rows a CTA in the shared memory there).

    >>> usable_on(torch.device("cpu"), torch.bfloat16, 4096, 13696)
    False
    """
    return runs_on(device, dtype) and _shape_on(device, hidden, inter) is not None


def usable(x: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor) -> bool:
    """Whether the kernel takes the one token ``x`` ``[..., hidden]`` through gate/up ``wgu`` ``[2 inter, hidden]``
    and down ``wd`` ``[hidden, inter]``: contiguous, 16-byte aligned weights of x's dtype on x's GPU (``usable_on``).

    >>> usable(torch.zeros(1, 1, 512), torch.zeros(2048, 512), torch.zeros(512, 1024))
    False
    """
    if x.numel() != x.shape[-1] or not x.is_cuda or wgu.dim() != 2 or wd.dim() != 2:
        return False
    hidden, inter = x.shape[-1], wd.shape[1]
    for w, shape in ((wgu, (2 * inter, hidden)), (wd, (hidden, inter))):
        if tuple(w.shape) != shape or w.dtype != x.dtype or w.device != x.device or not w.is_contiguous() \
                or w.data_ptr() % 16:
            return False
    return usable_on(x.device, x.dtype, hidden, inter)


def mlp_16_one(x: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               workspace: Workspace) -> torch.Tensor:
    """``x + F.linear(up * silu(gate), wd)`` where ``gate, up = F.linear(rms_norm(x, norm_weight, eps), wgu)`` halves,
    for one token ``x`` ``[..., hidden]``, each product rounded to x's dtype as PyTorch rounds it (``reference``).
    Launched with programmatic dependent launch inside ``glmkit.gemv.dependent_launches``. The caller has checked
    ``usable``; ``workspace`` is the caller's own (``Workspace``, allocated outside a graph capture)."""
    hidden, inter = x.shape[-1], wd.shape[1]
    shape = _shape_on(x.device, hidden, inter)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if shape is None or not workspace.fits(x, inter) or workspace.ctas != sms:
        raise ValueError(f"glmkit.mlp16_one takes an MLP of {hidden} x {inter} in {x.dtype} with its own Workspace "
                         f"of those sizes, one CTA for each of the GPU's {sms} SMs: see usable.")
    y = torch.empty_like(x)
    args = [gemv4bit_mma.aligned16(x), y, wgu, wd, gemv4bit_mma.aligned16(norm_weight.to(x.dtype)), workspace.h,
            workspace.counter, workspace.row_start, float(eps)]
    gemv4bit_mma.launch(x.device, shape.options(x.dtype == torch.bfloat16), (workspace.ctas, 1, 1),
                        (hidden // 8 + 32, 1, 1), args, shape.smem_bytes(), _SOURCE, NAME,
                        pdl=_dependent(x.device))
    return y


_LAUNCHED: set[tuple[torch.device, torch.dtype, int, int]] = set()  # (GPU, dtype, hidden, inter) launched once


def mlp_16_one_or_off(x: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      workspace: Workspace) -> torch.Tensor | None:
    """``mlp_16_one``; the first launch at a shape on a GPU (a decoder's eager warm-up: its first-run check, ``check``,
    ran smaller shapes) is watched: where it raises (compiling or launching that shape), the kernel is turned off on
    that GPU with a warning that says why, and None tells the caller to take the Triton GEMVs."""
    key = (x.device, x.dtype, x.shape[-1], wd.shape[1])
    if key in _LAUNCHED:
        return mlp_16_one(x, wgu, wd, norm_weight, eps, workspace)
    try:
        y = mlp_16_one(x, wgu, wd, norm_weight, eps, workspace)
    except Exception as exc:  # (NVRTC, the driver refusing the launch): the Triton GEMVs take over
        gemv4bit_mma.disable(x.device, _why(exc), NAME, LABEL)
        return None
    _LAUNCHED.add(key)
    return y


def reference(x: torch.Tensor, wgu: torch.Tensor, wd: torch.Tensor, norm_weight: torch.Tensor,
              eps: float) -> torch.Tensor:
    """What the kernel computes, with sums in fp32 and PyTorch's roundings: RMSNorm folded as the Triton GEMV folds
    it (x times the norm's weight, the sums times 1 / rms), gate, up, silu(gate) and h rounded to x's dtype, then
    down rounded and the residual added.

    >>> x, wgu, wd = torch.randn(1, 1, 8), torch.randn(32, 8), torch.randn(8, 16)
    >>> y = reference(x, wgu, wd, torch.ones(8), 1e-5)
    >>> gate, up = F.linear(F.rms_norm(x, (8,), eps=1e-5), wgu).chunk(2, -1)
    >>> torch.allclose(y, x + F.linear(up * F.silu(gate), wd), atol=1e-4)
    True
    """
    xf = x.float().reshape(-1)
    rstd = torch.rsqrt(xf.pow(2).mean() + eps)
    gate, up = ((wgu.float() @ (xf * norm_weight.float())) * rstd).chunk(2)
    gate, up = gate.to(x.dtype).float(), up.to(x.dtype).float()
    h = (up * F.silu(gate).to(x.dtype).float()).to(x.dtype).float()
    return ((wd.float() @ h).to(x.dtype).float() + xf).to(x.dtype).reshape(x.shape)


_CHECKED: dict[tuple[torch.device, torch.dtype], bool] = {}  # (GPU, dtype) -> passed its first-run check


def _disagreement(device: torch.device, dtype: torch.dtype) -> str | None:
    """What the kernel gets wrong on small MLPs against ``reference``, or None: down rows in one chunk and in
    several, more units than CTAs and fewer, each launched twice (the same bits: the grid barrier's counter goes on
    from one launch to the next). Launched plainly, as a decoder's warm-up may not (programmatic dependent launch)."""
    g = torch.Generator(device=device).manual_seed(0)
    with gemv.dependent_launches(False):
        for hidden, inter in ((512, 1024), (1024, 2736), (256, 64)):
            if not usable_on(device, dtype, hidden, inter):
                return _NOT_HERE
            x = torch.randn(1, 1, hidden, device=device, generator=g).to(dtype)
            wgu = (torch.randn(2 * inter, hidden, device=device, generator=g) * 0.05).to(dtype)
            wd = (torch.randn(hidden, inter, device=device, generator=g) * 0.05).to(dtype)
            norm = (torch.rand(hidden, device=device, generator=g) + 0.5).to(dtype)
            ws = Workspace(device, hidden, inter, dtype)
            got, again = (mlp_16_one(x, wgu, wd, norm, 1e-5, ws) for _ in range(2))
            want = reference(x, wgu, wd, norm, 1e-5)
            delta = (want.float() - x.float()).norm()
            err = ((got.float() - want.float()).norm() / delta).item()
            if not err < 2e-2:
                return f"its MLP differs from F.linear's ({dtype}, {hidden} x {inter}: relative error {err:.1e})"
            if not torch.equal(got, again):
                return f"two launches on the same input differ ({dtype}, {hidden} x {inter})"
    return None


def check(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this kernel runs on ``device`` for a token of ``dtype``: the first time it is asked in a process
    (outside a compiled function or a CUDA graph capture, where it answers False: a decoder's eager warm-up comes
    first), it is compiled and checked against ``reference``; an error or a disagreement turns it off for the
    process, with a warning that says why.

    >>> check("cpu")
    False
    """
    return runs_on(device, dtype) and _checked(_CHECKED, device, dtype, _disagreement, _KERNEL, meanwhile=False)


_KERNEL = SimpleNamespace(NAME=NAME, LABEL=LABEL)  # what names this kernel in a first-run check's warning
