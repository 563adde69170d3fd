"""Launch shapes of glmkit's 16-bit CUDA kernels tuned in the decode step (``glmkit tune``, notebook 05).

The batch-1 16-bit kernel (``glmkit.gemv16_one``: q/k/v and o_proj) and the MLP kernel (``glmkit.mlp16_one``) are
tuned as the step runs them, not launch by launch: how fast one of them is depends on the kernels beside it (their
shared memory, the SMs they leave, when the next one may start). Timed alone, o_proj's shapes once ranked the other
way round from the step (``glmkit.gemv16_one.ROLES``). So each candidate shape is written into this process's table
(``glmkit.gemv.active_cuda_shapes``), a ``FastDecoder`` is built on a few layers of GLM-4-9B's shape with random
weights (``STEP_LAYERS``; a small vocabulary, so that the layers dominate the step), and its decode rate is measured in
turns with the default's decoder (two decoders built apart differ by a few percent on their own); one knob at a time
(q/k/v, then o_proj, then the MLP's ring), each keeping the best so far. A shape is kept only where the step is
``glmkit.gemv_tuning.MARGIN`` faster than with the default, and only where its logits agree with the default's.
These kernels run on Hopper GPUs (H100, H200) in bf16 and fp16, with the same shapes for both.

>>> [knob.name for knob in knobs(227 * 1024)]
['qkv', 'o_proj', 'mlp']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from glmkit import gemv16_one, mlp16_one
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import active_cuda_shapes, device_name
from glmkit.gemv_tuning import beats_default
from glmkit.models import glm4_9b_chat_config, random_model

STEP_LAYERS = 4  # GLM-4-9B's layers the tuning decoder runs (each as the 40-layer model's)
STEP_VOCAB = 4096  # its vocabulary: lm_head then weighs what a layer's projection does
PROMPT, NEW_TOKENS, ROUNDS = 32, 128, 3  # the decode timed: best of ROUNDS, a candidate's in turns with the default's
WARPS = ((4, 4), (2, 8), (8, 2))  # the 16-bit kernel's groups x warps a CTA tried, each with 2 or 3 stages a warp
RINGS = (4, 6, 8, 12)  # the MLP kernel's ring slots tried (those that fit)
# a candidate's logits within this relative distance of the default's: summing in another order moves them (on an
# H200, 4 random layers: up to 9.2e-3, step_shapes_tune.json); a shape that gets the products wrong moves them ~1
AGREE = 5e-2


@dataclass(frozen=True)
class Knob:
    """One launch shape tuned in the step: ``kernel``'s table entry for ``rows`` x ``columns`` and the fields tried
    there (the untuned default first)."""

    name: str
    kernel: str
    rows: int
    columns: int
    candidates: tuple[dict[str, int], ...]


def knobs(smem_limit: int) -> list[Knob]:
    """GLM-4-9B's knobs on a card whose CTAs may take ``smem_limit`` bytes of shared memory: q/k/v's and o_proj's
    ``Shape16`` (``WARPS`` x 2-3 stages x 1 to depth - 1 copied early, where they fit) and the MLP's ring
    (``RINGS``, up to the most that fit); each default is ``shape_for``'s."""
    cfg = glm4_9b_chat_config()
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim

    def shapes(role: str) -> tuple[dict[str, int], ...]:
        default = gemv16_one.shape_for(hidden, smem_limit, role)
        tried = [gemv16_one.Shape16(g, w, d, e) for g, w in WARPS for d in (2, 3) for e in range(1, d)]
        fits = [s for s in tried if s != default and s.smem_bytes(hidden) <= smem_limit
                and hidden % (s.warps * gemv16_one.STAGE_COLUMNS) == 0]
        return tuple(asdict(s) for s in ([default] if default else []) + fits)

    most = mlp16_one.shape_for(hidden, inter, smem_limit)
    rings = () if most is None else (most.ring,) + tuple(r for r in RINGS if r < most.ring)
    return [Knob("qkv", gemv16_one.TABLE_KERNEL, qkv_rows, hidden, shapes("qkv")),
            Knob("o_proj", gemv16_one.TABLE_KERNEL, hidden, hidden, shapes("o_proj")),
            Knob("mlp", mlp16_one.TABLE_KERNEL, inter, hidden, tuple({"ring": r} for r in rings))]


def search(knob_list: list[Knob], build: Callable[[], tuple[Callable[[], float], torch.Tensor]],
           log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Tune each knob in turn. ``build()`` makes a decoder with this process's table as it stands and gives a timer
    (seconds a step, one measurement) and a step's logits. Each candidate's decoder is timed in turns with the
    default's (``ROUNDS`` each, best of each: one decoder's drift touches both), and its logits set against the
    default's (``AGREE``); the fastest that agrees is kept where it beats the default by ``MARGIN``
    (``beats_default``), else the default; it stays in the table for the knobs after."""
    table, rows = active_cuda_shapes(), []
    for knob in (k for k in knob_list if k.candidates):  # (a knob without candidates: the kernel takes no shape)
        key = (knob.kernel, knob.rows, knob.columns)
        rows.append(_tune_knob(knob, key, table, build))
        log(f"16-bit {knob.name:7s} (CUDA kernel, in the step) kept {_fields(rows[-1]['best'])}: "
            f"{rows[-1]['best']['over_default']:.3f}x the default's step time ({rows[-1]['default']['step_us']:.0f} "
            f"µs a step of {STEP_LAYERS} layers)")
    return rows


def _tune_knob(knob: Knob, key: tuple[str, int, int], table: dict[Any, Any],
               build: Callable[[], tuple[Callable[[], float], torch.Tensor]]) -> dict[str, Any]:
    """``search``'s work on one knob; the table holds its kept fields after (the default's, if the tuning fails)."""
    kept_fields = knob.candidates[0]
    try:
        table[key] = knob.candidates[0]
        default_time, ref = build()
        default = {**knob.candidates[0], "step_us": 1e6 * min(default_time() for _ in range(ROUNDS)),
                   "over_default": 1.0, "logits_rel_diff": 0.0}
        tried = [default]
        for fields in knob.candidates[1:]:
            table[key] = fields
            try:
                candidate_time, logits = build()
                pairs = [(default_time(), candidate_time()) for _ in range(ROUNDS)]
            except Exception as exc:  # a shape NVRTC or the driver cannot take: record and go on
                tried.append({**fields, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            best_default, best = min(d for d, _ in pairs), min(c for _, c in pairs)
            tried.append({**fields, "step_us": 1e6 * best, "over_default": best / best_default,
                          "logits_rel_diff": ((logits - ref).norm() / ref.norm()).item()})
        ok = [t for t in tried if t.get("logits_rel_diff", 1.0) < AGREE]
        kept = min(ok, key=lambda t: t["over_default"])
        if not beats_default(kept["over_default"], 1.0):
            kept = default  # not faster by the margin: the default stays
        kept_fields = {k: kept[k] for k in knob.candidates[0]}
        return {"projection": knob.name, "kernel": knob.kernel, "rows": knob.rows, "columns": knob.columns,
                "tried": tried, "default": default, "best": kept}
    finally:
        table[key] = kept_fields


def _fields(t: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("step_us", "over_default", "logits_rel_diff"))


def tune_step(log: Callable[[str], Any] = print, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """Tune the 16-bit CUDA kernels' shapes in the decode step on this GPU (``search`` over ``knobs``) where they run
    and pass their first-run checks; else nothing, said in one line."""
    device = torch.device("cuda", torch.cuda.current_device())
    if not (gemv16_one.runs_on(device, dtype) and gemv16_one.check(device, dtype) and mlp16_one.check(device, dtype)):
        log(f"16-bit CUDA kernels: do not run on {device_name()} (Hopper, NVRTC; GLMKIT_16BIT_KERNEL and "
            "GLMKIT_MLP_KERNEL unset): the Triton GEMVs' shapes serve the step.")
        return []
    config = glm4_9b_chat_config()
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = STEP_LAYERS, STEP_VOCAB, 0
    models = [random_model(config, device, dtype)]  # (emptied after: its ~2 GB go back to the GPU)
    ids = torch.randint(0, STEP_VOCAB, (1, PROMPT + 1), generator=torch.Generator().manual_seed(0)).to(device)

    def build() -> tuple[Callable[[], float], torch.Tensor]:
        decoder = FastDecoder(models[0], max_len=PROMPT + NEW_TOKENS + 8)
        decoder.prefill(ids[:, :PROMPT])  # (the first prefill captures the step's graphs)
        logits = decoder.decode_step(ids[0, PROMPT:], PROMPT).float().clone()
        return lambda: 1 / decoder.tokens_per_second(PROMPT, NEW_TOKENS)["decode_tok_s"], logits

    try:
        return search(knobs(gemv16_one.smem_limit(device)), build, log)
    finally:
        models.clear()
        torch.cuda.empty_cache()
