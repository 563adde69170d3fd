"""Find the fastest launch shapes of glmkit's GEMV kernels on the card in hand, and keep them (``glmkit tune``).

For each GLM-4-9B projection and each kernel (bf16, fp16, nf4, fp4) every candidate shape is checked against a
float64 reference and timed as the decode step runs it (16-bit: with the RMSNorm or the residual add that the
one-card decoder folds into each launch, ``FUSED``; with ``tp=2`` a rank's add of the all-reduced partial sum and
the norm, ``FUSED_TP``; 4-bit: as plain products, without the norm or the residual add the one-sequence step folds
into some of them, ``glmkit.gemv4bit.gemv_4bit_normed`` and ``gemv_4bit_residual``): back to back over enough weight
copies that nothing is
served from the L2 cache, inside one CUDA graph. The best shapes go into a table chosen by the device's name
(``glmkit.gemv.tables_for``); written to glmkit's cache (``$GLMKIT_CACHE`` or ``~/.cache/glmkit``) they take
precedence over the shipped tables. With nf4/fp4, glmkit's 4-bit CUDA kernels' shapes too: one token's
(``tune_one_kernel``, each launch in the fold the step makes) and 2-8 tokens' (``tune_mma_kernel``); a shape other
than the default is kept only where it is ``MARGIN`` faster. Needs a GPU. Introduced in
``notebooks/05_tuning.ipynb``.

>>> candidates("nf4", swiglu=True)[:2]
[GemvConfig(block_n=1, block_k=1024, num_warps=2), GemvConfig(block_n=1, block_k=2048, num_warps=2)]
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GlmConfig

from glmkit import gemv4bit, gemv4bit_mma, gemv4bit_one
from glmkit.gemv import (
    CUDA_SHAPE_KEYS,
    GemvConfig,
    active_cuda_shapes,
    active_table,
    add_norm_gemv,
    device_name,
    gemv,
    gemv_swiglu,
    user_table_path,
)
from glmkit.gemv4bit import gemv_4bit, gemv_4bit_swiglu, linear_4bit, quantize, tuned_lookups
from glmkit.vocabulary import head_dim, kv_heads

FOUR_BIT = ("nf4", "fp4")
# what the one-card decoder's 16-bit Triton GEMVs fold in per projection (glmkit.fast_decode.decoder_layer): the
# RMSNorm before qkv, gate_up and lm_head, the residual add after o_proj and down_proj; these are the launches timed
FUSED = {"qkv": "norm", "o_proj": "residual", "gate_up": "norm", "down_proj": "residual", "lm_head": "norm"}
# a tensor-parallel rank's (glmkit.tp_decode): the add of the all-reduced partial sum and the RMSNorm before qkv,
# gate_up and lm_head (glmkit.gemv.add_norm_gemv); o_proj and down_proj are bare products (all-reduced after)
FUSED_TP = {"qkv": "add_norm", "o_proj": None, "gate_up": "add_norm", "down_proj": None, "lm_head": "add_norm"}
EPS = GlmConfig().rms_norm_eps  # GLM-4-9B-Chat's (1.5625e-07)
OTHER_LOOKUPS_AT = 3  # 4-bit: the fastest shapes (with the default lookup) at which the other lookups are timed


def projections(quantized: bool = False, tp: int = 1) -> dict[str, tuple[int, int, bool, bool]]:
    """name -> (rows, columns, has bias, SwiGLU) of GLM-4-9B-Chat's weights as the fast decoder multiplies them
    (rows of one half for gate_up). In 4 bits q, k and v stay three weights read by one launch
    (``gemv_4bit_multi``, tuned for all their rows) and lm_head stays 16-bit. ``tp=2``: one rank's shard under
    tensor parallelism (``glmkit.tp_decode``: one KV head and its 16 query heads, half of the MLP and vocabulary).

    >>> projections()["down_proj"], projections(quantized=True)["qkv"], "lm_head" in projections(quantized=True)
    ((4096, 13696, False, False), (4608, 4096, True, False), False)
    >>> projections(tp=2)["qkv"], projections(tp=2)["down_proj"]
    ((2304, 4096, True, False), (4096, 6848, False, False))
    """
    c = GlmConfig()
    if tp < 1 or c.num_key_value_heads % tp:
        raise ValueError(f"GLM-4's {c.num_key_value_heads} KV heads split over 1 or {c.num_key_value_heads} ranks, "
                         f"not {tp}.")
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    heads, kv, mlp = c.num_attention_heads // tp, c.num_key_value_heads // tp, c.intermediate_size // tp
    out = {"qkv": ((heads + 2 * kv) * hd, c.hidden_size, True, False),
           "o_proj": (c.hidden_size, heads * hd, False, False),
           "gate_up": (mlp, c.hidden_size, False, True),
           "down_proj": (c.hidden_size, mlp, False, False)}
    return out if quantized else {**out, "lm_head": (c.vocab_size // tp, c.hidden_size, False, False)}


def candidates(kernel: str, swiglu: bool, quick: bool = False) -> list[GemvConfig]:
    """Launch shapes to try. 16-bit: 8 to 64 fp32 partial sums per thread (half as many per accumulator with
    SwiGLU's two). 4-bit: 16 to 64 packed bytes per thread and step (one to four 128-bit loads; per tile of rows
    where a program takes two, SwiGLU's gate and up or ``gemv4bit.PAIRED_ROWS``), blocks of whole quantization
    blocks (64 columns) from 256 columns; ``quick``: eight of them, 16 or 32 bytes per thread (per tile), for a
    benchmark's short sweep."""
    if kernel in FOUR_BIT and quick:
        return [GemvConfig(*s) for s in ((4, 1024, 4), (8, 512, 4), (2, 2048, 4), (8, 1024, 8), (16, 512, 8),
                                         (8, 1024, 4), (4, 2048, 4), (4, 512, 2))]
    if kernel in FOUR_BIT:
        out = []
        for bn, bk, warps in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8)):
            per_thread = bn * bk // 2 // (warps * 32)
            if 16 <= per_thread * gemv4bit.tiles_per_program(swiglu) <= 64:
                out.append(GemvConfig(bn, bk, warps))
        return out
    out = []
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (2, 4, 8)):
        per_thread = bn * bk // (warps * 32) * (2 if swiglu else 1)
        if 8 <= per_thread <= 64:
            out.append(GemvConfig(bn, bk, warps))
    return out


def graph_time(fn: Callable[[int], Any], copies: int, replays: int = 20) -> float:
    """Seconds per call of fn(i) for i over the weight copies, run back to back in one CUDA graph (median of 5)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (replays * copies))
    return sorted(times)[len(times) // 2]


def _copies(nbytes: int, real: bool) -> int:
    """Weight copies a tuner launches back to back: ~1 GiB of them where the timing is ``real`` (20x an H100's L2:
    none served from it), else two."""
    return max(2, math.ceil(2**30 / nbytes)) if real else 2


def _weights(kernel: str, rows: int, k: int, copies: int, device: str) -> list[Any]:
    dtype = torch.float16 if kernel == "fp16" else torch.bfloat16
    ws = [torch.randn(rows, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    if kernel in FOUR_BIT:
        return [quantize(w, kernel, double_quant=True) for w in ws]  # the planner's nf4: double quantization
    return ws


def _reference(kernel: str, w: Any) -> torch.Tensor:
    return (w.dequantize() if kernel in FOUR_BIT else w).double()


def lookups_to_try() -> list[str]:
    """The 4-bit lookups a tuner times (``glmkit.gemv4bit.LOOKUPS``): the default first (``LOOKUP``, checked on this
    GPU), then the others this machine runs (Triton's interpreter runs no warp shuffle).

    >>> lookups_to_try()[0] == gemv4bit.LOOKUP
    True
    """
    default = gemv4bit.LOOKUP
    others = [lk for lk in gemv4bit.LOOKUPS if lk != default and not (lk == "shuffle" and gemv4bit.INTERPRETER)]
    return [default, *others]


def tune_projection(name: str, n: int, k: int, bias: bool, swiglu: bool, kernel: str = "bf16",
                    shapes: Iterable[GemvConfig] | None = None, device: str = "cuda",
                    timer: Callable[[Callable[[int], Any], int], float] = graph_time,
                    fused: str | None = None) -> dict[str, Any]:
    """Time every candidate shape of ``kernel`` on one projection against cuBLAS (16-bit) or bitsandbytes'
    ``matmul_4bit`` (4-bit); returns the row for the JSON result, with ``best`` (None if none built). The best
    shape goes into this process's table; with another ``timer`` (tests) two weight copies and no table entry.
    ``fused`` (16-bit): time the launch the decoder makes, with the RMSNorm (``"norm"``) or the residual add
    (``"residual"``) folded in (``glmkit.gemv.gemv``), or a tensor-parallel rank's add of an all-reduced partial sum
    and the norm (``"add_norm"``, ``glmkit.gemv.add_norm_gemv``); the baseline stays the bare product.
    4-bit: every shape with the default nibble lookup, then the other lookups (``lookups_to_try``) at the
    ``OTHER_LOOKUPS_AT`` fastest shapes; ``best`` names its lookup, which the table keeps with the shape."""
    rows = 2 * n if swiglu else n
    quant = kernel in FOUR_BIT
    nbytes = rows * k // 2 if quant else rows * k * 2  # packed weights only (absmax adds 1/32 or 1/128)
    real = device == "cuda" and timer is graph_time
    copies = _copies(nbytes, real)
    ws = _weights(kernel, rows, k, copies, device)
    dtype = torch.float16 if kernel == "fp16" else torch.bfloat16
    b = torch.randn(rows, device=device, dtype=dtype) if bias else None
    x = torch.randn(1, 1, k, device=device, dtype=dtype)
    fused = None if quant else fused
    g = (1 + 0.1 * torch.randn(k, device=device)).to(dtype) if fused in ("norm", "add_norm") else None
    r = torch.randn(1, 1, n, device=device, dtype=dtype) if fused == "residual" else None
    d = torch.randn(1, 1, k, device=device, dtype=dtype) if fused == "add_norm" else None
    x64 = (x if d is None else x + d).double()  # the sum rounded to 16 bits, as the kernel writes it
    if g is not None:  # RMSNorm in float64
        x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * g.double()
    ref = F.linear(x64, _reference(kernel, ws[0]), None if b is None else b.double())
    if swiglu:
        gate, up = ref.chunk(2, dim=-1)
        ref = up * F.silu(gate)
    if r is not None:
        ref = ref + r.double()

    def baseline(i):
        y = linear_4bit(x, ws[i], b) if quant else F.linear(x, ws[i], b)
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = up * F.silu(gate)
        return y

    t_base = timer(baseline, copies)
    base_name = "bnb_matmul_4bit" if quant else "cublas"
    row: dict[str, Any] = {"projection": name, "kernel": kernel, "fused": fused, "rows": rows, "columns": k,
                           "bytes": nbytes,
                           "copies": copies, f"{base_name}_us": t_base * 1e6,
                           f"{base_name}_tb_s": nbytes / t_base / 1e12, "tried": []}
    best = None
    lookups = lookups_to_try() if quant else [None]
    plan = [(cfg, lookups[0]) for cfg in shapes or candidates(kernel, swiglu)]
    timed: list[tuple[float, GemvConfig]] = []
    while plan:
        cfg, lookup = plan.pop(0)

        def ours(i, cfg=cfg, lookup=lookup):
            if quant:
                return gemv_4bit_swiglu(x, ws[i], config=cfg, lookup=lookup) if swiglu else \
                    gemv_4bit(x, ws[i], b, config=cfg, lookup=lookup)
            if d is not None:
                return add_norm_gemv(x, d, ws[i], g, b, eps=EPS, swiglu=swiglu, config=cfg)[0]
            if swiglu:
                return gemv_swiglu(x, ws[i], config=cfg, norm_weight=g, eps=EPS)
            return gemv(x, ws[i], b, config=cfg, norm_weight=g, eps=EPS, residual=r)

        tag = {"lookup": lookup} if quant else {}
        try:
            err = ((ours(0).double() - ref).norm() / ref.norm()).item()  # NaN (a row never written) fails the check
            t = timer(ours, copies)
        except Exception as exc:  # a shape Triton cannot build (registers, shared memory): record and go on
            row["tried"].append({**cfg.__dict__, **tag, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        else:
            row["tried"].append({**cfg.__dict__, **tag, "us": t * 1e6, "tb_s": nbytes / t / 1e12, "rel_err": err})
            if err < CHECK_TOLERANCE and (best is None or t < best[1]):
                best = (cfg, t, lookup)
            if err < CHECK_TOLERANCE and lookup == lookups[0]:
                timed.append((t, cfg))
        if not plan and len(lookups) > 1:  # the default lookup's sweep is done: the others at its fastest shapes
            fastest = [c for _, c in sorted(timed, key=lambda tc: tc[0])[:OTHER_LOOKUPS_AT]]
            plan, lookups = [(c, lk) for lk in lookups[1:] for c in fastest], lookups[:1]
    row["best"] = None if best is None else {**best[0].__dict__, **({"lookup": best[2]} if quant else {}),
                                             "us": best[1] * 1e6, "tb_s": nbytes / best[1] / 1e12}
    row[f"speedup_vs_{base_name}"] = None if best is None else t_base / best[1]
    if best is not None and real:
        active_table()[(kernel, n, k)] = best[0]  # this process decodes with it from now on
        if quant:
            tuned_lookups()[(kernel, n, k)] = best[2]
    ws.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# the batch-1 4-bit CUDA kernel's candidate shapes (glmkit.gemv4bit_one.OneShape): groups x warps a CTA, stages a warp
# copies ahead, the wide or the narrow lookup table; those that fit the card's shared memory are timed
ONE_WARPS = ((4, 4), (2, 8), (8, 2), (2, 4), (4, 2))
ONE_DEPTHS = (2, 3)


def one_candidates(swiglu: bool, k: int, smem_limit: int = gemv4bit_one.SMEM_H200) -> list[gemv4bit_one.OneShape]:
    """The batch-1 4-bit CUDA kernel's shapes to time for rows of ``k`` columns on a card whose CTAs may take
    ``smem_limit`` bytes of shared memory: ``ONE_WARPS`` x ``ONE_DEPTHS`` x both tables, where they fit; the
    untuned default (``shape_for``) first.

    >>> one_candidates(False, 4096)[0] == gemv4bit_one.SHAPE, len(one_candidates(False, 4096))
    (True, 20)
    >>> all(s.smem_bytes(True, 4096) <= 99 * 1024 for s in one_candidates(True, 4096, 99 * 1024))  # a consumer card
    True
    """
    default = gemv4bit_one.shape_for(swiglu, k, smem_limit)
    shapes = [gemv4bit_one.OneShape(g, w, d, wide) for g, w in ONE_WARPS for d in ONE_DEPTHS for wide in (True, False)]
    fits = [s for s in shapes if s.smem_bytes(swiglu, k) <= smem_limit and s != default]
    return ([default] if default else []) + fits


def one_projections() -> dict[str, tuple[tuple[int, ...], int, bool, bool]]:
    """name -> (rows of each weight the launch reads side by side, columns, has bias, SwiGLU) of GLM-4-9B-Chat's
    4-bit launches through glmkit's 4-bit CUDA kernels, one token's and 2-8 tokens' (``projections(quantized=True)``:
    q, k and v in one launch; gate/up: gate rows then up rows).

    >>> one_projections()["qkv"], one_projections()["gate_up"]
    (((4096, 256, 256), 4096, True, False), ((27392,), 4096, False, True))
    """
    kv = kv_heads(GlmConfig()) * head_dim(GlmConfig())
    return {name: ((n - 2 * kv, kv, kv) if name == "qkv" else (2 * n,) if swiglu else (n,), k, bias, swiglu)
            for name, (n, k, bias, swiglu) in projections(quantized=True).items()}


# a shape other than the untuned default is kept only where it is this much faster, by every tuner of glmkit's CUDA
# kernels (one_shapes_tune.json, an H200: the fastest shapes were within 0.9% of the default, the defaults' own decode
# rounds 0.8% apart; step_shapes_tune.json: two decoders of the same shapes 1.2% apart)
MARGIN = 0.02
CHECK_TOLERANCE = 2e-2  # a candidate's relative error against float64 beyond which it is never kept


def beats_default(seconds: float, default_seconds: float) -> bool:
    """Whether a shape that took ``seconds`` replaces the default that took ``default_seconds``: faster by
    ``MARGIN``.

    >>> beats_default(0.99, 1.0), beats_default(0.9, 1.0)
    (False, True)
    """
    return seconds * (1 + MARGIN) <= default_seconds


def _fastest_past_margin(default: dict[str, Any] | None,
                         timed: list[tuple[float, dict[str, Any]]]) -> tuple[float, dict[str, Any]] | None:
    """The shape a CUDA kernel's tuner keeps from ``timed`` ((seconds, fields) of the candidates that passed the
    check, the default first where it did): the fastest where it beats the default by ``MARGIN``, else the default;
    the fastest where the default did not run or failed its check; None where none passed.

    >>> _fastest_past_margin({"rel_err": 0.0, "us": 1.0}, [(1.0, {"w": 4}), (0.99, {"w": 8})])
    (1.0, {'w': 4})
    """
    best = min(timed, key=lambda tf: tf[0], default=None)
    default_ok = default is not None and "us" in default and default["rel_err"] < CHECK_TOLERANCE
    if best is not None and default_ok and not beats_default(best[0], timed[0][0]):
        return timed[0]  # not faster by the margin: the default stays
    return best


def _nf4_copies(heights: tuple[int, ...], k: int, device: str, real: bool) -> tuple[list[tuple[Any, ...]], int]:
    """A CUDA kernel tuner's weights: ``_copies`` of random nf4 weights of ``heights`` rows of ``k`` columns (read side
    by side by one launch), and the bytes one copy's packed weights take."""
    nbytes = sum(heights) * k // 2
    return [tuple(quantize(torch.randn(h, k, device=device) * 0.02, "nf4") for h in heights)
            for _ in range(_copies(nbytes, real))], nbytes


def _keep(kernel: str, rows: int, k: int, best: tuple[float, dict[str, Any]] | None, real: bool,
          ws: list[Any], device: str) -> None:
    """A CUDA kernel tuner's end: ``best``'s fields into this process's table where the timing was ``real`` (its
    launches take them from now on), and the weight copies freed."""
    if best is not None and real:
        active_cuda_shapes()[(kernel, rows, k)] = best[1]
    ws.clear()
    if device == "cuda":
        torch.cuda.empty_cache()


# what the fused 4-bit step folds into each launch (glmkit.fast_decode.decoder_layer): timed and checked that way
ONE_FOLDS = {"qkv": "norm", "o_proj": "residual", "gate_up": "norm", "down_proj": "residual"}


def tune_one_projection(name: str, heights: tuple[int, ...], k: int, bias: bool, swiglu: bool,
                        fold: str | None = None, device: str = "cuda",
                        timer: Callable[[Callable[[int], Any], int], float] = graph_time) -> dict[str, Any]:
    """Time every candidate shape (``one_candidates``) of the batch-1 4-bit CUDA kernel on one launch as the fused
    step makes it (``fold``: the RMSNorm folded in, ``"norm"``, or the residual add after, ``"residual"``; bitsandbytes
    nf4 weights without double quantization, which the kernel does not read), launched plainly back to back over
    ~1 GiB of weight copies in one CUDA graph (``graph_time``). Each shape is first checked against float64 twice: on a
    random token, and on one whose last value is 10^4 times the others (x's largest value found past the first words
    a thread reads). The fastest shape is kept where it beats the default (timed first) by ``MARGIN``, else the
    default; it goes into this process's table (``glmkit.gemv.active_cuda_shapes``). With another ``timer`` (tests):
    two weight copies and no table entry."""
    real = device == "cuda" and timer is graph_time
    ws, nbytes = _nf4_copies(heights, k, device, real)
    copies, rows = len(ws), sum(heights)
    n_out = rows // 2 if swiglu else rows
    b = torch.randn(rows, device=device, dtype=torch.bfloat16) if bias else None
    g = (1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16)  # the folded norm's weight
    r = torch.randn(1, 1, n_out, device=device, dtype=torch.bfloat16)  # the residual stream
    g_next = (1 + 0.1 * torch.randn(n_out, device=device)).to(torch.bfloat16)  # the norm after the residual add
    w64 = torch.cat([w.dequantize(torch.float32) for w in ws[0]]).double()

    def case(x: torch.Tensor) -> tuple[Callable[[int, Any], torch.Tensor], torch.Tensor]:
        """The launch of one shape on weight copy i for token x, and its float64 reference."""
        x64 = x.double()
        if fold == "norm":
            x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * g.double()
        ref = F.linear(x64, w64, None if b is None else b.double())
        if swiglu:
            gate, up = ref.chunk(2, dim=-1)
            ref = up * F.silu(gate)
        if fold == "norm":
            stream = gemv4bit.normed_stream(x, g)
            return (lambda i, shape: gemv4bit_one.gemv_4bit_one(stream.scaled, ws[i], b, swiglu, stream.squares, EPS,
                                                                shape=shape)), ref
        if fold == "residual":
            scaled = torch.empty_like(r)
            partials = torch.empty(gemv4bit_one.tiles(list(heights), swiglu), device=device)
            return (lambda i, shape: gemv4bit_one.gemv_4bit_one(x, ws[i], b, swiglu, residual=r, norm_weight=g_next,
                                                                scaled=scaled, partials=partials, shape=shape)), \
                ref + r.double()
        return (lambda i, shape: gemv4bit_one.gemv_4bit_one(x, ws[i], b, swiglu, shape=shape)), ref

    x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
    spiked = x.clone()
    spiked[..., -1] = 1e4 * x.abs().max()
    checks = [case(x), case(spiked)]
    launch = checks[0][0]  # (the random token's launch is the one timed)
    row: dict[str, Any] = {"projection": name, "kernel": gemv4bit_one.TABLE_KERNEL, "fold": fold, "rows": n_out,
                           "columns": k, "bytes": nbytes, "copies": copies, "tried": []}
    timed: list[tuple[float, dict[str, Any]]] = []
    for shape in one_candidates(swiglu, k, gemv4bit_one.smem_limit(torch.device(device))):
        fields = {key: getattr(shape, key) for key in CUDA_SHAPE_KEYS[gemv4bit_one.TABLE_KERNEL]}
        try:  # NaN (a layout the kernel refuses) fails the check
            err = max(((run(0, shape).double() - ref).norm() / ref.norm()).item() for run, ref in checks)
            t = timer(lambda i, shape=shape: launch(i, shape), copies)
        except Exception as exc:  # a shape NVRTC or the driver cannot take: record and go on
            row["tried"].append({**fields, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        row["tried"].append({**fields, "us": t * 1e6, "tb_s": nbytes / t / 1e12, "rel_err": err})
        if err < CHECK_TOLERANCE:
            timed.append((t, fields))
    row["default"] = row["tried"][0] if row["tried"] else None  # (one_candidates puts the default first)
    best = _fastest_past_margin(row["default"], timed)
    row["best"] = None if best is None else {**best[1], "us": best[0] * 1e6, "tb_s": nbytes / best[0] / 1e12}
    _keep(gemv4bit_one.TABLE_KERNEL, n_out, k, best, real, ws, device)
    return row


def tune_one_kernel(log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Tune the batch-1 4-bit CUDA kernel's shapes for every GLM-4-9B launch (``tune_one_projection``), where it
    runs on this GPU and has passed its first-run check; else nothing, said in one line."""
    device = torch.device("cuda", torch.cuda.current_device())
    if not gemv4bit_one.runs_on(device, torch.bfloat16) or not gemv4bit.check_one(device, torch.bfloat16):
        log(f"4-bit batch-1 CUDA kernel: does not run on {device_name()} (compute capability 8.0+, NVRTC; "
            "GLMKIT_4BIT_KERNEL unset): the Triton kernel's shapes serve one token.")
        return []
    rows = []
    for name, (heights, k, bias, swiglu) in one_projections().items():
        row = tune_one_projection(name, heights, k, bias, swiglu, ONE_FOLDS[name])
        rows.append(row)
        best, default = row["best"], row["default"]
        log(f"4-bit {name:10s} (CUDA kernel, one token) " + (
            f"best {best['groups']}x{best['warps']} warps, {best['depth']} stages, "
            f"{'wide' if best['wide'] else 'narrow'} table: {best['us']:.1f} µs, {best['tb_s']:.2f} TB/s; "
            f"untuned default {default['us']:.1f} µs" if best and default and "us" in default else "no shape built"))
    return rows


# the 2-8-row 4-bit CUDA kernel's candidate shapes (glmkit.gemv4bit_mma.MmaShape): warps a program, chunks a warp loads
# at a time, programs an SM (at least 64 registers a thread: warps x programs an SM at most 32)
MMA_WARPS = (4, 8, 16)
MMA_UNROLLS = (1, 2)
MMA_BLOCKS = (1, 2, 3)
MMA_VECTORS = (2, 8)  # the rows a shape is timed at (their times summed): one shape serves 2-8 rows


def mma_candidates(swiglu: bool) -> list[gemv4bit_mma.MmaShape]:
    """The 2-8-row 4-bit CUDA kernel's shapes to time: ``MMA_WARPS`` x ``MMA_UNROLLS`` x ``MMA_BLOCKS`` with at least
    64 registers a thread; the untuned default (``default_shape``) first.

    >>> mma_candidates(False)[0] == gemv4bit_mma.default_shape(False), len(mma_candidates(True))
    (True, 16)
    """
    default = gemv4bit_mma.default_shape(swiglu)
    shapes = [gemv4bit_mma.MmaShape(w, u, b) for w in MMA_WARPS for u in MMA_UNROLLS for b in MMA_BLOCKS
              if w * b <= 32]
    return [default] + [shape for shape in shapes if shape != default]


def tune_mma_projection(name: str, heights: tuple[int, ...], k: int, bias: bool, swiglu: bool, device: str = "cuda",
                        timer: Callable[[Callable[[int], Any], int], float] = graph_time) -> dict[str, Any]:
    """Time every candidate shape (``mma_candidates``) of the 2-8-row 4-bit CUDA kernel on one GLM-4-9B launch at each
    of ``MMA_VECTORS`` rows (bitsandbytes nf4 weights; back to back over ~1 GiB of weight copies in one CUDA graph,
    ``graph_time``), after checking it against float64 at 8 rows. The fastest shape by the sum of its times is kept
    where it beats the default (timed first) by ``MARGIN``, else the default; it goes into this process's table
    (``glmkit.gemv.active_cuda_shapes``). With another ``timer`` (tests): two weight copies and no table entry."""
    real = device == "cuda" and timer is graph_time
    ws, nbytes = _nf4_copies(heights, k, device, real)
    copies, rows = len(ws), sum(heights)
    n_out = rows // 2 if swiglu else rows
    b = torch.randn(rows, device=device, dtype=torch.bfloat16) if bias else None
    xs = {v: torch.randn(v, 1, k, device=device, dtype=torch.bfloat16) for v in MMA_VECTORS}
    x8 = torch.randn(gemv4bit_mma.MAX_VECTORS, 1, k, device=device, dtype=torch.bfloat16)
    ref = F.linear(x8.double(), torch.cat([w.dequantize(torch.float32) for w in ws[0]]).double(),
                   None if b is None else b.double())
    if swiglu:
        gate, up = ref.chunk(2, dim=-1)
        ref = up * F.silu(gate)
    row: dict[str, Any] = {"projection": name, "kernel": gemv4bit_mma.TABLE_KERNEL, "rows": n_out, "columns": k,
                           "bytes": nbytes, "copies": copies, "vectors": list(MMA_VECTORS), "tried": []}
    timed: list[tuple[float, dict[str, Any]]] = []
    for shape in mma_candidates(swiglu):
        fields = {key: getattr(shape, key) for key in CUDA_SHAPE_KEYS[gemv4bit_mma.TABLE_KERNEL]}
        try:  # NaN (a shape the kernel gets wrong) fails the check
            got = gemv4bit_mma.gemv_4bit_mma(x8, ws[0], b, swiglu, shape=shape)
            err = ((got.double() - ref).norm() / ref.norm()).item()
            us = {v: 1e6 * timer(lambda i, x=x, shape=shape: gemv4bit_mma.gemv_4bit_mma(x, ws[i], b, swiglu,
                                                                                      shape=shape), copies)
                  for v, x in xs.items()}
        except Exception as exc:  # a shape NVRTC or the driver cannot take: record and go on
            row["tried"].append({**fields, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        row["tried"].append({**fields, "us": {str(v): t for v, t in us.items()}, "rel_err": err})
        if err < CHECK_TOLERANCE:
            timed.append((sum(us.values()), fields))
    row["default"] = row["tried"][0] if row["tried"] else None  # (mma_candidates puts the default first)
    best = _fastest_past_margin(row["default"], timed)
    row["best"] = None if best is None else {**best[1], "us_summed": best[0]}
    _keep(gemv4bit_mma.TABLE_KERNEL, n_out, k, best, real, ws, device)
    return row


def tune_mma_kernel(log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Tune the 2-8-row 4-bit CUDA kernel's shapes for every GLM-4-9B launch (``tune_mma_projection``) where it runs
    on this GPU and has passed its first-run check; else nothing, said in one line."""
    device = torch.device("cuda", torch.cuda.current_device())
    if not gemv4bit_mma.runs_on(device, gemv4bit_mma.MIN_VECTORS, torch.bfloat16) or \
            not gemv4bit.check_mma(device, torch.bfloat16):
        log(f"4-bit 2-8-row CUDA kernel: does not run on {device_name()} (compute capability 8.0+, NVRTC; "
            "GLMKIT_4BIT_KERNEL unset): the Triton kernels serve a few tokens.")
        return []
    rows = []
    for name, (heights, k, bias, swiglu) in one_projections().items():
        row = tune_mma_projection(name, heights, k, bias, swiglu)
        rows.append(row)
        best, default = row["best"], row["default"]
        log(f"4-bit {name:10s} (CUDA kernel, 2-8 rows) " + (
            f"best {best['warps']} warps, {best['unroll']} chunks at a time, {best['min_blocks']} programs an SM: "
            f"{best['us_summed']:.1f} µs at {' + '.join(map(str, MMA_VECTORS))} rows; untuned default "
            f"{sum(default['us'].values()):.1f} µs" if best and default and "us" in default else "no shape built"))
    return rows


def tune(kernels: Iterable[str] = ("bf16", "nf4"), log: Callable[[str], Any] = print,
         tp: int = 1) -> list[dict[str, Any]]:
    """Tune every GLM-4-9B projection for each kernel on this GPU; returns the rows (see ``tune_projection``).
    fp16 takes bf16's shapes unless tuned itself (``table_configs``); a card without bf16 tunes fp16 instead.
    ``tp=2``: the shapes of one tensor-parallel rank's shard (16-bit kernels only: tensor parallelism runs 16-bit)."""
    if not torch.cuda.is_available():
        raise RuntimeError("Tuning times kernels on a GPU; this machine has none (the CPU uses fixed shapes).")
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    for kernel in kernels:
        if kernel not in ("bf16", "fp16", "nf4", "fp4"):
            raise ValueError(f"Unknown kernel {kernel!r}: use bf16, fp16, nf4 or fp4.")
        if kernel == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            log(f"{device_name()} has no bf16: tuning the fp16 kernels instead.")
            kernel = "fp16"
        if kernel in done:
            continue
        done.add(kernel)
        if tp > 1 and kernel in FOUR_BIT:
            log(f"{kernel}: skipped for tp={tp} (tensor parallelism runs 16-bit weights).")
            continue
        for name, (n, k, bias, swiglu) in projections(quantized=kernel in FOUR_BIT, tp=tp).items():
            # the 16-bit launches fold in a norm or a residual add (one card) or the add of an all-reduced sum and a
            # norm (a tensor-parallel rank)
            fused = None if kernel in FOUR_BIT else (FUSED if tp == 1 else FUSED_TP)[name]
            row = tune_projection(name, n, k, bias, swiglu, kernel, fused=fused)
            rows.append(row)
            best = row["best"]
            base = "bnb_matmul_4bit" if kernel in FOUR_BIT else "cublas"
            label = f"{name}+{fused}" if fused else name
            log(f"{kernel:5s} {label:18s} " + (f"best {best['block_n']}x{best['block_k']}/{best['num_warps']} warps"
                                               + (f", {best['lookup']} lookup: " if "lookup" in best else ": ") +
                                               f"{best['us']:.1f} µs, {best['tb_s']:.2f} TB/s; {base} (bare product) "
                                               f"{row[base + '_tb_s']:.2f} TB/s" if best else "no shape built"))
    if tp == 1 and done & set(FOUR_BIT):  # nf4 and fp4 take the same CUDA kernels: their shapes once
        rows += tune_one_kernel(log) + tune_mma_kernel(log)
    return rows


def table_configs(rows: list[dict[str, Any]], fp16_from_bf16: bool = True) -> list[dict[str, Any]]:
    """The best shape of each tuned row in the table format (rows of one half for gate_up; a 4-bit shape names the
    tiles of ``block_n`` rows a program read when it was timed, ``"tiles"``: SwiGLU's gate and up, or two with
    ``gemv4bit.PAIRED_ROWS``). Unless fp16 was tuned itself, its shapes are bf16's (``fp16_from_bf16``): the same
    kernel reading as many bytes.

    >>> row = {"projection": "o_proj", "kernel": "bf16", "rows": 8, "columns": 64,
    ...        "best": {"block_n": 1, "block_k": 64, "num_warps": 2}}
    >>> [c["kernel"] for c in table_configs([row])]
    ['bf16', 'fp16']
    """
    out = []
    for r in rows:
        if r["best"] and r["kernel"] in CUDA_SHAPE_KEYS:  # a CUDA kernel's shape: rows as it launches
            out.append({"kernel": r["kernel"], "rows": r["rows"], "columns": r["columns"],
                        **{key: r["best"][key] for key in CUDA_SHAPE_KEYS[r["kernel"]]}})
        elif r["best"]:
            n = r["rows"] // 2 if r["projection"] == "gate_up" else r["rows"]
            tiles = {"tiles": gemv4bit.tiles_per_program(r["projection"] == "gate_up")} if r["kernel"] in FOUR_BIT else {}
            out.append({"kernel": r["kernel"], "rows": n, "columns": r["columns"],
                        **{key: r["best"][key] for key in ("block_n", "block_k", "num_warps", "lookup")
                           if key in r["best"]}, **tiles})
    if fp16_from_bf16 and not any(c["kernel"] == "fp16" for c in out):
        out += [{**c, "kernel": "fp16", "copied_from": "bf16"} for c in out if c["kernel"] == "bf16"]
    return out


def write_table(configs: list[dict[str, Any]], path: str | Path | None = None, device: str | None = None,
                source: str = "glmkit tune") -> Path:
    """Write launch shapes for ``device`` (default: this GPU) to ``path`` (default: the user's table in glmkit's
    cache); shapes already there for the same device and not re-tuned are kept."""
    path = Path(path) if path else user_table_path()
    device = device or device_name()
    keep: list[dict[str, Any]] = []
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("tuned_on") == device:
            new_keys = {(c["kernel"], c["rows"], c["columns"]) for c in configs}
            keep = [c for c in old["configs"] if (c.get("kernel", "bf16"), c["rows"], c["columns"]) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"tuned_on": device, "source": source, "date": date.today().isoformat(), "configs": keep + configs}
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path
