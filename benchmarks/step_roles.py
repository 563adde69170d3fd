"""Where a batch-1 decode step's time goes, projection by projection: GLM-4-9B (random weights) on glmkit's fast
path (its defaults), the CUDA graph of one step replayed under torch.profiler at a 160-token cache. Each kernel is
given its role in the step (qkv, attention, o_proj, gate_up, down, lm_head, other) by its place in the layer; per
role: the time it *adds* to the step (its end minus the latest end before it: work overlapped with the kernel before
adds nothing, a wait before it counts against it), and for the projections the bandwidth that time means against
the copy bandwidth of the same run. For bf16, two more decoders bound what attention can still gain: attention
replaced by a kernel that only copies q to the output after waiting for the projection before it ("minimal
kernel"), and by no kernel at all (o_proj reads q: "no kernel"); their tokens are wrong, only their time is read.

    PYTHONPATH=. python benchmarks/step_roles.py --checkpoint /tmp/glm9b     # about 2 minutes on an H200
Writes benchmarks/results/step_roles.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import triton
import triton.language as tl
from step_timeline import kernel_rows

import glmkit.attention
import glmkit.fast_decode
from glmkit.attention import qkv_decode_attention
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import launch_options, wait_for_previous_kernel
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

# a step's graph moves its position on by one each replay (the step picks the next greedy token, glmkit.greedy):
# REPLAYS replays from REPLAYS // 2 before a cache length average it (step_us; results before it: 200 replays at it)
PROMPT, NEW, POSITION, PROFILED, REPLAYS = 32, 256, 160, 5, 64
POSITIONS, ROUNDS = (40, 160, 280), 3  # the variant scripts' cache lengths and rounds (time_variants)
PROJECTIONS = ("qkv", "o_proj", "gate_up", "down")
MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",),
           "gate_up": ("mlp.gate_up_proj",), "down": ("mlp.down_proj",)}


@triton.jit
def _copy_q_kernel(qkv_ptr, out_ptr, N: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(qkv_ptr + offs))


def minimal_attention(qkv, k_cache, v_cache, pos, batch_index, cos, sin, tickets=None, cos_table=False, early=False):
    """A stand-in for attention at batch 1: one kernel that waits for qkv and copies q to a new output."""
    hd = k_cache.shape[-1]
    width = qkv.shape[-1] - 2 * k_cache.shape[1] * hd
    out = torch.empty(1, 1, width, dtype=qkv.dtype, device=qkv.device)
    _copy_q_kernel[(1,)](qkv, out, N=width, num_warps=8, **launch_options())
    return out.view(1, 1, width // hd, hd).transpose(1, 2)


def without_tickets(qkv, k_cache, v_cache, pos, batch_index, cos, sin, tickets=None, cos_table=False, early=False):
    """glmkit's attention as it runs without tickets: at batch 1 one program per KV head walks a short cache, tile
    after tile (``SHORT_TILE``, ``SHORT_STAGES``, ``SHORT_AHEAD``); the decoders pass tickets and split it instead."""
    return qkv_decode_attention(qkv, k_cache, v_cache, pos, batch_index, cos, sin, cos_table=cos_table, early=early)


def no_attention(qkv, k_cache, v_cache, pos, batch_index, cos, sin, tickets=None, cos_table=False, early=False):
    """No kernel: o_proj reads q straight from the qkv projection's output."""
    hd = k_cache.shape[-1]
    width = qkv.shape[-1] - 2 * k_cache.shape[1] * hd
    return qkv[..., :width].reshape(1, 1, width // hd, hd).transpose(1, 2)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a projection's weights as a step reads them: packed 4-bit weights and their absmax (nested too)."""
    w = module.weight
    total = w.numel() * w.element_size()
    state = getattr(w, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def role_bytes(model: torch.nn.Module) -> dict[str, int]:
    layers = model.model.layers
    out = {r: sum(tensor_bytes(layer.get_submodule(m)) for layer in layers for m in MODULES[r]) for r in PROJECTIONS}
    out["lm_head"] = tensor_bytes(model.lm_head)
    return out


def roles_of(names: list[str]) -> list[str]:
    """The role of each kernel of one step, in launch order."""
    gemvs = [i for i, n in enumerate(names) if n.startswith(("_gemv", "glmkit_gemv"))]  # glmkit's GEMVs (not a compiler's)
    role = {}
    for j, i in enumerate(gemvs):
        role[i] = "lm_head" if j == len(gemvs) - 1 else PROJECTIONS[j % 4]
    return [role.get(i, "attention" if ("attention" in n or "_copy_q" in n) else "other") for i, n in enumerate(names)]


def replay_us(graph) -> float:
    """µs a replay of ``graph``, REPLAYS back to back."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / REPLAYS * 1e6


def step_us(decoder: FastDecoder, position: int) -> float:
    """µs a step of ``decoder``'s one-row CUDA graph takes around ``position`` cached tokens: REPLAYS replays back to
    back from REPLAYS // 2 positions before it (each replay decodes the next position)."""
    if position + REPLAYS // 2 >= decoder.max_len:
        raise ValueError(f"step_us at {position} replays up to position {position + REPLAYS // 2}: build the decoder "
                         f"with max_len > that, not {decoder.max_len}.")
    decoder.decode_step(torch.tensor([5], device="cuda"), position - REPLAYS // 2)
    return replay_us(decoder.stages[0].graphs[1, decoder.max_len])


def profile_roles(decoder: FastDecoder, bw: float, nbytes: dict[str, int]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    best = min(step_us(decoder, POSITION) for _ in range(3))
    decoder.decode_step(torch.tensor([5], device="cuda"), POSITION)
    graph = decoder.stages[0].graphs[1, decoder.max_len]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            graph.replay()
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    per = len(rows) // PROFILED
    if per * PROFILED != len(rows):
        raise RuntimeError(f"{len(rows)} kernels in {PROFILED} replays: not a whole number per step")
    roles = roles_of([r[0] for r in rows[:per]])
    adds, busy, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    others = defaultdict(float)
    latest = rows[0][1]
    for i, (name, start, end) in enumerate(rows):
        role = roles[i % per]
        add = max(0.0, end - latest)
        adds[role] += add / PROFILED
        busy[role] += (end - start) / PROFILED
        calls[role] += 1
        if role == "other":
            others[name[:60]] += add / PROFILED
        latest = max(latest, end)
    span = (rows[-1][2] - rows[0][1]) / PROFILED
    table = []
    for role in ("qkv", "attention", "o_proj", "gate_up", "down", "lm_head", "other"):
        row = {"role": role, "calls_per_step": calls[role] / PROFILED, "adds_us": adds[role],
               "kernel_us": busy[role]}
        if role in nbytes:
            row["bytes"] = nbytes[role]
            row["roofline_us"] = nbytes[role] / bw * 1e6
            row["fraction_of_copy_bandwidth"] = row["roofline_us"] / adds[role] if adds[role] else None
        table.append(row)
    return {"replay_us": best, "profiled_step_us": span, "kernels_per_step": per, "roles": table,
            "other_kernels": dict(sorted(others.items(), key=lambda kv: -kv[1])[:8])}


def build(model: torch.nn.Module, attention_fn=None) -> FastDecoder:
    original = glmkit.fast_decode.qkv_decode_attention
    if attention_fn is not None:
        glmkit.fast_decode.qkv_decode_attention = attention_fn
    try:
        # room for the replays around the longest cache length (step_us); the same launch grid as PROMPT + NEW + 8
        decoder = FastDecoder(model, max_len=max(POSITIONS) + REPLAYS // 2 + 16)
        decoder.tokens_per_second(PROMPT, 4)  # warm-up: captures the graphs with this attention
    finally:
        glmkit.fast_decode.qkv_decode_attention = original
    return decoder


def load_for_variants(description: str) -> tuple[argparse.Namespace, torch.nn.Module, float, float]:
    """A variant script's start: its arguments (--checkpoint, --precision), the random GLM-4-9B on cuda:0, the copy
    bandwidth and the model's roofline (tok/s)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args()
    bw = copy_bandwidth()
    ensure_random_checkpoint(args.checkpoint)
    model = load_precision(args.checkpoint, args.precision, device_map="cuda:0")
    return args, model, bw, bw / bytes_read_per_token(model)


def build_variants(model: torch.nn.Module, variants: dict[str, tuple], settings: tuple[str, ...]
                   ) -> dict[str, FastDecoder]:
    """One decoder per variant (``build``), glmkit.attention's ``settings`` set to the variant's values while it is
    built (read at launch: its graphs keep them); each variant is ``(*values, attention stand-in or None)``."""
    defaults = [getattr(glmkit.attention, name) for name in settings]
    decoders = {}
    try:
        for v, (*values, stand_in) in variants.items():
            for name, value in zip(settings, values):
                setattr(glmkit.attention, name, value)
            decoders[v] = build(model, stand_in)
    finally:
        for name, value in zip(settings, defaults):
            setattr(glmkit.attention, name, value)
    return decoders


def time_variants(decoders: dict[str, FastDecoder], rows: dict[str, dict], roofline: float) -> None:
    """Decoders built with ``build`` timed in turns for ROUNDS rounds: the CUDA graph of one step replayed back to
    back at each cache length in POSITIONS, and ``decode_speed`` over PROMPT + NEW tokens. Fills each variant's row
    (``rows[name]``, holding its settings) with the best µs per length, the best tok/s against ``roofline`` and its
    greedy tokens against the first decoder's, and prints it."""
    for row in rows.values():
        row.update(replay_us={p: [] for p in POSITIONS}, decode_tok_s=[])
    for _ in range(ROUNDS):
        for v, decoder in decoders.items():
            for p in POSITIONS:
                rows[v]["replay_us"][p].append(step_us(decoder, p))
            rows[v]["decode_tok_s"].append(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"])
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = next(iter(decoders.values())).generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
    for v, decoder in decoders.items():
        row = rows[v]
        row["best_replay_us"] = {p: min(t) for p, t in row["replay_us"].items()}
        row["best_tok_s"] = max(row["decode_tok_s"])
        row["fraction_of_roofline"] = row["best_tok_s"] / roofline
        tokens = decoder.generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
        row["tokens_as_first"], row["of"] = sum(a == b for a, b in zip(tokens, reference)), len(reference)
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
               if k not in ("replay_us", "decode_tok_s")}, flush=True)


def save_variants(name: str, what: str, args: argparse.Namespace, bw: float, roofline: float,
                  rows: dict[str, dict]) -> None:
    """A variant script's result: benchmarks/results/NAME.json (NAME_fp16.json for --precision fp16)."""
    save_result(f"{name}{'_fp16' if args.precision == 'fp16' else ''}",
                {"what": what, "precision": args.precision, "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
                 "rounds": ROUNDS, "rows": list(rows.values())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precision", nargs="+", default=["bf16"])
    ap.add_argument("--name", default="step_roles", help="the result's name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "position": POSITION, "runs": {}}
    ensure_random_checkpoint(args.checkpoint)
    for precision in args.precision:
        model = load_precision(args.checkpoint, precision, device_map="cuda:0")
        nbytes = role_bytes(model)
        variants = {"fast path": None}
        if precision == "bf16":
            variants |= {"minimal kernel": minimal_attention, "no kernel": no_attention}
        for name, fn in variants.items():
            decoder = build(model, fn)
            run = profile_roles(decoder, bw, nbytes)
            run["roofline_us"] = sum(nbytes.values()) / bw * 1e6
            result["runs"][f"{precision}, {name}"] = run
            print(precision, name, round(run["replay_us"], 1), "us a step;",
                  {r["role"]: round(r["adds_us"], 1) for r in run["roles"]},
                  {r["role"]: round(r["fraction_of_copy_bandwidth"], 3) for r in run["roles"]
                   if r.get("fraction_of_copy_bandwidth")}, flush=True)
            del decoder
            torch.cuda.empty_cache()
        save_result(args.name, result)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
