"""The first version of glmkit's tensor-core 4-bit kernel, as ``nf4_tc_probe.py`` timed it: each program looks up its
rows' weights once (a warp shuffle, or table loads in Triton's interpreter), multiplies them with all vectors on the
tensor cores block by block (``tl.dot``) and scales each block's sums; one program's rows span all columns. The
shipped kernel is ``glmkit.gemv4bit._tc4_kernel``."""
import os

import torch
import triton
import triton.language as tl

from glmkit.gemv4bit import _SHUFFLE_PAIR_ASM as SHUF_PACK  # the shipped kernel's lookup, as timed

INTERP = os.environ.get("TRITON_INTERPRET") == "1"

SHUF16 = tl.constexpr("""{
    .reg .b32 t, a, b;
    shr.b32 t, $2, 4;
    shfl.sync.idx.b32 a, $3, t, 0x1f, 0xffffffff;
    shfl.sync.idx.b32 b, $3, $2, 0x1f, 0xffffffff;
    cvt.u16.u32 $0, a;
    cvt.u16.u32 $1, b;
}""")


@triton.jit
def _lane_table16(like, code_ptr, WDT: tl.constexpr):
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like.to(tl.int32) * 0], dtype=tl.int32,
                                     is_pure=True, pack=1) & 15
    lut = tl.where(lane == 0, tl.load(code_ptr), 0.0)
    for i in tl.static_range(1, 16):
        lut = tl.where(lane == i, tl.load(code_ptr + i), lut)
    return lut.to(WDT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _tc4_kernel(x_ptr, y_ptr, q_ptr, absmax_ptr, code_ptr, N, VECTORS, bytes_per_row, blocks_per_row,
                MODE: tl.constexpr, PRESCALE: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_B: tl.constexpr, UNROLL: tl.constexpr, DOT_F32: tl.constexpr):
    HB: tl.constexpr = BS // 2
    WDT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0)
    cb = tl.arange(0, HB)
    q_ptrs = q_ptr + rows[:, None] * bytes_per_row + cb[None, :]
    a_ptrs = absmax_ptr + rows * blocks_per_row
    kk = tl.arange(0, BS)
    vb = tl.arange(0, BLOCK_B)
    x_ptrs = x_ptr + vb[None, :] * (2 * bytes_per_row) + kk[:, None]
    x_ok = vb[None, :] < VECTORS
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    if MODE >= 1:
        lut = _lane_table16(tl.load(q_ptrs).to(tl.int32), code_ptr, WDT)
    for blk0 in range(0, blocks_per_row, UNROLL):
        for u in tl.static_range(UNROLL):
            q = tl.load(q_ptrs + (blk0 + u) * HB, eviction_policy="evict_first").to(tl.int32)
            s = tl.load(a_ptrs + blk0 + u)
            if MODE == 2:
                qq = tl.join(q, q)
                ll = tl.join(lut, lut)
                w = tl.inline_asm_elementwise(SHUF_PACK, "=r,r,r,r,r", [qq, ll], dtype=tl.int16, is_pure=True,
                                              pack=2).to(WDT, bitcast=True).reshape(BLOCK_N, BS)
            elif MODE == 1:
                w_hi, w_lo = tl.inline_asm_elementwise(SHUF16, "=h,=h,r,r", [q, lut], dtype=(tl.int16, tl.int16),
                                                       is_pure=True, pack=1)
                w_hi = w_hi.to(WDT, bitcast=True)
                w_lo = w_lo.to(WDT, bitcast=True)
            else:
                w_hi = tl.load(code_ptr + (q >> 4))
                w_lo = tl.load(code_ptr + (q & 15))
                if PRESCALE:
                    w_hi = w_hi * s[:, None]
                    w_lo = w_lo * s[:, None]
                w_hi = w_hi.to(WDT)
                w_lo = w_lo.to(WDT)
            if MODE != 2:
                w = tl.join(w_hi, w_lo).reshape(BLOCK_N, BS)
            xt = tl.load(x_ptrs + (blk0 + u) * BS, mask=x_ok, other=0.0)
            if DOT_F32:  # Triton's interpreter multiplies 16-bit dots wrongly
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            if PRESCALE:
                acc = tl.dot(w, xt, acc)
            else:
                acc += tl.dot(w, xt) * s[:, None]
    y_ptrs = y_ptr + vb[None, :] * N + rows[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & x_ok)


def tc4(x, data, absmax, code, n, k, blocksize=64, block_n=64, num_warps=4, mode=None, prescale=False, unroll=1, num_stages=3):
    vectors = x.numel() // k
    block_b = max(16, triton.next_power_of_2(vectors))
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if mode is None:
        mode = 0 if INTERP else 1
    grid = (triton.cdiv(n, block_n),)
    _tc4_kernel[grid](x, y, data, absmax, code, n, vectors, k // 2, k // blocksize, MODE=mode, PRESCALE=prescale,
                      BS=blocksize, BLOCK_N=block_n, BLOCK_B=block_b, UNROLL=unroll, DOT_F32=INTERP, num_warps=num_warps,
                      num_stages=num_stages)
    return y
