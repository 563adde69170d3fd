"""The 4-bit batch-1 step with its norms and residual adds folded into glmkit's 4-bit GEMVs, against the compiled
layer that ran them as kernels of their own, with bf16 beside them: GLM-4-9B (random weights) on one GPU, one run.

Variants of nf4 (the variants take turns, three rounds, so that clock and temperature drift touch them alike):
``fused`` (the default: ``gemv_4bit_residual`` writes the next norm's ``NormedStream``, ``gemv_4bit_normed`` reads it;
an uncompiled layer), ``fused, PDL`` (``pdl=True``: launched with programmatic dependent launch) and ``compiled
layer`` (``fuse_norms=False``: the layer compiled around the 4-bit ops, each residual add and norm a kernel of its
own, the default before). Per variant: the CUDA graph of one step replayed back to back (µs a token, around 160 cached
tokens) and ``decode_speed`` (tok/s of the token loop, sampling included), best round; against bf16's default
decoder in the same run and the 4-bit roofline (copy bandwidth / bytes a token reads); and its greedy tokens and the
logits of one step against the compiled layer's. (The committed run also timed ``gemv_4bit_normed`` asking for its
sums of squares before its loop instead of after: slower, removed.)

    PYTHONPATH=. python benchmarks/nf4_fused.py --checkpoint /tmp/glm9b     # about 3 minutes on an H200
Writes benchmarks/results/nf4_fused.json (or --name; and to $OUT). ``nf4_fused.json`` was measured with one tile of
rows a program, ``nf4_fused_paired.json`` with two (``gemv4bit.PAIRED_ROWS``) and the H200 shapes of nf4_paired.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from early_reads import replay_us

from glmkit import gemv, gemv4bit_one, mlp16_one
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

VARIANTS = {"fused, PDL": ("nf4", {"pdl": True}), "fused": ("nf4", {"pdl": False}),
            "compiled layer": ("nf4", {"fuse_norms": False}), "bf16": ("bf16", {})}
PROMPT, NEW, ROUNDS = 32, 256, 3


def nf4_and_bf16(checkpoint: str) -> tuple[dict[str, Any], float, dict[str, float]]:
    """GLM-4-9B (random weights at ``checkpoint``, written if missing) in nf4 and bf16 on the GPU, the copy bandwidth
    measured now, and each precision's roofline (tok/s: copy bandwidth / bytes a token reads)."""
    ensure_random_checkpoint(checkpoint)
    bw = copy_bandwidth()
    models = {p: load_precision(checkpoint, p, device_map="cuda:0") for p in ("nf4", "bf16")}
    return models, bw, {p: bw / bytes_read_per_token(m) for p, m in models.items()}


def start(description: str, name: str, name_help: str | None = None
          ) -> tuple[argparse.Namespace, dict[str, Any], float, dict[str, float]]:
    """A script of nf4-against-bf16 variants starting: its arguments (``--checkpoint``; ``--name``, default ``name``)
    and ``nf4_and_bf16``'s models, copy bandwidth and rooflines."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default=name, help=name_help)
    args = ap.parse_args()
    return (args, *nf4_and_bf16(args.checkpoint))


def warmed(model: torch.nn.Module, **options: Any) -> FastDecoder:
    """A decoder of ``model`` (``FastDecoder`` ``options``) for a prompt of PROMPT and NEW new tokens, its graphs
    built and captured by a short warm-up (settings read at launch keep the values they have now)."""
    decoder = FastDecoder(model, max_len=PROMPT + NEW + 8, **options)
    decoder.tokens_per_second(PROMPT, 4)
    return decoder


def step_logits(decoder: FastDecoder, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the first decode step after the prompt ``ids`` (its last token again, at the next position)."""
    decoder.prefill(ids)
    return decoder.decode_step(ids[0, -1:], ids.shape[1]).float().clone()


def default_against_tuned(model: torch.nn.Module, tuned: dict[Any, Any], prompt: int, new: int, max_len: int,
                          batch_size: int = 1) -> dict[str, Any]:
    """The shape-tuning benchmarks' decode: a decoder of ``batch_size`` rows built (its graphs captured) with the untuned
    default CUDA kernel shapes and one with ``tuned`` as this process's table (``glmkit.gemv.active_cuda_shapes``),
    taking turns over ``ROUNDS`` rounds (best of each), their ratio, and whether their greedy tokens (32 a row) agree."""
    def built(shapes: dict[Any, Any]) -> FastDecoder:
        gemv._ACTIVE_CUDA = shapes
        decoder = FastDecoder(model, max_len=max_len, batch_size=batch_size)
        decoder.tokens_per_second(prompt, 8)  # the warm-up: compile and capture
        return decoder

    decoders = {"default shapes": built({}), "tuned shapes": built(tuned)}
    rates: dict[str, list[float]] = {label: [] for label in decoders}
    for _ in range(ROUNDS):  # the two take turns, so drift touches both alike
        for label, decoder in decoders.items():
            rates[label].append(decoder.tokens_per_second(prompt, new)["decode_tok_s"])
    ids = torch.randint(0, 1000, (batch_size, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    tokens = {label: d.generate(ids, 32, ignore_eos=True)[:, prompt:].tolist() for label, d in decoders.items()}
    best = {label: max(r) for label, r in rates.items()}
    return {"tok_s": rates, "best_tok_s": best, "tuned_over_default": best["tuned shapes"] / best["default shapes"],
            "same_tokens": tokens["tuned shapes"] == tokens["default shapes"]}


def _as_is(variant: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def take_turns(decoders: dict[str, FastDecoder], rows: dict[str, dict[str, Any]],
               around: Callable[[str], AbstractContextManager[Any]] = _as_is) -> None:
    """``ROUNDS`` rounds, the variants taking turns (clock and temperature drift touch them alike): each round's µs
    a replayed step and decode tok/s into the variant's row (``around(variant)``: what each variant runs inside)."""
    for _ in range(ROUNDS):
        for v, decoder in decoders.items():
            with around(v):
                rows[v]["replay_us"].append(replay_us(decoder))
                rows[v]["decode_tok_s"].append(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"])


def _is_nf4(row: dict[str, Any]) -> bool:
    return row["precision"] == "nf4"


def every_row(row: dict[str, Any]) -> bool:
    """``against_reference``'s ``compared`` for runs that compare every variant (the reference too: itself, exactly)."""
    return True


def against_reference(decoders: dict[str, FastDecoder], rows: dict[str, dict[str, Any]], ids: torch.Tensor,
                      reference: str, tokens_key: str, logits_key: str,
                      around: Callable[[str], AbstractContextManager[Any]] = _as_is,
                      compared: Callable[[dict[str, Any]], bool] = _is_nf4) -> None:
    """Each ``compared`` variant's (default: the nf4 ones) 32 greedy tokens after ``ids`` and the logits of its first
    step, against variant ``reference``'s: the tokens that agree (``tokens_key``, of ``"of"``) and the logits'
    relative difference (``logits_key``) into its row (``around(variant)``: what each variant runs inside)."""
    with around(reference):
        want = decoders[reference].generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
        first = step_logits(decoders[reference], ids)
    for v, decoder in decoders.items():
        row = rows[v]
        if compared(row):
            with around(v):
                tokens = decoder.generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
                logits = step_logits(decoder, ids)
            row[tokens_key], row["of"] = sum(a == b for a, b in zip(tokens, want)), len(want)
            row[logits_key] = ((logits - first).norm() / first.norm()).item()


def mlp_kernel(decoder: FastDecoder) -> bool:
    """Whether ``decoder``'s batch-1 MLP runs as glmkit's one CUDA kernel (``glmkit.mlp16_one``: 16-bit weights, the
    default on Hopper): its stages hold the kernel's workspace, and the kernel runs there (not turned off)."""
    return any(w is not None and mlp16_one.runs_on(w.device, w.dtype) for w in (st.mlp_workspace for st in decoder.stages))


@contextlib.contextmanager
def kernel_env(kernel: str | None) -> Iterator[None]:
    """``GLMKIT_4BIT_KERNEL`` set to ``kernel`` (or left unset) for the block."""
    before = os.environ.pop("GLMKIT_4BIT_KERNEL", None)
    if kernel:
        os.environ["GLMKIT_4BIT_KERNEL"] = kernel
    try:
        yield
    finally:
        os.environ.pop("GLMKIT_4BIT_KERNEL", None)
        if before is not None:
            os.environ["GLMKIT_4BIT_KERNEL"] = before


@contextlib.contextmanager
def products(f16: bool) -> Iterator[None]:
    """glmkit's batch-1 4-bit CUDA kernel multiplying a bf16 token in fp16 (``f16``: its default) or in bf16, for the
    block (``gemv4bit_one.F16_PRODUCTS``): a decoder whose graphs are captured inside it (at its first steps, not
    when it is built) keeps that kernel."""
    before, gemv4bit_one.F16_PRODUCTS = gemv4bit_one.F16_PRODUCTS, f16
    try:
        yield
    finally:
        gemv4bit_one.F16_PRODUCTS = before


def measure_each_precision(checkpoint: str, measure: Callable[[torch.nn.Module], dict[str, Any]],
                           result: dict[str, Any], name: str, precisions: Sequence[str] = ("bf16", "nf4"),
                           device: str = "cuda:0") -> None:
    """For each of ``precisions`` in turn: its model of ``checkpoint`` on ``device``, freed before the next loads;
    each entry of ``measure(model)`` goes to ``result[key][precision]``, and ``result`` is saved as ``name`` after
    each precision (``max_len_sweep.py``, ``engine_spans.py``)."""
    for precision in precisions:
        model = load_precision(checkpoint, precision, device_map=device)
        for key, value in measure(model).items():
            result.setdefault(key, {})[precision] = value
        del model
        gc.collect()
        torch.cuda.empty_cache()
        save_result(name, result)


def gpu_uuids() -> list[str]:
    """The UUIDs of the GPUs here, read with nvidia-smi (which card a result ran on); [] where it does not answer."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def report(name: str, what: str, rows: dict[str, dict[str, Any]], bw: float, rooflines: dict[str, float]) -> None:
    """Each row's summary printed, and the run (``what`` it measures) saved as ``name``."""
    for row in rows.values():
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
               if k not in ("replay_us", "decode_tok_s")}, flush=True)
    save_result(name, {"what": what, "copy_bandwidth_bytes_s": bw, "rounds": ROUNDS,
                       "prompt": PROMPT, "new_tokens": NEW, "roofline_tok_s": rooflines, "gpu_uuids": gpu_uuids(),
                       "gpu_note": "read with nvidia-smi in the same call", "rows": list(rows.values())})


def best_rounds(rows: dict[str, dict[str, Any]], rooflines: dict[str, float]) -> None:
    """Each row's best round, against its precision's roofline and the ``"bf16"`` row's best."""
    for row in rows.values():
        row["best_replay_us"], row["best_tok_s"] = min(row["replay_us"]), max(row["decode_tok_s"])
    bf16 = rows["bf16"]
    for row in rows.values():
        row["fraction_of_roofline"] = row["best_tok_s"] / rooflines[row["precision"]]
        row["over_bf16"] = row["best_tok_s"] / bf16["best_tok_s"]
        row["replay_over_bf16"] = bf16["best_replay_us"] / row["best_replay_us"]


def main() -> None:
    args, models, bw, rooflines = start(__doc__.splitlines()[0], "nf4_fused", "the result's name (nf4_fused_paired: "
                                        "the run with two tiles of rows a program, gemv4bit.PAIRED_ROWS, and their "
                                        "shapes)")
    decoders = {}
    for v, (p, options) in VARIANTS.items():
        decoders[v] = warmed(models[p], **options)
    rows = {v: {"variant": v, "precision": p, "options": o, "fuses_norms": decoders[v].fuses_norms(1),
                "uses_pdl": decoders[v].uses_pdl(1),
                "compiled_step": decoders[v].compiled and decoders[v].layer_fn_for(1) is decoders[v].layer_fn,
                "replay_us": [], "decode_tok_s": []} for v, (p, o) in VARIANTS.items()}
    take_turns(decoders, rows)
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    against_reference(decoders, rows, ids, "compiled layer", "tokens_as_compiled", "step_logits_rel_diff")
    best_rounds(rows, rooflines)
    report(args.name, __doc__.splitlines()[0], rows, bw, rooflines)


if __name__ == "__main__":
    main()
