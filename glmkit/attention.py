"""Decode attention for GLM-4 as one Triton kernel: rotary embedding, the KV-cache write and attention over the cache.

At batch 1 a decode step's attention reads little (GLM-4-9B: 2 KV heads x 128 dims, 1 KiB a cached token in bf16)
but compiled, it still ran as three kernels a layer: two for the rotary embedding and the cache write, then cuDNN's
SDPA (H100, 32 cached tokens: 1.2 + 1.4 + 4.3 µs a layer, ``benchmarks/results/profile_step.json``).
``decode_attention`` does it in one kernel: each program takes one KV head of one sequence with *all* the query heads
that share it (GLM-4-9B: 16), rotates q and k, writes k and v at the sequence's position, and reads each K/V tile
once for its 16 query heads, softmax in fp32. A long cache is split over several programs (flash-decoding: each
keeps its partial max, sum and output), so a 32K cache fills the GPU; with ``tickets`` (the decoders pass them) the
last program of a KV head to finish combines the splits in the same kernel, and a short cache at batch 1 is split
into its tiles too, side by side; without them a second small kernel combines. The grid is sized from the cache
length, not from the position (which lives on the device): programs past a sequence's position exit at once, so a
CUDA graph replays it for every token, and ``torch.compile(fullgraph=True)`` traces it as a user-defined Triton
kernel. Positions after a sequence's own are never read: the stale K/V a chunked prefill or an earlier request
leaves there change nothing. ``cos_table``: the kernel reads the rotary tables at each sequence's position itself.

``FastDecoder(attention="triton")`` uses it (``"auto"``, the default, wherever the Triton GEMVs run); notebook
``05_tuning.ipynb`` teaches the fast path. On a CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``).

>>> import torch
>>> from glmkit.gemv import triton_available
>>> if triton_available():
...     dev = "cuda" if torch.cuda.is_available() else "cpu"
...     b, heads, kv, hd, max_len = 1, 4, 2, 64, 32
...     q, k, v = torch.randn(b, heads, hd, device=dev), torch.randn(b, kv, hd, device=dev), torch.randn(b, kv, hd, device=dev)
...     k_cache, v_cache = torch.randn(b, kv, max_len, hd, device=dev), torch.randn(b, kv, max_len, hd, device=dev)
...     cos, sin = torch.ones(b, 32, device=dev), torch.zeros(b, 32, device=dev)  # position 0: no rotation
...     pos, rows = torch.tensor([5], device=dev), torch.arange(b, device=dev)
...     out = decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin)  # [b, heads, 1, hd]
...     ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :6], v_cache[:, :, :6],
...                                                            enable_gqa=True)
...     assert torch.equal(k_cache[0, :, 5], k[0]) and torch.allclose(out, ref, atol=1e-4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmkit.gemv import INTERPRETER, launch_options, triton, triton_available

if triton is not None:
    import triton.language as tl

    from glmkit.gemv import allow_next_kernel, wait_for_inputs, wait_for_previous_kernel

BLOCK_N = 64  # cache positions per tile (a K tile [64, 128] in bf16 is 16 KiB) where a cache is split over programs
# positions per tile and warps where one program walks a KV head's whole cache of a single sequence (batch 1, a
# short cache, no combine): fewer steps one after another. GLM-4-9B at batch 1 on an H200, a 288-position cache:
# 211.6 tok/s against 207.8 with (BLOCK_N, 4) (benchmarks/results/attention_tiles.json)
SHORT_TILE = (128, 8)
TARGET_PROGRAMS = 256  # programs a long cache is split into, about two per SM of an H100/H200 (132 SMs)
MAX_SPLITS = 128  # at most this many splits per sequence and KV head: the combine reads one partial output each
# Splits the last program of a KV head combines a step, in the kernel (``tickets``): each step holds the partial outputs
# of the KV head's query heads, [group, this, head_dim] fp32. GLM-4-9B's 16 x 32 x 128 spilled: compiled for sm_90, a
# 5760-byte stack at 32 registers a thread with 128 splits (a cache of 8192 or more positions), 1208 bytes with 32;
# 4 does not spill (tests/test_gemv.py). The combine kernel of its own (no tickets) keeps COMBINE_STEP.
TICKET_COMBINE_STEP = 4
COMBINE_STEP = 32
# The first K/V tile of the cache is read before waiting for q/k/v (programmatic dependent launch): those loads are in
# flight while the kernel before finishes. GLM-4-9B at batch 1 on an H200, one run: a step 4790 µs against 4824 in
# bf16, 4800 against 4864 in fp16 (benchmarks/results/early_reads.json)
PRELOAD = True
# The next kernel (o_proj) may launch only once this one's reads of q, k and v have arrived, not first thing.
# GLM-4-9B at batch 1 on an H200, one run: an fp16 step 4665 µs against 4697 at a 160-token cache, 4581 against 4627
# at 40; bf16 unchanged, 4645 against 4642 and 4563 against 4569 (benchmarks/results/launch_late.json)
LAUNCH_NEXT_LATE = True
# Where one program walks a short cache (batch 1), its loop over tiles is not software-pipelined by Triton (one stage:
# no shared-memory staging of the next tiles, 1208 sm_90 instructions against 1416 and 40 KB of shared memory against
# 135 KB) and reads the next tile into registers before it multiplies the tile in hand (only when there is one).
# GLM-4-9B bf16 at batch 1 on an H200, one run: a step 4527 / 4633 / 4715 µs at a 40 / 160 / 280-token cache against
# 4564 / 4652 / 4715 pipelined, 216.3 tok/s against 215.1; one stage without reading ahead: 4529 / 4633 / 4732
# (benchmarks/results/attention_stages.json). Tokens bitwise equal to the pipelined kernel's.
SHORT_STAGES = 1  # Triton's num_stages for that loop (None: Triton's default)
SHORT_AHEAD = True  # (tiles of SHORT_TILE's positions: ``reads_ahead``)
# The new position's k and v are attended to apart from the cache tiles (one score per query head, the softmax started
# from it), and the tiles stop before that position: each tile goes from the cache to the tensor cores as read (the
# kernel had put the new k, v into the tile holding their position, element by element: 220 registers a thread
# against 128, 3895 sm_90 instructions against 2807). GLM-4-9B at batch 1 on an H200, two runs: a bf16 step 4646 µs
# against 4685 and 4725 against 4749; fp16 4697 against 4737 (benchmarks/results/attention_apart.json)
ONE_SPLIT_MAX = 512  # a cache of at most this many positions is one program per sequence and KV head, no combine
# ... unless the caller gives ``tickets`` (the decoders do): then a short cache at batch 1 is split into tiles of
# TICKET_TILE[0] positions, one program each (TICKET_TILE[1] warps), side by side instead of one after another, and
# the last program of a KV head to finish combines the splits in the same kernel (no second launch; so does a long
# cache's). Where pos lies in the first tile, that program writes the output itself. GLM-4-9B bf16 at batch 1 on an
# H200, one run: a step 4507 / 4579 / 4577 µs at a 40 / 160 / 280-token cache against 4507 / 4612 / 4695 with one
# program walking the tiles, 218.6 against 217.2 tok/s; fp16 217.6 against 216.2 (attention_tickets*.json; another
# H200, slower throughout: 214.8 against 213.5, attention_tickets_run2.json). Tiles of 64 with 4 warps were slower at
# every length (attention_tickets_first.json).
TICKET_TILE = (128, 8)
# Where the kernel before leaves SMs to this one's programs (``early``: glmkit's batch-1 q/k/v CUDA kernels, 4-bit
# and 16-bit, ``glmkit.gemv4bit_one.sms_left``, ``glmkit.gemv16_one``), they start while it runs, and read their
# first tile meanwhile: a tile of
# EARLY_TILE[0] positions (EARLY_TILE[1] warps) then holds a short cache's first 256 positions before q/k/v ends (a
# cache of up to 256: no second tile and no combine; up to ONE_SPLIT_MAX: tiles of 256 side by side, combined).
# GLM-4-9B nf4 at batch 1 on an H200, one run: 431.8 tok/s against 430.0 with TICKET_TILE (a step at a 160-token
# cache 2286 µs against 2330); without SMs left (bf16's q/k/v through the Triton GEMV), tiles of 256 were slower:
# 213.2 against 215.2 (benchmarks/results/nf4_leave_sms.json; on a second H200 432.2 against 429.8, and 216.1
# against 218.4). With them left, bf16's tiles of 128 were slower than 256: a step 4694 against 4571 µs
# (gemv16_variants.json).
EARLY_TILE = (256, 8)


def split_length(batch: int, kv_heads: int, max_len: int, target: int = TARGET_PROGRAMS) -> int:
    """Cache positions each program covers: the whole cache up to ``ONE_SPLIT_MAX`` positions (one launch, no
    combine); above, ``batch * kv_heads * max_len / target`` rounded up to a power of two, at least one tile
    (``BLOCK_N``), and few enough splits that combining them stays small (``MAX_SPLITS``). Chosen from the cache
    length, not the position (a CUDA graph replays one grid for every token).

    >>> split_length(1, 2, 288), split_length(1, 2, 32768), split_length(16, 2, 32768), split_length(1, 2, 2048)
    (320, 256, 4096, 64)
    """
    if triton is None:
        raise RuntimeError("glmkit.attention needs Triton: it comes with PyTorch's CUDA builds (pip install triton).")
    if max_len <= ONE_SPLIT_MAX:
        return triton.cdiv(max_len, BLOCK_N) * BLOCK_N
    per_program = triton.cdiv(batch * kv_heads * max_len, target)
    length = max(BLOCK_N, triton.next_power_of_2(per_program), triton.next_power_of_2(triton.cdiv(max_len, MAX_SPLITS)))
    return min(length, max(BLOCK_N, triton.next_power_of_2(max_len)))


@dataclass(frozen=True)
class Grid:
    """How ``decode_attention`` launches: ``splits`` programs a sequence and KV head (``split`` cache positions
    each), walking tiles of ``tile`` positions with ``warps`` warps; ``programs`` in all.

    >>> Grid.of(1, 2, 296, tickets=True)
    Grid(split=128, splits=3, tile=128, warps=8, programs=6, side_by_side=True)
    >>> Grid.of(1, 2, 296, tickets=True, early=True).programs  # the kernel before left it SMs: tiles of 256
    4
    """

    split: int
    splits: int
    tile: int
    warps: int
    programs: int
    side_by_side: bool = False  # one sequence, a cache of up to ONE_SPLIT_MAX, tickets: tiles side by side (or one)

    @staticmethod
    def of(batch: int, kv_heads: int, max_len: int, tickets: bool, split: int | None = None,
           early: bool = False) -> Grid:
        """The launch of ``batch`` sequences of a cache of ``kv_heads`` x ``max_len`` positions, with ``tickets`` or
        without, ``split`` positions a program if given (``decode_attention``'s arguments)."""
        ticket_split = tickets and batch == 1 and max_len <= ONE_SPLIT_MAX
        spread = EARLY_TILE if early else TICKET_TILE
        split = split or (spread[0] if ticket_split else split_length(batch, kv_heads, max_len))
        splits = -(-max_len // split)
        one = splits == 1 and batch == 1  # one program walks a KV head's whole cache: the shape measured
        tile, warps = (spread if early else SHORT_TILE) if one else spread if ticket_split else (BLOCK_N, 4)
        if ticket_split:  # a split given below the tile: tiles of at most the split, a power of two
            tile = min(tile, 1 << (split.bit_length() - 1))
        return Grid(split, splits, tile, warps, batch * kv_heads * splits, ticket_split)


def combine_step(splits: int, tickets: bool) -> int:
    """Splits combined a step: by the last program of a KV head in the kernel (``tickets``: ``TICKET_COMBINE_STEP``),
    or by the combine kernel (``COMBINE_STEP``); at most the splits, rounded up to a power of two.

    >>> combine_step(128, tickets=True), combine_step(128, tickets=False), combine_step(2, tickets=True)
    (4, 32, 2)
    """
    return min(TICKET_COMBINE_STEP if tickets else COMBINE_STEP, triton.next_power_of_2(splits))


def reads_ahead(grid: Grid, batch: int) -> bool:
    """Whether the program that walks a KV head's whole short cache reads its next tile into registers before it
    multiplies the tile in hand (``SHORT_AHEAD``, measured with ``SHORT_TILE``'s tiles): only for tiles of at most
    ``SHORT_TILE``'s positions. A tile of ``EARLY_TILE``'s 256, the one launch a cache of at most 256 positions gets
    when the kernel before leaves it SMs, held twice spills: compiled for sm_90 a 3176-byte stack at 128 registers
    a thread, against 520 bytes without reading ahead (``tests/test_gemv.py``); GLM-4-9B's batch-1 step with such a
    cache decoded 16-28% slower than with one of 264-512 positions on an H200 (``benchmarks/results/
    max_len_sweep.json``).

    >>> reads_ahead(Grid.of(1, 2, 200, tickets=False), 1), reads_ahead(Grid.of(1, 2, 200, tickets=True, early=True), 1)
    (True, False)
    """
    return SHORT_AHEAD and grid.splits == 1 and batch == 1 and grid.tile <= SHORT_TILE[0]


def auto_attention(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """What ``attention="auto"`` picks: ``"triton"`` on a GPU where glmkit's Triton GEMVs run (Triton installed,
    compute capability 8.0+, or 7.0+ for fp16/fp32), at any batch size; otherwise ``"sdpa"``.

    >>> auto_attention(torch.device("cpu"))
    'sdpa'
    """
    if device.type != "cuda" or not triton_available():
        return "sdpa"
    capability = torch.cuda.get_device_capability(device)
    return "triton" if capability >= (8, 0) or (capability >= (7, 0) and dtype != torch.bfloat16) else "sdpa"


if triton is not None:

    @triton.jit
    def _attend_tile(q, k, v, n, end, m_i, l_i, acc, scale_log2, IEEE: tl.constexpr):
        # one tile of cache positions n [BLOCK_N] (those < end are used, all before the new position: its k, v are
        # attended to apart, _attend_new): K/V tiles [BLOCK_N, BLOCK_D] as read from the cache; the online
        # softmax's running max m_i, sum l_i and output acc, updated
        cache_dtype = k.dtype
        if IEEE:  # fp32 products (not tf32); also 16-bit ones in the interpreter, whose 16-bit dot is wrong
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # [BLOCK_G, BLOCK_N], in log2 units; fp32 whatever type a compiler gives the scalar scale (Inductor: fp64)
        s = tl.where((n < end)[None, :], (s * scale_log2).to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(cache_dtype).to(tl.float32), v.to(tl.float32),
                                                input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(cache_dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _load_tile(k_head, v_head, n, end, d, d_ok, stride_cn):
        # the K and V tiles [BLOCK_N, BLOCK_D] of cache positions n (those < end; the rest read as 0)
        ok = (n < end)[:, None] & d_ok[None, :]
        return (tl.load(k_head + n[:, None] * stride_cn + d[None, :], mask=ok, other=0.0),
                tl.load(v_head + n[:, None] * stride_cn + d[None, :], mask=ok, other=0.0))

    @triton.jit
    def _attend_new(q, k_new, v_new, scale_log2, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        # the softmax state after the new position alone: its score per query head, max = that score, sum = 1 and
        # output = v_new (products in fp32 as the tensor cores form them, v_new in the cache's dtype as the tiles)
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2
        acc = tl.broadcast_to(v_new.to(tl.float32)[None, :], (BLOCK_G, BLOCK_D))
        return s.to(tl.float32), tl.full([BLOCK_G], 1.0, tl.float32), acc

    # No inline PTX (tl.inline_asm_elementwise) in this kernel or the functions it calls: a compiled layer traces it,
    # and torch.compile's mutation analysis cannot read inline asm ("ttir analysis hit an op we do not know how to
    # analyze"); on an H200 a compiled nf4 decoder whose attention kernel held some changed its tokens
    # (benchmarks/results/prefetch_l2.json's note). glmkit's 4-bit kernels may: they are opaque PyTorch ops.
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, row_ptr, k_cache_ptr, v_cache_ptr,
                                 out_ptr, m_ptr, l_ptr, acc_ptr, ticket_ptr, stride_qb, stride_qh, stride_kb, stride_kh,
                                 stride_vb, stride_vh, stride_cos, stride_sin, stride_cb, stride_ch, stride_cn,
                                 max_len, scale_log2, KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 ROTARY: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
                                 PDL: tl.constexpr, PRELOAD: tl.constexpr, LATE: tl.constexpr,
                                 AHEAD: tl.constexpr, TICKETS: tl.constexpr, BLOCK_S: tl.constexpr,
                                 COS_TABLE: tl.constexpr):
        # one program: sequence i, KV head h, cache positions [split * SPLIT, (split + 1) * SPLIT) up to pos[i].
        # Under PDL several kernels before this one may still be running, so before waiting it reads only what no
        # kernel of this step's layers writes: the position, cos/sin and the cache rows (made by plain PyTorch
        # kernels at the start of the step, which finish before the first PDL launch starts) and the first K/V tile
        # of this layer's cache (written by earlier steps; position pos, the one this kernel writes, is not read
        # from it: the new k, v are attended to apart), so that their loads are in flight meanwhile. A program past
        # pos returns without waiting: split 0 always waits, so the kernel still ends after the one before. LATE: the
        # next kernel may launch only once q, k and v have been read (after this program's cache write), else at once.
        if not LATE:
            allow_next_kernel(PDL)
        if not PRELOAD:
            wait_for_inputs(PDL)
        pid = tl.program_id(0)
        split = tl.program_id(1)
        i = pid // KV
        h = pid % KV
        pos = tl.load(pos_ptr + i).to(tl.int32)  # positions, loop bounds and offsets within a row: int32
        start = split * SPLIT
        if start > pos:  # past the sequence's position: nothing to read (the combine skips this split)
            if LATE:
                allow_next_kernel(PDL)
            return
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        partner = d ^ 1  # GLM rotates interleaved pairs (0, 1), (2, 3), ... of the first ROTARY dims
        rot = d < ROTARY
        # cos/sin: tables over the cache's positions (row pos; a position past the cache, which writes nothing,
        # reads the last row: never past the table), or one row per sequence
        cos_row = tl.minimum(pos, max_len - 1) if COS_TABLE else i
        cos = tl.load(cos_ptr + cos_row * stride_cos + d, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + cos_row * stride_sin + d, mask=rot, other=0.0).to(tl.float32)
        sin = tl.where(d % 2 == 0, -sin, sin)  # rotate_half: (-x[2j+1], x[2j])
        row = tl.load(row_ptr + i)  # int64: row * stride_cb may pass 2**31 on a large batch of long caches
        k_head = k_cache_ptr + row * stride_cb + h * stride_ch
        v_head = v_cache_ptr + row * stride_cb + h * stride_ch
        end = tl.minimum(tl.minimum(start + SPLIT, pos), max_len)  # the cache positions read: those before pos
        n = start + tl.arange(0, BLOCK_N)
        k_first, v_first = _load_tile(k_head, v_head, n, end, d, d_ok, stride_cn)
        if PRELOAD:
            wait_for_inputs(PDL)
        g = tl.arange(0, BLOCK_G)
        heads = h * GROUP + g  # the query heads that share KV head h
        q_ok = (g < GROUP)[:, None] & d_ok[None, :]
        q_rows = q_ptr + i * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_rows + d[None, :], mask=q_ok, other=0.0).to(tl.float32)
        q_pair = tl.load(q_rows + partner[None, :], mask=q_ok, other=0.0).to(tl.float32)
        cache_dtype = k_cache_ptr.dtype.element_ty
        q = (q * cos[None, :] + q_pair * sin[None, :]).to(cache_dtype)  # [BLOCK_G, BLOCK_D], rounded as rope() is
        k_row = k_ptr + i * stride_kb + h * stride_kh
        k_new = (tl.load(k_row + d, mask=d_ok, other=0.0).to(tl.float32) * cos
                 + tl.load(k_row + partner, mask=d_ok, other=0.0).to(tl.float32) * sin).to(cache_dtype)
        v_new = tl.load(v_ptr + i * stride_vb + h * stride_vh + d, mask=d_ok, other=0.0).to(cache_dtype)
        holds = (split == pos // SPLIT) & (pos < max_len)  # the one program whose split holds pos
        if holds:  # writes the new k, v
            tl.store(k_head + pos * stride_cn + d, k_new, mask=d_ok)
            tl.store(v_head + pos * stride_cn + d, v_new, mask=d_ok)
        if LATE:
            allow_next_kernel(PDL)
        # and starts its softmax from them: a finite max before any tile (a tile with nothing before pos adds
        # nothing); the others start empty and have a position before pos in their first tile
        m_new, l_new, acc_new = _attend_new(q, k_new, v_new, scale_log2, BLOCK_G, BLOCK_D)
        m_i = tl.where(holds, m_new, float("-inf"))
        l_i = tl.where(holds, l_new, 0.0)
        acc = tl.where(holds, acc_new, 0.0)
        if AHEAD:  # each tile's loads issued before the tile before is multiplied, in registers
            if start + BLOCK_N < end:
                k_next, v_next = _load_tile(k_head, v_head, n + BLOCK_N, end, d, d_ok, stride_cn)
            else:
                k_next = tl.zeros_like(k_first)
                v_next = tl.zeros_like(v_first)
        m_i, l_i, acc = _attend_tile(q, k_first, v_first, n, end, m_i, l_i, acc, scale_log2, IEEE)
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            if AHEAD:
                k, v = k_next, v_next
                k_next, v_next = _load_tile(k_head, v_head, n + BLOCK_N, end, d, d_ok, stride_cn)
            else:
                k, v = _load_tile(k_head, v_head, n, end, d, d_ok, stride_cn)
            m_i, l_i, acc = _attend_tile(q, k, v, n, end, m_i, l_i, acc, scale_log2, IEEE)
        g_ok = g < GROUP
        out_rows = out_ptr + i * (KV * GROUP * HEAD_DIM) + heads[:, None] * HEAD_DIM + d[None, :]
        # the output itself where this program saw the whole cache up to pos: one split, or (TICKETS) pos in split 0
        if SPLITS == 1 or (TICKETS and pos < SPLIT):
            tl.store(out_rows, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_ok)
        else:  # partial max, sum and output of this split, [b, heads, SPLITS(, HEAD_DIM)], for the combine
            first = (i * (KV * GROUP) + heads) * SPLITS
            at = first + split
            tl.store(m_ptr + at, m_i, mask=g_ok)
            tl.store(l_ptr + at, l_i, mask=g_ok)
            tl.store(acc_ptr + at[:, None] * HEAD_DIM + d[None, :], acc, mask=q_ok)
            if TICKETS:  # the last split of (i, h) to finish combines them all, in this kernel
                used = tl.minimum(pos // SPLIT + 1, SPLITS)  # the splits that hold 0..pos
                tl.debug_barrier()  # every thread's stores above, then one release by the ticket's atomic
                ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if ticket == used - 1:
                    out = _combine_splits(m_ptr, l_ptr, acc_ptr, first, used, g_ok, d, d_ok, HEAD_DIM, BLOCK_S)
                    tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=q_ok)
                    # for the next launch of this buffer: visible once this kernel has ended, which every later
                    # kernel waits for before it reads the buffer (stream order; under PDL, each one's wait)
                    tl.store(ticket_ptr + pid, 0)

    @triton.jit
    def _combine_splits(m_ptr, l_ptr, acc_ptr, first, used, g_ok, d, d_ok, HEAD_DIM: tl.constexpr,
                        BLOCK_S: tl.constexpr):
        # softmax-weighted sum of the partial outputs of splits 0..used-1 for the query heads whose partials start
        # at first [BLOCK_G], BLOCK_S splits a step; read from L2 (.cg: written by other programs of this kernel)
        s = tl.arange(0, BLOCK_S)
        m_run = tl.full(first.shape, float("-inf"), tl.float32)
        l_run = tl.zeros(first.shape, tl.float32)
        acc_run = tl.zeros((first.shape[0], d.shape[0]), tl.float32)
        for s0 in range(0, used, BLOCK_S):
            ok = g_ok[:, None] & (s0 + s < used)[None, :]
            at = first[:, None] + s0 + s[None, :]  # [BLOCK_G, BLOCK_S]
            m = tl.load(m_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(l_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
            part = tl.load(acc_ptr + at[:, :, None] * HEAD_DIM + d[None, None, :],
                           mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, axis=1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # heads past GROUP: no NaN from -inf - -inf
            w = tl.exp2(m - m_new[:, None])
            alpha = tl.exp2(m_run - m_new)
            l_run = l_run * alpha + tl.sum(w * l_s, axis=1)
            acc_run = acc_run * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=1)
            m_run = m_new
        return acc_run / tl.where(g_ok, l_run, 1.0)[:, None]

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                        PDL: tl.constexpr):
        # one program: one query head of one sequence; softmax-weighted sum of the partial outputs of its splits.
        # (Not _combine_splits, which the ticket's last program runs over its KV head's query heads: here that would
        # be 2 programs at batch 1 instead of 32, each holding a [16, BLOCK_S, HEAD_DIM] tile.)
        wait_for_previous_kernel(PDL)
        pid = tl.program_id(0)
        i = pid // HEADS
        used = tl.minimum(tl.load(pos_ptr + i).to(tl.int32) // SPLIT + 1, SPLITS)  # splits that held 0..pos
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        base = pid * SPLITS
        m_all = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, used, BLOCK_S):
            m_all = tl.maximum(m_all, tl.load(m_ptr + base + s0 + s, mask=s0 + s < used, other=float("-inf")))
        m = tl.max(m_all, axis=0)
        l_all = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for s0 in range(0, used, BLOCK_S):
            ok = s0 + s < used
            w = tl.exp2(tl.load(m_ptr + base + s0 + s, mask=ok, other=float("-inf")) - m)
            l_all += w * tl.load(l_ptr + base + s0 + s, mask=ok, other=0.0)
            part = tl.load(acc_ptr + (base + s0 + s)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None] & d_ok[None, :],
                           other=0.0)
            acc += w[:, None] * part
        out = tl.sum(acc, axis=0) / tl.sum(l_all, axis=0)
        tl.store(out_ptr + pid * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: torch.Tensor, batch_index: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           cos_table: bool = False, tickets: torch.Tensor | None = None) -> None:
    """Clear errors for inputs the kernel cannot take (it reads raw pointers: a wrong shape would read garbage)."""
    if triton is None:
        raise RuntimeError("glmkit.attention needs Triton: it comes with PyTorch's CUDA builds (pip install triton).")
    if not (k_cache.is_cuda or INTERPRETER):
        raise ValueError("decode_attention runs on a GPU (or in Triton's CPU interpreter, TRITON_INTERPRET=1); this "
                         f"cache is on {k_cache.device}: use attention='sdpa' there.")
    if q.ndim != 3 or k_cache.ndim != 4:
        raise ValueError(f"decode_attention takes q [b, heads, head_dim] and caches [B, kv_heads, max_len, head_dim], "
                         f"got q {tuple(q.shape)} and a cache {tuple(k_cache.shape)}.")
    if len({t.device for t in (q, k, v, k_cache, v_cache, pos, batch_index, cos, sin)}) != 1:
        raise ValueError("decode_attention needs q, k, v, the caches, pos, batch_index and cos/sin on one device.")
    if q.dtype != k_cache.dtype or pos.is_floating_point() or batch_index.dtype != torch.int64:
        raise ValueError(f"decode_attention needs q in the cache's dtype ({k_cache.dtype}, got {q.dtype}), integer "
                         f"positions (got {pos.dtype}) and int64 cache rows (got {batch_index.dtype}).")
    b, heads, hd = q.shape
    kv = k_cache.shape[1]
    if k.shape != (b, kv, hd) or v.shape != (b, kv, hd) or heads % kv:
        raise ValueError(f"decode_attention takes q [b, heads, head_dim], k and v [b, kv_heads, head_dim] (heads a "
                         f"multiple of kv_heads), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[-1] != hd:
        raise ValueError(f"k_cache and v_cache must be alike [B, kv_heads, max_len, {hd}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    # cos/sin: one row per sequence, or (cos_table) a table with a row for every cache position
    rows_ok = cos.shape[0] >= k_cache.shape[2] if cos_table else cos.shape[0] == b
    if pos.shape != (b,) or batch_index.shape != (b,) or not rows_ok or cos.ndim != 2 or cos.shape != sin.shape:
        want = f"[{k_cache.shape[2]} or more cache positions" if cos_table else f"[{b}"
        raise ValueError(f"decode_attention takes one position and one cache row per sequence ([{b}] each) and "
                         f"cos/sin {want}, rotary_dim]; got pos {tuple(pos.shape)}, batch_index "
                         f"{tuple(batch_index.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}.")
    if cos.shape[-1] % 2 or cos.shape[-1] > hd:
        raise ValueError(f"rotary_dim (cos.shape[-1] = {cos.shape[-1]}) must be even and at most head_dim {hd}.")
    strides = (q.stride(-1), k.stride(-1), v.stride(-1), k_cache.stride(-1), cos.stride(-1), sin.stride(-1))
    if any(s != 1 for s in strides):
        raise ValueError("decode_attention needs the last dimension of q, k, v, the caches and cos/sin contiguous.")
    if tickets is not None and (tickets.dtype != torch.int32 or tickets.device != q.device or
                                not tickets.is_contiguous() or tickets.numel() < b * kv):
        raise ValueError(f"decode_attention's tickets must be contiguous int32 zeros on {q.device}, at least "
                         f"{b * kv} (one per sequence and KV head), got {tickets.numel()} {tickets.dtype} on "
                         f"{tickets.device}.")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, batch_index: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, split: int | None = None, tickets: torch.Tensor | None = None,
                     cos_table: bool = False, early: bool = False) -> torch.Tensor:
    """GLM's rotary embedding of ``q`` and ``k``, ``k``/``v`` written into the static cache at ``pos``, and
    ``softmax(q kᵀ / √head_dim) v`` over cache positions ``0..pos`` of each sequence, for one new token each.

    The same as ``rope`` + ``k_cache[batch_index, :, pos] = k`` + ``F.scaled_dot_product_attention(...,
    enable_gqa=True)`` with the decoder's mask (0 up to pos, -inf after): positions after ``pos`` are never read,
    so stale K/V there (a chunked prefill's, another request's) change nothing.

    Args:
        q: ``[b, heads, head_dim]`` before the rotary embedding; k, v: ``[b, kv_heads, head_dim]`` (views of the
            fused q/k/v projection are fine: only the last dimension must be contiguous).
        k_cache, v_cache: ``[B, kv_heads, max_len, head_dim]`` (written in place, at ``[batch_index[i], :, pos[i]]``).
        pos: ``[b]`` each sequence's position (on the device: the grid does not depend on it); batch_index:
            ``[b]`` each sequence's cache row.
        cos, sin: ``[b, rotary_dim]`` at each sequence's position, each frequency repeated for its pair of dims
            (as ``FastDecoder`` builds them); dims past ``rotary_dim`` are not rotated. With ``cos_table``: the
            tables over all cache positions, ``[max_len, rotary_dim]``.
        split: cache positions per program (a multiple of ``BLOCK_N``); default ``split_length``, or with
            ``tickets`` on a short cache at batch 1, ``TICKET_TILE``'s.
        tickets: int32 zeros, one per sequence and KV head (``[b * kv_heads]`` or more), kept by the caller for
            all its calls (the kernel leaves them zero; not checked: a count left above zero would combine the
            splits too early): the splits of a cache are then combined by the last program of
            each KV head to finish, in the same kernel, and a short cache at batch 1 is split too (``TICKET_TILE``).
            Without them a split cache takes a second, combining kernel. One buffer must not serve two launches
            that run at the same time (two streams).
        cos_table: cos/sin are tables over cache positions (``[max_len, rotary_dim]`` or more rows): the kernel
            reads each sequence's row ``pos[i]`` itself (no gather kernels before it).
        early: the kernel before left SMs to this one's programs (``Grid.of(...).programs`` of them: glmkit's 4-bit
            q/k/v, ``glmkit.gemv4bit.sms_left_by``), so they start while it runs: a short cache at batch 1 is read in
            tiles of ``EARLY_TILE`` positions, each read whole before q/k/v ends.

    Returns the attention output ``[b, heads, 1, head_dim]``, a view of a ``[b, 1, heads * head_dim]`` buffer: what
    ``o_proj`` reads, with no copy. Introduced with the fast path in ``notebooks/05_tuning.ipynb``. It runs on a GPU
    or in Triton's CPU interpreter (``TRITON_INTERPRET=1`` before glmkit is imported, as the tests set it); a CPU
    tensor without the interpreter gets a ``ValueError`` that says to use ``attention='sdpa'``, the path below:

    >>> import torch.nn.functional as F
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
    >>> q, k, v = (torch.randn(1, n, 64, device=dev) for n in (4, 2, 2))  # 4 query heads share 2 KV heads
    >>> k_cache, v_cache = torch.randn(1, 2, 16, 64, device=dev), torch.randn(1, 2, 16, 64, device=dev)
    >>> cos, sin = torch.ones(1, 64, device=dev), torch.zeros(1, 64, device=dev)  # (no rotation: keeps it short)
    >>> pos, rows = torch.tensor([2], device=dev), torch.tensor([0], device=dev)
    >>> if triton_available():  # a GPU, or the interpreter: one kernel
    ...     out = decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin)
    ... else:  # what it equals: the cache write, then PyTorch's attention over positions 0..pos
    ...     k_cache[0, :, 2], v_cache[0, :, 2] = k[0], v[0]
    ...     out = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :3], v_cache[:, :, :3], enable_gqa=True)
    >>> ref = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :3], v_cache[:, :, :3], enable_gqa=True)
    >>> tuple(out.shape), torch.equal(k_cache[0, :, 2], k[0]), torch.allclose(out, ref, atol=1e-5)
    ((1, 4, 1, 64), True, True)
    """
    _check(q, k, v, k_cache, v_cache, pos, batch_index, cos, sin, cos_table, tickets)
    pos, batch_index = pos.contiguous(), batch_index.contiguous()  # read as pos_ptr + i (an expanded view is not)
    b, heads, hd = q.shape
    kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv
    grid = Grid.of(b, kv, max_len, tickets is not None, split, early)
    split, splits, tile = grid.split, grid.splits, grid.tile
    if split % BLOCK_N:
        raise ValueError(f"split must be a multiple of {BLOCK_N} cache positions, got {split}.")
    out = torch.empty(b, 1, heads * hd, dtype=q.dtype, device=q.device)
    if splits > 1:  # partial max, sum and output per split, combined below
        m = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
        lse = torch.empty_like(m)
        acc = torch.empty(b, heads, splits, hd, dtype=torch.float32, device=q.device)
    else:  # unused (one split writes the output itself); own tensors: no argument aliases the output
        m = torch.empty(1, dtype=torch.float32, device=q.device)
        lse, acc = torch.empty_like(m), torch.empty_like(m)
    block_d = max(16, triton.next_power_of_2(hd))
    short = splits == 1 and b == 1  # one program walks a KV head's whole cache
    pdl = launch_options()
    _decode_attention_kernel[(b * kv, splits)](
        q, k, v, cos, sin, pos, batch_index, k_cache, v_cache, out, m, lse, acc,
        tickets if tickets is not None else torch.empty(1, dtype=torch.int32, device=q.device),  # own: no alias
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), max_len, math.log2(math.e) / math.sqrt(hd),
        KV=kv, GROUP=group, HEAD_DIM=hd, ROTARY=cos.shape[-1], BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=tile, SPLIT=split, SPLITS=splits, IEEE=q.dtype == torch.float32 or INTERPRETER,
        PRELOAD=PRELOAD, LATE=LAUNCH_NEXT_LATE, AHEAD=reads_ahead(grid, b), TICKETS=tickets is not None,
        BLOCK_S=combine_step(splits, tickets is not None), COS_TABLE=cos_table, num_warps=grid.warps,
        **({"num_stages": SHORT_STAGES} if (short or grid.side_by_side) and SHORT_STAGES else {}), **pdl)
    if splits > 1 and tickets is None:
        _combine_kernel[(b * heads,)](m, lse, acc, pos, out, HEADS=heads, HEAD_DIM=hd, BLOCK_D=block_d,
                                      BLOCK_S=combine_step(splits, False), SPLIT=split, SPLITS=splits,
                                      num_warps=4, **pdl)
    return out.view(b, 1, heads, hd).transpose(1, 2)


def qkv_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         batch_index: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         tickets: torch.Tensor | None = None, cos_table: bool = False,
                         early: bool = False) -> torch.Tensor:
    """``decode_attention`` on the fused q/k/v projection's output, as the decoders call it (``glmkit.fast_decode``'s
    layer, ``glmkit.tp_decode``'s rank): q, k and v are views of ``qkv``, no copy.

    qkv: ``[b, 1, (heads + 2 kv_heads) * head_dim]``, one new token per sequence (kv_heads and head_dim are the
    cache's); cos/sin: ``[b, 1, 1, rotary_dim]`` (any shape of ``b * rotary_dim`` numbers), or with ``cos_table``
    the tables ``[max_len, rotary_dim]``; ``tickets`` and the rest as
    ``decode_attention``, whose output ``[b, heads, 1, head_dim]`` it returns. Taught with the fast path in
    ``notebooks/05_tuning.ipynb``.

    >>> if triton_available():  # a GPU, or TRITON_INTERPRET=1 on a CPU (else: decode_attention's error)
    ...     dev = "cuda" if torch.cuda.is_available() else "cpu"
    ...     qkv = torch.randn(1, 1, (4 + 2 * 2) * 64, device=dev)  # 4 query heads, 2 KV heads of 64 dims
    ...     k_cache, v_cache = torch.zeros(2, 1, 2, 8, 64, device=dev)
    ...     cos, sin = torch.ones(1, 64, device=dev), torch.zeros(1, 64, device=dev)  # (no rotation)
    ...     pos = row = torch.zeros(1, dtype=torch.long, device=dev)  # position 0 of cache row 0
    ...     out = qkv_decode_attention(qkv, k_cache, v_cache, pos, row, cos, sin)
    ...     v = qkv[0, 0, -2 * 64:].view(2, 64)  # at position 0 a query head's output is its KV head's v
    ...     assert torch.equal(out[0, :, 0], v.repeat_interleave(2, dim=0)) and torch.equal(v_cache[0, :, 0], v)
    """
    b, width = qkv.shape[0], qkv.shape[-1]
    kv, hd = k_cache.shape[1], k_cache.shape[-1]
    if qkv.numel() != b * width or width % hd or width // hd <= 2 * kv:
        raise ValueError(f"qkv_decode_attention takes q/k/v [b, 1, (heads + 2 * {kv}) * {hd}] of one token per "
                         f"sequence for a cache of {kv} KV heads x {hd} dims; got {tuple(qkv.shape)}.")
    heads = width // hd - 2 * kv
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    if not cos_table:
        cos, sin = cos.view(b, -1), sin.view(b, -1)
    return decode_attention(q.view(b, heads, hd), k.view(b, kv, hd), v.view(b, kv, hd), k_cache, v_cache, pos,
                            batch_index, cos, sin, tickets=tickets, cos_table=cos_table, early=early)
