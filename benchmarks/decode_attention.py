"""Decode attention of one GLM-4-9B layer, as the fast decoder runs it: rope + KV-cache write + SDPA (compiled) against
glmkit's Triton kernel (``glmkit.attention.decode_attention``, compiled into the same kind of function, and launched
eagerly), each captured in a CUDA graph over 40 layers' caches (the caches of a real step: nothing stays in L2).

Cases: 32, 2K and 32K cached tokens in a cache sized for the job (max_len = cached + 256), and 32 cached tokens in a
32K cache (a server's decoder: SDPA reads the whole static cache under its mask, the kernel stops at pos); batch 1
and 16; bf16; GLM-4-9B's 32 query heads, 2 KV heads, head_dim 128, 64 rotary dims. Per case: µs per layer of each,
the kernel's split length (``split_length``) and a short sweep of others, and the outputs' largest difference.

    PYTHONPATH=. python benchmarks/decode_attention.py
Writes benchmarks/results/decode_attention.json (and to $OUT). About 1.5 minutes on an H200 (compiles included).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from glmkit.attention import BLOCK_N, decode_attention, split_length
from glmkit.bench import save_result, stage_runner
from glmkit.fast_decode import raise_recompile_limit, rope
from glmkit.gemv_tuning import graph_time

HEADS, KV, HD, ROTARY, LAYERS = 32, 2, 128, 64, 40
DEVICE = "cuda"
CASES = [(32, 288), (2048, 2304), (32768, 33024), (32, 33024)]  # (cached tokens, max_len)
BATCHES = (1, 16)


def sdpa_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                   batch_index: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoder's attention lines before the kernel (``decoder_layer`` with ``attention="sdpa"``)."""
    b = qkv.shape[0]
    q, k, v = qkv.split([HEADS * HD, KV * HD, KV * HD], dim=-1)
    q = rope(q.view(b, 1, HEADS, HD).transpose(1, 2), cos, sin)
    k = rope(k.view(b, 1, KV, HD).transpose(1, 2), cos, sin)
    v = v.view(b, 1, KV, HD).transpose(1, 2)
    k_cache[batch_index, :, pos] = k[:, :, 0]
    v_cache[batch_index, :, pos] = v[:, :, 0]
    attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
    return attn.transpose(1, 2).reshape(b, 1, HEADS * HD)


def triton_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     batch_index: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     split: int | None = None) -> torch.Tensor:
    """The decoder's attention lines with the kernel (``decoder_layer`` with ``attention="triton"``)."""
    b = qkv.shape[0]
    q, k, v = qkv.split([HEADS * HD, KV * HD, KV * HD], dim=-1)
    attn = decode_attention(q.view(b, HEADS, HD), k.view(b, KV, HD), v.view(b, KV, HD), k_cache, v_cache, pos,
                            batch_index, cos.view(b, -1), sin.view(b, -1), split=split)
    return attn.transpose(1, 2).reshape(b, 1, HEADS * HD)


def case(b: int, cached: int, max_len: int, sdpa_c: Any, triton_c: Any) -> dict[str, Any]:
    dev, dtype, layers = DEVICE, torch.bfloat16, LAYERS
    caches = [(torch.randn(b, KV, max_len, HD, device=dev, dtype=dtype),
               torch.randn(b, KV, max_len, HD, device=dev, dtype=dtype)) for _ in range(layers)]
    qkv = torch.randn(b, 1, (HEADS + 2 * KV) * HD, device=dev, dtype=dtype)
    pos = torch.full((b,), cached - 1, device=dev, dtype=torch.long)
    batch_index = torch.arange(b, device=dev)
    angle = torch.rand(b, ROTARY // 2, device=dev) * 6
    cos = angle.cos().repeat_interleave(2, -1).to(dtype)[:, None, None]  # [b, 1, 1, rotary], as the decoder's
    sin = angle.sin().repeat_interleave(2, -1).to(dtype)[:, None, None]
    mask = torch.zeros(b, 1, 1, max_len, dtype=dtype, device=dev)
    mask = mask.masked_fill(torch.arange(max_len, device=dev) > pos[:, None, None, None], float("-inf"))

    def run(fn: Any, **kw: Any) -> Any:
        return lambda i: fn(qkv, *caches[i], pos, batch_index, cos, sin, mask, **kw)

    with torch.no_grad():
        want, got = run(sdpa_c)(0), run(triton_c)(0)
        row: dict[str, Any] = {"batch": b, "cached_tokens": cached, "max_len": max_len, "layers_in_graph": layers,
                               "max_abs_diff": (got.float() - want.float()).abs().max().item(),
                               "split_length": split_length(b, KV, max_len)}
        row["sdpa_compiled_us"] = 1e6 * graph_time(run(sdpa_c), layers)
        row["triton_compiled_us"] = 1e6 * graph_time(run(triton_c), layers)
        row["triton_eager_us"] = 1e6 * graph_time(run(triton_attention), layers)
        sweep = {}
        default, whole = row["split_length"], -(-max_len // BLOCK_N) * BLOCK_N
        others = {BLOCK_N << i for i in range(8) if default // 4 <= BLOCK_N << i <= 4 * default and BLOCK_N << i < max_len}
        others |= {whole} if max_len <= 4096 else set()  # the whole cache in one program: no combine
        for split in sorted(others - {default}):  # other split lengths, eager launch
            sweep[str(split)] = 1e6 * graph_time(run(triton_attention, split=split), layers)
        row["triton_eager_us_by_split"] = sweep
    row["speedup_compiled"] = row["sdpa_compiled_us"] / row["triton_compiled_us"]
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    raise_recompile_limit()
    sdpa_c = torch.compile(sdpa_attention, fullgraph=True, dynamic=False)
    triton_c = torch.compile(triton_attention, fullgraph=True, dynamic=False)
    result: dict[str, Any] = {
        "method": ("one layer's decode attention (32 q heads, 2 KV heads, head_dim 128, rotary 64, bf16) from the fused "
                   "q/k/v output to o_proj's input: rope + index_put + SDPA (enable_gqa, additive mask) compiled as "
                   "FastDecoder compiles it, against glmkit.attention.decode_attention compiled and eager; each run over "
                   f"{LAYERS} layers' caches in one CUDA graph, median of 5 x 20 replays; "
                   "all rows at the same position"),
        "rows": [], "errors": []}
    stage = stage_runner("decode_attention", result)
    t0 = time.perf_counter()
    for b in BATCHES:
        for cached, max_len in CASES:
            row = stage(f"b={b} cached={cached} max_len={max_len}", case, b, cached, max_len, sdpa_c, triton_c)
            if row is not None:
                result["rows"].append(row)
            torch.cuda.empty_cache()  # the case's caches (up to 21 GiB at batch 16 x 32K) go back
    result["seconds"] = time.perf_counter() - t0
    save_result("decode_attention", result)


if __name__ == "__main__":
    main()
