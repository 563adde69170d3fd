"""One token through a 4-bit weight on the tensor cores: the batch-1 CUDA kernel, compiled at run time by NVRTC.

At batch 1 glmkit's Triton kernel (``glmkit.gemv4bit``) is held back by the work it does per byte, not by memory:
two warp shuffles to look a byte's two nibbles up, two fp32 multiply-adds and x's conversions, about ten
instructions a byte (``benchmarks/results/nf4_ncu.json``). This kernel does a quarter of an instruction's products a
byte and one shared-memory load to look it up, as ``glmkit.gemv4bit_mma`` does for 2-8 tokens, but streams the bytes
the way one token needs them:

* every warp copies its own run of the weight's rows into shared memory with ``cp.async`` (whole 32-byte sectors of
  8 rows an instruction, a stage ahead, the block scales with them): no register holds a weight's load in flight and
  no warp waits for another's bytes; x is read into shared memory once a CTA;
* one shared-memory load turns a byte into the pair of 16-bit values of its nibbles (a 256-entry table, a copy per
  lane: a warp's 32 lookups never wait on each other); that pair is one register of the operand of
  ``mma.m16n8k16``, which multiplies 16 rows by x. With the table's entries 256 bytes apart, in a 64 KiB-aligned
  part of shared memory (``OneShape.wide``), one byte permute of the packed byte and the lane's own bits is the
  load's address;
* for rows of 4096 columns (q/k/v, o_proj, gate/up) x stays in registers, read from shared memory once a launch:
  the tensor cores multiply 8 columns of x, of which one vector needs only one, so chunk c of a warp's stage is
  column 2c (or 2c + 1, every other stage) and each lane holds the x of its own column's chunk, 16 registers in all;
  no stage reads x from shared memory, whose queue held the kernel back (``X_REGS_MAX``; down_proj's 13696 columns
  read it there every stage);
* a CTA stays on its SM (one a SM) and its groups of warps take tiles of 16 rows (gate and up: 16 of each, a stage of
  gate rows then one of up rows) in turn, so the table is built once a launch; each group sums its tile's warps in a
  fixed order (the same bits every run);
* launched with programmatic dependent launch (inside ``glmkit.gemv.dependent_launches``, Hopper), it fetches its
  first stages (all but one of its ring's) and writes its table while the kernel before ends, then waits
  (``griddepcontrol.wait``) before it reads what that kernel wrote (x, the norm's sums, the residual stream: through
  pointers laundered after the wait, so the compiler cannot move those loads above it) or writes anything.

The tensor cores multiply in fp16 whatever x's type (``F16_PRODUCTS``): bitsandbytes' 4-bit code in a bf16 table
puts every weight of a code off the same way, 0.13% of a projection on its own, and made this kernel's outputs
0.21-0.22% from float64 against 0.17% for the Triton kernel; with an fp16 table they are 0.17%, and the nf4
decoder's logits 0.95x bf16 arithmetic's on the same weights, against 0.99x (``nf4_code_rounding.json``,
``nf4_accuracy.json``), at 0.991x the speed of bf16 products (``nf4_decode.json``). A bf16 x is converted as it is staged:
each CTA finds its largest value (a warp's, then the CTA's, after the wait for the kernel before), multiplies x by
the power of two that puts it in [2^14, 2^15) (exact: bf16's 8 significant bits fit in fp16's 11, and nothing
overflows fp16's 65504) and multiplies the sums by its inverse.

It also folds what the 4-bit one-token step folds (``glmkit.gemv4bit.gemv_4bit_normed``, ``gemv_4bit_residual``):
x may be a ``NormedStream`` (the sums are multiplied by ``1 / rms``), and the product may be added to the residual
stream, writing the next norm's ``NormedStream`` (one sum of squares a tile).

On an H200, GLM-4-9B's nf4 projections through it, launched plainly, take 31% less time than through the Triton kernel
for gate_up, 23% for down_proj, 9% for o_proj and 7% for q/k/v, and all four 30-39% less launched back to back with
programmatic dependent launch (``benchmarks/results/nf4_one.json``); its one-sequence step decodes 2.15x bf16's fast
path with programmatic dependent launch and 1.79x without (``nf4_one_step.json``; q/k/v then leaves an SM to each of
the decode attention's few programs, ``LEAVE_SMS_MAX``); notebook ``04_quantization.ipynb`` shows both. Before x was
held in registers, an earlier version's warps waited most on the queue of shared-memory instructions
(``nf4_one_ncu.json``: x then copied with each stage); now on fixed latencies and global loads
(``nf4_one_ncu_x_regs.json``). Smaller cards get fewer warps a CTA, and the narrow table, where the H200's shape would
not fit their shared memory (``shape_for``); ``glmkit tune`` times the shapes that fit the card in hand and keeps the
fastest per projection in the user's table, which a launch then takes (``launch_shape``; notebook 05).

Runs on NVIDIA GPUs of compute capability 8.0+ with x in bf16 or fp16, bitsandbytes' default blocksize (64) and
plain fp32 scales (double quantization takes the Triton kernel): ``usable`` says when. It is checked against
``dequantize`` + ``F.linear`` the first time it runs on a GPU (``glmkit.gemv4bit.check_one``).

>>> import torch
>>> from glmkit.gemv4bit import quantize
>>> if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
...     _ = torch.manual_seed(0)
...     w = quantize(torch.randn(128, 256, device="cuda"), "nf4")
...     x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
...     y = gemv_4bit_one(x, (w,), None, False)
...     assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, rtol=2e-2, atol=5e-2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from glmkit import gemv, gemv4bit_mma
from glmkit.gemv4bit_mma import or_stand_in

__all__ = ["gemv_4bit_one", "usable", "runs_on", "reads_state", "OneShape", "shape_for", "tuned_shape", "launch_shape",
           "smem_limit", "tiles", "SHAPE", "sms_left", "LEAVE_SMS_MAX", "source", "NAME", "TABLE_KERNEL"]

NAME = "glmkit_gemv4_one"
LABEL = "batch-1 4-bit CUDA kernel"  # its name in a warning


@dataclass(frozen=True)
class OneShape:
    """How the batch-1 CUDA kernel is launched: ``groups`` groups of ``warps`` warps a CTA (one CTA an SM), each warp
    copying ``depth`` stages ahead; ``wide``: the lookup table's entries 256 bytes apart (64 KiB), so that a byte's
    address is one byte permute, else 128 (32 KiB, one more multiply-add a byte).

    >>> OneShape(4, 4, 2).smem_bytes(swiglu=False, k=4096)  # bytes of shared memory a CTA
    149520
    """

    groups: int
    warps: int
    depth: int
    wide: bool = True

    @staticmethod
    def stage_bytes() -> int:
        return 16 * 4 * 36  # a stage: 4 chunks of 64 weights of 16 rows, and their scales

    def smem_bytes(self, swiglu: bool, k: int) -> int:
        """Shared memory a CTA of rows of ``k`` columns: the layout (``layout_bytes``), then x."""
        return self.layout_bytes(swiglu) + self.x_bytes(k)

    def x_bytes(self, k: int) -> int:
        """x in shared memory: the warps' runs of 64-weight chunks (whole stages of 4 chunks), 128 bytes a chunk."""
        chunks_a_warp = math.ceil(k // 64 / self.warps)
        return self.warps * math.ceil(chunks_a_warp / 4) * 4 * 128

    def layout_bytes(self, swiglu: bool) -> int:
        """The kernel's layout before x (its ``SMEM_END``): wide, the warps' rings before the table (in the window's
        first 64 KiB, from ``BASE_LO``: the larger of its two layouts), then the table, then the other rings; narrow,
        the table, then the rings."""
        warps = self.groups * self.warps
        ring = self.depth * self.stage_bytes()
        red = warps * (32 if swiglu else 16) * 4 + 16
        if not self.wide:
            return 256 * 32 * 4 + warps * ring + red
        ends = []
        for base_lo in BASE_LO:
            table_at = 65536 - base_lo
            before = min(warps, table_at // ring)
            end = table_at + 65536 + (warps - before) * ring
            ends.append(end if table_at - before * ring >= red else end + red)
        return max(ends)


# The launch shape, the fastest (down_proj: within 1% of the fastest) of 5 (4 for gate/up) timed on GLM-4-9B's
# projections on an H200 (benchmarks/results/nf4_one.json): 16 warps an SM in 4 groups, 2 stages a warp, the wide
# lookup table. (Gate/up once took 32-row stages: with 16 warps its 128 registers a warp did not hold the loop, and it
# spilled; gate rows and up rows now take stages in turn, 16 rows each, as every other weight does.)
SHAPE = OneShape(4, 4, 2)

# Launched with programmatic dependent launch, a launch followed by a kernel of at most this many programs (the decode
# attention after q/k/v at batch 1 on a short cache) may leave an SM to each of them (``gemv_4bit_one``'s
# ``leave_sms``): they start while it runs and read their cache tiles meanwhile, instead of waiting for SMs that its
# CTAs hold whole (one CTA an SM, every register). More programs than that spread over every SM: none are left.
# GLM-4-9B nf4 at batch 1 on an H200, one run: 430.0 tok/s against 427.2 (a step at a 160-token cache 2330 µs against
# 2349); leaving 2, 4 or 8 SMs to the attention's 6 programs measured alike (benchmarks/results/nf4_leave_sms.json).
LEAVE_SMS_MAX = 8


BASE_LO = (0, 1024)  # where a CTA's dynamic shared memory starts in its window: Ampere/Ada, Hopper (the kernel checks)
SMEM_H200 = 227 * 1024  # shared memory a CTA may ask for on an H100/H200 (shared_memory_per_block_optin)


def shape_for(swiglu: bool, k: int, smem_limit: int = SMEM_H200) -> OneShape | None:
    """The launch shape for rows of ``k`` columns (gate/up: ``swiglu``, which sums twice the rows a tile) on a GPU
    whose CTAs may take ``smem_limit`` bytes of shared memory: the H200's, with fewer groups (then fewer warps) where
    it would not fit (a consumer card's ~99 KiB), and the narrow lookup table where that keeps more warps; None where
    nothing fits (the Triton kernel runs there).

    >>> shape_for(False, 13696) == shape_for(True, 4096) == SHAPE
    True
    >>> shape_for(True, 4096, 99 * 1024)  # an RTX 30/40-series card
    OneShape(groups=2, warps=4, depth=2, wide=False)
    """
    fits = [shape for shape in (_shrunk(SHAPE, swiglu, k, smem_limit),
                                _shrunk(replace(SHAPE, wide=False), swiglu, k, smem_limit)) if shape is not None]
    return max(fits, key=lambda shape: shape.groups * shape.warps, default=None)  # the wide table on a tie


def _shrunk(shape: OneShape, swiglu: bool, k: int, smem_limit: int) -> OneShape | None:
    """``shape`` with fewer groups, then fewer warps, until it fits ``smem_limit`` (None: it never does)."""
    while shape.smem_bytes(swiglu, k) > smem_limit:
        if shape.groups > 1:
            shape = replace(shape, groups=shape.groups // 2)
        elif shape.warps > 2:
            shape = replace(shape, warps=shape.warps // 2)
        else:
            return None
    return shape


TABLE_KERNEL = "4bit-one"  # this kernel's name in the launch-shape tables (nf4 and fp4 take the same kernel)


def tuned_shape(rows: int, k: int, swiglu: bool, smem_limit: int) -> OneShape | None:
    """The shape ``glmkit tune`` measured fastest on this card for a launch of ``rows`` output rows (gate/up: of one
    half; q/k/v: all three) of ``k`` columns (the user's table, else a shipped one: ``glmkit.gemv.active_cuda_shapes``),
    where it fits ``smem_limit``; None where there is none."""
    return gemv.tuned_cuda_shape(TABLE_KERNEL, rows, k, OneShape, lambda shape: shape.smem_bytes(swiglu, k) <= smem_limit)


def launch_shape(device: torch.device, rows: int, k: int, swiglu: bool) -> OneShape | None:
    """The shape a launch on ``device`` takes: the tuned one (``tuned_shape``), else ``shape_for``'s default."""
    limit = smem_limit(device)
    return tuned_shape(rows, k, swiglu, limit) or shape_for(swiglu, k, limit)


def smem_limit(device: torch.device) -> int:
    """Shared memory a CTA may ask for on ``device`` (48 KiB where torch does not say)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


_SOURCE = gemv4bit_mma.PRELUDE + r"""
/* a tile: 16 rows (gate/up: 16 gate rows and their 16 up rows, in stages of their own, gate then up) */
#define TR 16
#define ROWSETS (SWIGLU ? 2 : 1)  /* sets of 16 rows a tile */
#define SUMS (16 * ROWSETS)  /* sums a warp hands its group a tile */
#define CH 4  /* 64-weight chunks a stage, of each row (128 bytes) */
#define W_BYTES (TR * CH * 32)
#define S_BYTES (TR * CH * 4)
#define STAGE (W_BYTES + S_BYTES)
/* WIDE: entry e of the lookup table at byte 256 e of the CTA's shared window's second 64 KiB (its 32 copies, then
   128 unused bytes), so that one byte permute of a packed byte, 4 * lane and the window's high bytes is the address;
   the warps' rings fill the dynamic shared memory before the table (it starts BASE_LO bytes into the window), then
   after it. Else (narrow) the table at the start, entry e at byte 128 e (32 KiB, one more add a byte), then the
   rings */
#if __CUDA_ARCH__ >= 900  /* where the dynamic shared memory starts in the window: after the 1 KiB Hopper keeps */
#define BASE_LO 1024
#else
#define BASE_LO 0
#endif
#define RING (DEPTH * STAGE)
#define WARPS_ALL (GROUPS * WARPS)
#define RED_BYTES (WARPS_ALL * SUMS * 4 + 16)  /* the warps' sums of a tile, then 1 / rms */
#if WIDE
#define ENTRY_WORDS 64
#define TABLE_AT (65536 - BASE_LO)
#define BEFORE (TABLE_AT / RING < WARPS_ALL ? TABLE_AT / RING : WARPS_ALL)  /* rings before the table */
#define RED_BEFORE (TABLE_AT - BEFORE * RING >= RED_BYTES)
#define RING_AT(w) ((w) < BEFORE ? (w) * RING : TABLE_AT + 65536 + ((w) - BEFORE) * RING)
#define RED_AT (RED_BEFORE ? BEFORE * RING : TABLE_AT + 65536 + (WARPS_ALL - BEFORE) * RING)
#define SMEM_END (RED_BEFORE ? TABLE_AT + 65536 + (WARPS_ALL - BEFORE) * RING : RED_AT + RED_BYTES)
#else
#define ENTRY_WORDS 32
#define TABLE_AT 0
#define RING_AT(w) (8192 * 4 + (w) * RING)
#define RED_AT (8192 * 4 + WARPS_ALL * RING)
#define SMEM_END (RED_AT + RED_BYTES)
#endif
/* after SMEM_END: x, once a CTA (the warps' runs of chunks, zeros after the row's end) */
#ifdef EXPECT_SMEM_END  /* (the tests: what the Python side asks for holds this layout) */
static_assert(SMEM_END <= EXPECT_SMEM_END, "SMEM_END: the layout does not fit the shared memory asked for");
#endif
#define GROUP_THREADS (WARPS * 32)

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

/* the row of the tile that a lane of the warp ending it takes (lane & 15), and whether the lane stores it: one of
   lanes 0-15, in the weight (gate/up: its n / 2 gate rows) */
__device__ __forceinline__ bool ends_row(const Tile& tile, int lane, int& row) {
    row = tile.row0 + (lane & 15);
    return lane < 16 && row < (SWIGLU ? tile.n / 2 : tile.n);
}

/* where 16-byte granule c16 of tile row r lies in a stage's bytes: rows of 128 bytes, granules permuted per
   row so that a warp's 8-byte reads (lane (g, quad): rows g and g + 8, granule 2c + quad / 2) never share a bank */
__device__ __forceinline__ u32 granule_at(int r, int c16) { return r * 128 + ((c16 ^ (2 * (r & 3))) << 4); }

/* where a warp copies its next stage from, set once a tile and moved on a stage at a time. Lane (r, q) = (lane / 4,
   lane % 4) copies granules q and q + 4 (16 bytes each) of tile rows r and r + 8 and the scale of chunk q of those
   rows: each copy instruction reads whole 32-byte sectors of 8 rows */
struct Copier {
    const unsigned char* q;  /* the lane's first granule of the stage, row r */
    const float* s;          /* the lane's scale of the stage, row r */
#if SWIGLU
    size_t up_bytes;         /* the up rows' distance from their gate rows: bytes, and scales */
    int up_scales;
#endif
    u32 rows;                /* bit v: row r + 8 v is in the weight (else zeros) */
    int left;                /* chunks of the warp's run from this stage on */
};

__device__ __forceinline__ void begin_tile(Copier& c, const Tile& tile, int chunk_begin, int chunk_end, int chunks,
                                           int lane) {
    const int here = (SWIGLU ? tile.n / 2 : tile.n) - tile.row0;  /* the tile's rows in the weight (up to 16) */
    const int r = lane >> 2, q = lane & 3;
    c.q = tile.q + (size_t)(tile.row0 + r) * (chunks * 32) + chunk_begin * 32 + q * 16;
    c.s = tile.absmax + (size_t)(tile.row0 + r) * chunks + chunk_begin + q;
#if SWIGLU
    c.up_bytes = (size_t)(tile.n / 2) * (chunks * 32);
    c.up_scales = tile.n / 2 * chunks;
#endif
    c.rows = (u32)(r < here) | ((u32)(r + 8 < here) << 1);
    c.left = chunk_end - chunk_begin;
}

/* copy the warp's next stage into slot st (shared address): its rows' bytes (`up`: the up rows') and scales; `safe`
   is read where a lane copies nothing */
__device__ __forceinline__ void copy_stage(u32 st, const Copier& c, int chunks, const void* safe, int lane, bool up) {
    const int r = lane >> 2, q = lane & 3;
    const u32 scale_to = st + W_BYTES + 4 * (CH * r + q);  /* where row r's scale of chunk q goes */
#pragma unroll
    for (int v = 0; v < 2; ++v) {  /* tile rows r and r + 8 */
        const bool row_ok = (c.rows >> v) & 1;
#if SWIGLU
        const unsigned char* src = c.q + (up ? c.up_bytes : 0) + v * 8 * (chunks * 32);
        const float* scale = c.s + (up ? c.up_scales : 0) + v * 8 * chunks;
#else
        const unsigned char* src = c.q + v * 8 * (chunks * 32);
        const float* scale = c.s + v * 8 * chunks;
#endif
#pragma unroll
        for (int h = 0; h < 2; ++h) {  /* granules q and q + 4: chunks q / 2 and q / 2 + 2 */
            const bool ok = row_ok && (q >> 1) + 2 * h < c.left;
            copy16(st + granule_at(r + 8 * v, q + 4 * h), ok ? (const void*)(src + 64 * h) : safe, ok);
        }
        const bool ok = row_ok && q < c.left;  /* scales: [TR rows][CH chunks] */
        copy4(scale_to + 4 * CH * 8 * v, ok ? (const void*)scale : safe, ok);
    }
}

extern __shared__ __align__(16) u32 smem[];

/* the pair of 16-bit values of byte i (0-7) of a lane's 8 bytes, from the lane's copy of the table; `lane_table`:
   the shared address of the lane's copy of entry 0 */
__device__ __forceinline__ u32 lookup(u32 lane_table, uint2 w, int i) {
#if WIDE  /* the byte as the address's second byte, the rest from lane_table (a multiple of 64 KiB + 4 lane) */
    u32 v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(__byte_perm(i < 4 ? w.x : w.y, lane_table, 0x7604 | ((i & 3) << 4))));
    return v;
#else
    return pair_of(lane_table, w, i);  /* the narrow table's: entries 128 bytes apart */
#endif
}

/* chunk c of the stage in slot st (shared address) times x's words xw (the operand's column of lane g), in two chains
   of two products, not one of four (each waits for half as many before it): d and e; lane (g, quad) holds rows g and
   g + 8 of its columns; `lt`: the lane's table (``lookup``) */
__device__ __forceinline__ void chunk_products(u32 st, u32 lt, int g, int quad, int c, const u32* xw, float* d,
                                               float* e) {
    uint2 w0, w1;
    const int c16 = 2 * c + (quad >> 1);
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                 : "=r"(w0.x), "=r"(w0.y) : "r"(st + granule_at(g, c16) + 8 * (quad & 1)));
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                 : "=r"(w1.x), "=r"(w1.y) : "r"(st + granule_at(g + 8, c16) + 8 * (quad & 1)));
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
        mma(d, lookup(lt, w0, 2 * i), lookup(lt, w1, 2 * i), lookup(lt, w0, 2 * i + 1), lookup(lt, w1, 2 * i + 1),
            xw[2 * i], xw[2 * i + 1]);
        mma(e, lookup(lt, w0, 2 * i + 2), lookup(lt, w1, 2 * i + 2), lookup(lt, w0, 2 * i + 3),
            lookup(lt, w1, 2 * i + 3), xw[2 * i + 2], xw[2 * i + 3]);
    }
}

/* the stage in slot st (shared address) summed into acc: lane (g, quad) holds rows g and g + 8; `lt`: the lane's
   table (``lookup``); `xa`: x's part (shared address) */
__device__ __forceinline__ void sum_stage(u32 st, u32 lt, u32 xa, int g, int quad, float* acc) {
    float s0[CH], s1[CH];
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(s0[0]), "=f"(s0[1]), "=f"(s0[2]), "=f"(s0[3]) : "r"(st + W_BYTES + 16 * g));
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(s1[0]), "=f"(s1[1]), "=f"(s1[2]), "=f"(s1[3]) : "r"(st + W_BYTES + 16 * (g + 8)));
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        u32 xw[8];
        const u32 xc = xa + c * 128 + quad * 32;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(xw[0]), "=r"(xw[1]), "=r"(xw[2]), "=r"(xw[3]) : "r"(xc));
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(xw[4]), "=r"(xw[5]), "=r"(xw[6]), "=r"(xw[7]) : "r"(xc + 16));
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        chunk_products(st, lt, g, quad, c, xw, d, e);
        acc[0] += (d[0] + e[0]) * s0[c];
        acc[1] += (d[2] + e[2]) * s1[c];
    }
}

#if X_REGS
/* XS data stages a tile (a warp's run of a row, in stages of CH chunks; gate/up: a gate stage and its up stage share
   one), x held in registers: chunk c of data stage ds is column 2c + (ds & 1) of the tensor-core operand, and the
   lane in that column (g = 2c + (ds & 1)) holds it in slot ds / 2: 8 words a slot, read from shared memory once a
   launch. Every chunk's products then take the same registers (each lane gives its own chunk's x; the other columns'
   sums are not read) and lane (g, quad) sums chunk quad's column (element ds & 1) */
#define XSLOTS ((XS + 1) / 2)
template <int DS>
__device__ __forceinline__ void sum_stage_xr(u32 st, u32 lt, const u32 (&xr)[XSLOTS][8], int g, int quad,
                                             float* acc) {
    constexpr int E = DS & 1;
    float s0, s1;  /* the scales of chunk quad, rows g and g + 8 */
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(s0) : "r"(st + W_BYTES + 16 * g + 4 * quad));
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(s1) : "r"(st + W_BYTES + 16 * (g + 8) + 4 * quad));
    const u32* xw = xr[DS >> 1];
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        chunk_products(st, lt, g, quad, c, xw, d, e);
        if (quad == c) { a0 = d[E] + e[E]; a1 = d[2 + E] + e[2 + E]; }
    }
    acc[0] += a0 * s0;
    acc[1] += a1 * s1;
}
#endif


#define X_SCALED (BF16 && F16_PRODUCTS)  /* x is bf16, the products fp16: x is converted as it is staged */
#if X_SCALED
static_assert(GROUPS * WARPS <= 32, "x's largest value: one lane of a warp reads each warp's");
/* top, or the largest |value| of the 8 bf16 values of v if larger: two of them a halfword lane, as bits */
__device__ __forceinline__ u32 widest(u32 top, uint4 v) {
    top = __vmaxu2(top, v.x & 0x7FFF7FFFu);
    top = __vmaxu2(top, v.y & 0x7FFF7FFFu);
    top = __vmaxu2(top, v.z & 0x7FFF7FFFu);
    return __vmaxu2(top, v.w & 0x7FFF7FFFu);
}
/* the pair of bf16 values in w, times `scale` (a power of two), in fp16 (cvt puts its first value in the high half) */
__device__ __forceinline__ u32 scaled_pair(u32 w, float scale) {
    u32 h;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h)
        : "f"(__uint_as_float(w & 0xFFFF0000u) * scale), "f"(__uint_as_float(w << 16) * scale));
    return h;
}
__device__ __forceinline__ uint4 scaled_f16(uint4 v, float scale) {
    return make_uint4(scaled_pair(v.x, scale), scaled_pair(v.y, scale), scaled_pair(v.z, scale),
                      scaled_pair(v.w, scale));
}
#endif

__device__ __forceinline__ void group_sync(int group) {  /* the group's warps only (barrier 0 is the CTA's) */
    asm volatile("bar.sync %0, %1;" :: "r"(group + 1), "r"(GROUP_THREADS) : "memory");
}

extern "C" __global__ void __launch_bounds__(GROUPS * WARPS * 32, 1)
glmkit_gemv4_one(const u32* x, u16* __restrict__ y, const u16* bias,
                 const float* __restrict__ code,
                 const unsigned char* q0, const float* a0, int n0,
                 const unsigned char* q1, const float* a1, int n1,
                 const unsigned char* q2, const float* a2, int n2,
                 int chunks, int tiles, const float* squares, int n_squares, double eps,
                 const u16* residual, const u16* norm_weight, u16* __restrict__ scaled,
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
    const int per_tile = ROWSETS * per_warp / CH;  /* stages a tile (gate/up: a gate stage, then its up stage) */
    const int total = my_tiles * per_tile;
    const int x_words = WARPS * per_warp * 8;  /* x's 16-byte words in shared memory, zeros after the row */
    let_next_launch();

    const u32 base = (u32)__cvta_generic_to_shared(smem);
    u32 dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    /* the layout needs the shared memory asked for and (wide) the window's start it was laid out for, and x in
       registers the stages it was built for: else NaNs everywhere it writes, no sums (its first-run check then turns
       it off) */
    if ((WIDE && (base & 0xFFFFu) != BASE_LO) || dynamic_bytes < SMEM_END + 16 * x_words
        || (X_REGS && per_warp != XS * CH)) {
        wait_for_previous();
        const u16 nan = (u16)to16(__int_as_float(0x7fc00000));
        const int n = SWIGLU ? n0 / 2 : n0 + (SEGMENTS >= 2 ? n1 : 0) + (SEGMENTS >= 3 ? n2 : 0);
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
            y[i] = nan;
#if RESIDUAL
            scaled[i] = nan;
            if (i < tiles) partials[i] = __int_as_float(0x7fc00000);
#endif
        }
        return;
    }
    const u32 ring = base + RING_AT(warp);
    float* red = (float*)((char*)smem + RED_AT) + group * WARPS * SUMS;
    float* shared_rstd = (float*)((char*)smem + RED_AT) + GROUPS * WARPS * SUMS;
#if X_SCALED
    float* red_all = (float*)((char*)smem + RED_AT);  /* every group's sums */
#endif

    Copier c;
    if (my_tiles > 0) {
        const Tile tile = locate(first, q0, a0, n0, q1, a1, n1, q2, a2, n2);
        begin_tile(c, tile, chunk_begin, chunk_end, chunks, lane);
    }
    int copied = 0, slot_in = 0, stage_in = 0;  /* stages copied, the slot the next goes to, its stage of its tile */
    auto copy_next = [&]() {
        if (copied < total) {
            const bool up = SWIGLU && (stage_in & 1);
            copy_stage(ring + slot_in * STAGE, c, chunks, q0, lane, up);
            if (!SWIGLU || up) { c.q += CH * 32; c.s += CH; c.left -= CH; }
            ++copied;
            if (++stage_in == per_tile && copied < total) {  /* the next tile (rare: a division is fine) */
                stage_in = 0;
                const Tile tile = locate(first + copied / per_tile * step, q0, a0, n0, q1, a1, n1, q2, a2, n2);
                begin_tile(c, tile, chunk_begin, chunk_end, chunks, lane);
            }
        }
        slot_in = slot_in + 1 == DEPTH ? 0 : slot_in + 1;
        asm volatile("cp.async.commit_group;");
    };
    /* the first stages of the weights in flight and the table written (with programmatic dependent launch, while the
       kernel before ends); then, after waiting for it, what that kernel wrote: x (once, for every warp) and its sums
       of squares, read through pointers laundered after the wait (``after_wait``: no load of them moves above it) */
    for (int s = 0; s < DEPTH - 1; ++s) copy_next();
    write_table((u32*)((char*)smem + TABLE_AT), code, threadIdx.x, GROUPS * WARPS * 32, ENTRY_WORDS);
    wait_for_previous();
    x = after_wait(x);
    squares = after_wait(squares);
    residual = after_wait(residual);
    bias = after_wait(bias);
    norm_weight = after_wait(norm_weight);
    uint4* x_shared = (uint4*)((char*)smem + SMEM_END);
    const uint4* x4 = (const uint4*)x;
    constexpr int THREADS = GROUPS * WARPS * 32, X_AHEAD = 4;  /* x's words a thread loads before it stores any */
    uint4 xv[X_AHEAD];
#pragma unroll
    for (int j = 0; j < X_AHEAD; ++j) {
        const int i = threadIdx.x + j * THREADS;
        xv[j] = i < chunks * 8 ? x4[i] : make_uint4(0u, 0u, 0u, 0u);
    }
#if NORMED
    float part[8];
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) part[j] = lane + 32 * j < n_squares ? squares[lane + 32 * j] : 0.0f;
    }
#endif
#if X_SCALED  /* x in fp16 times 2^e, e such that its largest |value| is in [2^14, 2^15): exact (bf16's 8 bits fit
                 fp16's 11) for every value within 2^31 of the largest, never past fp16's 65504 */
    u32 top = 0u;  /* the largest |x| of the thread's words, as bf16 bits (their order is the values' order) */
#pragma unroll
    for (int j = 0; j < X_AHEAD; ++j) top = widest(top, xv[j]);
    for (int i = threadIdx.x + X_AHEAD * THREADS; i < chunks * 8; i += THREADS) top = widest(top, x4[i]);
    top = __reduce_max_sync(0xffffffffu, max(top & 0xFFFFu, top >> 16));
    if (lane == 0) red_all[warp * SUMS] = __uint_as_float(top);  /* (the sums' place, unused until a tile ends) */
    __syncthreads();
    top = __reduce_max_sync(0xffffffffu, lane < WARPS_ALL ? __float_as_uint(red_all[lane * SUMS]) : 0u);
    const int e = min(max(141 - (int)(top >> 7), -114), 100);  /* top's exponent: 2^(top >> 7 - 127) and up */
    const float x_scale = __uint_as_float((u32)(127 + e) << 23), x_unscale = __uint_as_float((u32)(127 - e) << 23);
#define STAGED(v) scaled_f16(v, x_scale)
#else
#define STAGED(v) (v)
#endif
#pragma unroll
    for (int j = 0; j < X_AHEAD; ++j) {
        const int i = threadIdx.x + j * THREADS;
        if (i < x_words) x_shared[i] = STAGED(xv[j]);
    }
    for (int i = threadIdx.x + X_AHEAD * THREADS; i < x_words; i += THREADS)  /* (over 16K columns at 16 warps) */
        x_shared[i] = i < chunks * 8 ? STAGED(x4[i]) : make_uint4(0u, 0u, 0u, 0u);
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
#if NORMED && X_SCALED  /* what the sums are multiplied by: 1 / rms, x's scale undone */
    const float sum_scale = *shared_rstd * x_unscale;
#elif NORMED
    const float sum_scale = *shared_rstd;
#elif X_SCALED
    const float sum_scale = x_unscale;
#endif
    const u32 lane_table = base + TABLE_AT + 4 * lane;
    const u32 x_first = base + SMEM_END + chunk_begin * 128;  /* x's part of the tile's first stage */
    u32 x_at = x_first;
#if X_REGS
    u32 xr[XSLOTS][8];  /* slot j: chunk g / 2 of data stage 2 j + (g & 1) */
#pragma unroll
    for (int j = 0; j < XSLOTS; ++j) {
        const u32 at = x_first + (2 * j + (g & 1)) * CH * 128 + (g >> 1) * 128 + quad * 32;
#pragma unroll
        for (int v = 0; v < 8; ++v) xr[j][v] = 0u;
        if (2 * j + (g & 1) < XS) {  /* (an odd XS: the last slot's odd column is never read) */
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xr[j][0]), "=r"(xr[j][1]), "=r"(xr[j][2]), "=r"(xr[j][3]) : "r"(at));
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xr[j][4]), "=r"(xr[j][5]), "=r"(xr[j][6]), "=r"(xr[j][7]) : "r"(at + 16));
        }
    }
#endif

    /* the sums of rows g and g + 8 (gate/up: the next stage's rows in acc, the other rows' in other) */
    float acc[2] = {0.0f, 0.0f}, other[2] = {0.0f, 0.0f};
    int slot = 0, stage = 0, tile_index = first;  /* the stage summed next: its slot, its place in its tile */
    /* what the tile's end adds (its bias; the residual stream and the next norm's weight), asked for as the tile
       starts (by the warp that ends it): they arrive while its stages are summed */
    float early_bias = 0.0f, early_residual = 0.0f, early_norm = 0.0f;
    for (int s = 0; s < total; ++s) {
        copy_next();
#if HAS_BIAS || RESIDUAL
        if (stage == 0 && gw == 0) {
            const Tile tile = locate(tile_index, q0, a0, n0, q1, a1, n1, q2, a2, n2);
            int row;
            if (ends_row(tile, lane, row)) {
#if HAS_BIAS
                early_bias = from16(bias[tile.row_out + row]);
#endif
#if RESIDUAL
                early_residual = from16(residual[row]);
                early_norm = from16(norm_weight[row]);
#endif
            }
        }
#endif
        asm volatile("cp.async.wait_group %0;" :: "n"(DEPTH - 1));
        __syncwarp();
#if X_REGS
        switch (SWIGLU ? stage >> 1 : stage) {  /* the data stage, known to the compiler in each case */
        case 0: sum_stage_xr<0>(ring + slot * STAGE, lane_table, xr, g, quad, acc); break;
#if XS > 1
        case 1: sum_stage_xr<1>(ring + slot * STAGE, lane_table, xr, g, quad, acc); break;
#endif
#if XS > 2
        case 2: sum_stage_xr<2>(ring + slot * STAGE, lane_table, xr, g, quad, acc); break;
#endif
#if XS > 3
        default: sum_stage_xr<3>(ring + slot * STAGE, lane_table, xr, g, quad, acc); break;
#endif
        }
#else
        sum_stage(ring + slot * STAGE, lane_table, x_at, g, quad, acc);
#endif
        __syncwarp();
        slot = slot + 1 == DEPTH ? 0 : slot + 1;
#if SWIGLU  /* gate and up stages take turns */
        for (int i = 0; i < 2; ++i) { const float t = acc[i]; acc[i] = other[i]; other[i] = t; }
        if (stage & 1) x_at += CH * 128;
#else
        x_at += CH * 128;
#endif
        if (++stage != per_tile) continue;
        stage = 0;
        x_at = x_first;

        /* the tile's last stage: its warps' sums, added in order, and what comes after the product */
#if X_REGS  /* each lane summed one chunk of a stage: the quad's four, added */
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
#if SWIGLU
                other[i] += __shfl_xor_sync(0xffffffffu, other[i], o);
#endif
            }
        }
#endif
        if (quad == 0) {
            red[gw * SUMS + g] = acc[0];  /* (gate/up: acc is back to the gate rows) */
            red[gw * SUMS + g + 8] = acc[1];
#if SWIGLU
            red[gw * SUMS + 16 + g] = other[0];
            red[gw * SUMS + 24 + g] = other[1];
#endif
        }
        acc[0] = acc[1] = other[0] = other[1] = 0.0f;
        group_sync(group);
        if (gw == 0) {
            const Tile tile = locate(tile_index, q0, a0, n0, q1, a1, n1, q2, a2, n2);
            const int r = lane & 15;
            int row;
            const bool stored = ends_row(tile, lane, row);
            float sum = 0.0f;
#if SWIGLU
            float up = 0.0f;
#endif
            for (int v = 0; v < WARPS; ++v) {
                sum += red[v * SUMS + r];
#if SWIGLU
                up += red[v * SUMS + 16 + r];
#endif
            }
#if NORMED || X_SCALED
            sum *= sum_scale;
#if SWIGLU
            up *= sum_scale;
#endif
#endif
#if HAS_BIAS
            if (stored) sum += early_bias;
#endif
#if SWIGLU  /* up * silu(gate), each of gate, up and silu(gate) rounded as PyTorch rounds them */
            const float gate = round16(sum);
            const float silu = round16(gate / (1.0f + expf(-gate)));
            sum = round16(up) * silu;
#endif
#if RESIDUAL  /* r + W x, W x rounded first, then the next norm's x * g and this tile's sum of squares */
            float square = 0.0f;
            if (stored) {
                sum = round16(round16(sum) + early_residual);
                scaled[row] = (u16)to16(sum * early_norm);
                square = sum * sum;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) square += __shfl_xor_sync(0xffffffffu, square, o);
            if (lane == 0) partials[tile_index] = square;
#endif
            if (stored) y[tile.row_out + row] = (u16)to16(sum);
        }
        tile_index += step;
        group_sync(group);
    }
    asm volatile("cp.async.wait_group 0;");
}
"""


def source() -> str:
    """The kernel's CUDA source (its options come as ``-D`` flags: ``_options``)."""
    return _SOURCE


# x is held in registers where a warp's run of a row is at most this many stages (16 registers; GLM-4-9B's rows of 4096
# columns: q/k/v, o_proj, gate/up), else read from shared memory each stage (down_proj's 13696 columns: 14 stages).
# On an H200, GLM-4-9B's nf4 step took 2144 µs against 2268 with x read each stage (benchmarks/results/nf4_x_regs.json).
X_REGS_MAX = 4

# The tensor cores multiply in fp16 even for a bf16 token: the 4-bit code's 16 values in fp16 are 8x closer to the
# exact ones than in bf16 (bitsandbytes' nf4 code rounded to bf16 puts a projection 0.13% off on its own:
# benchmarks/results/nf4_code_rounding.json). x is converted as it is staged, times a power of two that puts its
# largest value in [2^14, 2^15) (exact: bf16's 8 bits fit in fp16's 11, and no value overflows), undone on the sums.
# False: bf16 products for a bf16 token, as before (the benchmarks compare the two).
F16_PRODUCTS = True


def data_stages(shape: OneShape, k: int) -> int:
    """Stages of 4 chunks of 64 weights in a warp's run of a row of ``k`` columns (a gate/up tile takes each twice).

    >>> data_stages(SHAPE, 4096), data_stages(SHAPE, 13696)
    (4, 14)
    """
    chunks_a_warp = math.ceil(k // 64 / shape.warps)
    return math.ceil(chunks_a_warp / 4)


def _options(bf16: bool, swiglu: bool, bias: bool, segments: int, normed: bool, residual: bool,
             shape: OneShape, k: int) -> list[str]:
    stages = data_stages(shape, k)
    flags = dict(BF16=int(bf16), F16_PRODUCTS=int(F16_PRODUCTS), SWIGLU=int(swiglu), HAS_BIAS=int(bias),
                 SEGMENTS=segments, NORMED=int(normed), RESIDUAL=int(residual), GROUPS=shape.groups, WARPS=shape.warps,
                 DEPTH=shape.depth, WIDE=int(shape.wide), X_REGS=int(0 < stages <= X_REGS_MAX), XS=stages)
    return [f"-D{k}={v}" for k, v in flags.items()] + ["-std=c++17"]


def runs_on(device: torch.device | str, dtype: torch.dtype, *, env: bool = True) -> bool:
    """Whether this kernel takes one token of ``dtype`` on ``device``: an NVIDIA GPU of compute capability 8.0+ where
    this kernel is not turned off (``gemv4bit_mma.disable(device, why, NAME, LABEL)``), bf16/fp16, and (``env``)
    ``GLMKIT_4BIT_KERNEL`` not ``triton``.

    >>> runs_on("cpu", torch.bfloat16)
    False
    """
    return gemv4bit_mma.cuda_kernel_runs(device, dtype, NAME, env=env)


def reads_state(state: Any) -> bool:
    """Whether this kernel reads the weights of a bitsandbytes ``QuantState`` (or a ``Packed4bit``) as they are:
    bitsandbytes' default blocksize (64) and plain fp32 scales (double quantization takes the Triton kernel).

    >>> from types import SimpleNamespace
    >>> reads_state(SimpleNamespace(blocksize=64, nested=False)), reads_state(SimpleNamespace(blocksize=64, nested=True))
    (True, False)
    """
    return int(state.blocksize) == 64 and not state.nested


def usable(x: torch.Tensor, ws: tuple[Any, ...], swiglu: bool = False, *, env: bool = True) -> bool:
    """Whether ``glmkit.gemv4bit`` multiplies the one token ``x`` by these ``Packed4bit`` weights with this kernel:
    where it runs (``runs_on``) with a launch shape that fits its shared memory (``shape_for``), bitsandbytes'
    default blocksize (64), fp32 scales (no double quantization) and the bytes 16-byte aligned.

    >>> usable(torch.zeros(1, 64), ())
    False
    """
    if not x.is_cuda or x.numel() != x.shape[-1]:
        return False
    readable = all(reads_state(v) and v.data.data_ptr() % 16 == 0 and v.absmax.dtype == torch.float32
                   and v.absmax.is_contiguous() for v in ws)
    return readable and runs_on(x.device, x.dtype, env=env) and \
        shape_for(swiglu, x.shape[-1], smem_limit(x.device)) is not None


def _dependent(device: torch.device) -> bool:
    """Whether a launch now asks for programmatic dependent launch (``glmkit.gemv.dependent_launches``, Hopper on)."""
    return bool(gemv.PDL) and torch.cuda.get_device_capability(device) >= (9, 0)


def sms_left(device: torch.device, programs: int) -> int:
    """SMs a launch on ``device`` now leaves to the ``programs`` programs of the kernel after it: one each where it is
    a programmatic dependent launch and they are at most ``LEAVE_SMS_MAX``, else none (launched plainly, the next
    kernel starts only once this one has ended anyway)."""
    if not 0 < programs <= LEAVE_SMS_MAX or not _dependent(device):
        return 0
    return 0 if gemv4bit_mma.dependent_launch_refused(device) else programs  # (refused there: plain launches)


def _programs(device: torch.device, tiles: int, leave_sms: int = 0) -> int:
    """CTAs a launch: one an SM but ``leave_sms`` (at least one), fewer when there are fewer tiles (tile t goes to CTA
    t % CTAs, so the SMs share the tiles evenly and a CTA's groups take them in turn)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms - leave_sms, tiles))


def gemv_4bit_one(x: torch.Tensor, ws: tuple[Any, ...], bias: torch.Tensor | None, swiglu: bool,
                  squares: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
                  norm_weight: torch.Tensor | None = None, scaled: torch.Tensor | None = None,
                  partials: torch.Tensor | None = None, shape: OneShape | None = None,
                  leave_sms: int = 0) -> torch.Tensor:
    """``x @ W.T (+ bias)`` of one token ``[..., k]`` for up to three ``Packed4bit`` weights side by side (q, k, v),
    or ``up * silu(gate)`` of a gate/up weight (``swiglu``); with ``squares`` (a ``NormedStream``'s), x is ``x * g``
    and the sums are multiplied by ``1 / rms``; with ``residual``, ``residual + W x`` is returned and the next norm's
    ``x * g`` written to ``scaled`` and one sum of squares a tile to ``partials`` (``tiles`` of them). Launched with
    programmatic dependent launch, it leaves ``leave_sms`` SMs to the kernel after it where that is at most
    ``LEAVE_SMS_MAX`` (else none), whose programs then start while it runs (the decode attention's, after q/k/v).
    The caller (``glmkit.gemv4bit``) has checked the inputs and ``usable``."""
    w = ws[0]
    k = w.shape[1]
    rows = [v.shape[0] for v in ws]
    n_out = rows[0] // 2 if swiglu else sum(rows)
    shape = shape or launch_shape(x.device, n_out, k, swiglu)
    xf = gemv4bit_mma.aligned16(x)  # copied 16 bytes at a time
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    t = tiles(rows, swiglu)
    slots: list[Any] = []
    for v, n in zip(ws, rows):
        slots += [v.data, v.absmax, n]
    slots += slots[:3] * (3 - len(ws))
    options = _options(x.dtype == torch.bfloat16, swiglu, bias is not None, len(ws), squares is not None,
                       residual is not None, shape, k)
    bias16 = None if bias is None else bias.to(x.dtype).contiguous()  # (both read in x's type)
    norm16 = None if norm_weight is None else norm_weight.to(x.dtype).contiguous()
    # (eps goes as a Python float, which torch's launcher passes as a C double: the kernel takes a double)
    args = [xf, y, or_stand_in(bias16, y), w.code, *slots, k // 64, t, or_stand_in(squares, y),
            0 if squares is None else squares.numel(), float(eps), or_stand_in(residual, y), or_stand_in(norm16, y),
            or_stand_in(scaled, y), or_stand_in(partials, y)]
    gemv4bit_mma.launch(x.device, options, (_programs(x.device, t, sms_left(x.device, leave_sms)), 1, 1),
                        (shape.groups * shape.warps * 32, 1, 1), args, shape.smem_bytes(swiglu, k), _SOURCE, NAME,
                        pdl=_dependent(x.device))
    return y


def tiles(rows: list[int], swiglu: bool) -> int:
    """Tiles of 16 rows (gate/up: 16 of each) of weights of ``rows`` rows side by side: the sums of squares a
    residual launch writes.

    >>> tiles([4096], False), tiles([27392], True)
    (256, 856)
    """
    return sum(-(-(n // 2 if swiglu else n) // 16) for n in rows)
