"""Load on the OpenAI-compatible server: tokens/s for N concurrent clients and time to first token, continuous vs
static batching, against the fast decoder's own speed measured in the same run.

Starts ``glmkit.server`` on loopback in this process (the tiny trained GLM on the CPU by default, or GLM-4-9B with
random weights on a GPU), then:
  1. ``decoder``: FastDecoder's own tokens/s at batch 1/16/64 (its steps alone, no engine) — the ceiling;
  2. ``levels``: N client threads (official ``openai`` client) send 128-token requests for a fixed time, with the
     engine batching continuously, then statically (``--direct`` also submits straight to the engine from N
     threads, no HTTP: the difference is the cost of the HTTP side and of the Python lock it shares with the engine);
  3. ``ttft``: time to first token of short streaming requests on an idle server and while one 2,000-token
     request generates (p50/p99), in both modes.

    python benchmarks/server_load.py --direct                                # tiny model, CPU
    python benchmarks/server_load.py --random-9b --name server_load_gpu      # one GPU, about 4 minutes
    python benchmarks/server_load.py --checkpoint /tmp/glm9b --device-map 20,20 --plain --name server_load_2gpu
Writes benchmarks/results/NAME.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from glmkit.bench import SERVER_PROMPTS as PROMPTS
from glmkit.bench import chat_sender, client_load, first_token_seconds, http_load, save_result


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, object, str]:
    from glmkit.loading import load_model, load_tokenizer
    from glmkit.models import TRAINED_TINY_DIR, model_label

    if args.random_9b:
        from transformers import GenerationConfig

        from glmkit.models import glm4_9b_chat_config, random_model, tiny_glm_config

        config = glm4_9b_chat_config()
        config.eos_token_id = tiny_glm_config().eos_token_id  # the tiny tokenizer's end tokens
        model = random_model(config, "cuda")
        model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=0)
        return model, load_tokenizer(None), "GLM-4-9B-Chat architecture, random weights (bf16)"
    from glmkit.cli import device_map_option

    path = args.checkpoint or TRAINED_TINY_DIR
    model = load_model(path, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                       device_map=device_map_option(args.device_map, str(path)))
    return model, load_tokenizer(path), model_label(path)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decoder_speed(engine: object, batches: list[int], steps: int) -> list[dict]:
    """FastDecoder's own decode tokens/s at each batch size (the engine idle, its decoder built)."""
    decoder = engine.runner._decoder()
    rows = []
    with torch.inference_mode():
        for b in batches:
            tokens = torch.zeros(b, dtype=torch.long, device=engine.device)
            pos = torch.full((b,), 64, dtype=torch.long, device=engine.device)
            for _ in range(3):
                decoder.decode_step(tokens, pos)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder.decode_step(tokens, pos)
            sync()
            rows.append({"batch": b, "decode_tok_s": b * steps / (time.perf_counter() - t0)})
            print("decoder", rows[-1], flush=True)
    return rows


def load_level(engine: object, url: str, n: int, seconds: float, max_tokens: int, direct: bool,
               pool: object = None) -> dict:
    """N clients, each sending requests back to back for ``seconds``; tokens are completion tokens. With ``pool``
    (a one-process executor) the HTTP clients run in that process, as a real server's clients run elsewhere."""
    if pool is not None and not direct:
        steps0, t0 = engine.steps, time.perf_counter()
        row = pool.submit(http_load, url, "glm-4-9b-chat", n, seconds, max_tokens).result()
        return {"clients": n, "via": "http", "clients_in": "another process", **row,
                "engine_steps_per_s": (engine.steps - steps0) / (time.perf_counter() - t0)}
    ids = [engine.encode([{"role": "user", "content": p}]) for p in PROMPTS]

    def submit(i: int, tokens: int) -> int:
        return len(engine.submit(ids[i % len(ids)], max_tokens=tokens, temperature=0.8, seed=i).wait().tokens)

    send = submit if direct else chat_sender(url, "glm-4-9b-chat", timeout=600)
    return {"clients": n, "via": "engine" if direct else "http",
            **client_load(send, n, seconds, max_tokens, steps=lambda: engine.steps)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def ttft(engine: object, url: str, samples: int, long_tokens: int, est_tok_s: float) -> dict:
    """TTFT of short requests, idle and while one ``long_tokens`` request generates (started first)."""
    import openai

    idle = [first_token_seconds(url, PROMPTS[i % len(PROMPTS)], "glm-4-9b-chat", timeout=600) for i in range(samples)]
    c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    long_done = threading.Event()
    no_end = {str(t): -100 for t in engine.eos}  # random weights: make sure it runs its full length

    def long() -> None:
        c.chat.completions.create(model="glm-4-9b-chat", max_tokens=long_tokens, temperature=0, logit_bias=no_end,
                                  messages=[{"role": "user", "content": "Write a long story."}])
        long_done.set()

    lt = threading.Thread(target=long)
    lt.start()
    while not engine.busy and not long_done.is_set():  # the long one runs
        time.sleep(0.005)
    time.sleep(0.1)
    busy, during = [], []
    spacing = 0.5 * long_tokens / est_tok_s / samples  # all sent within the first half of the long generation

    def short(i: int) -> None:
        t = first_token_seconds(url, PROMPTS[i % len(PROMPTS)], "glm-4-9b-chat", timeout=600)
        busy.append(t)
        during.append(not long_done.is_set())

    threads = []
    for i in range(samples):
        threads.append(threading.Thread(target=short, args=(i,)))
        threads[-1].start()
        time.sleep(spacing)
    for t in threads:
        t.join()
    lt.join()
    out = {"samples": samples, "long_tokens": long_tokens, "idle_p50_s": statistics.median(idle),
           "idle_p99_s": pct(idle, 0.99), "busy_p50_s": statistics.median(busy), "busy_p99_s": pct(busy, 0.99),
           "busy_first_token_before_long_ended": sum(during)}
    out["busy_p50_vs_idle"] = out["busy_p50_s"] / out["idle_p50_s"]
    print("ttft", out, flush=True)
    return out


def profiled(engine: object, run: object) -> tuple[dict, list[dict]]:
    """``run()``'s result and the engine thread's profile while it ran: the 25 functions with the most cumulative
    time inside ``Engine.step`` (on a GPU, time waiting for the device shows up in the call that waits)."""
    import cProfile
    import pstats

    prof, step = cProfile.Profile(), engine.step

    def profiled_step() -> None:
        prof.enable()
        try:
            step()
        finally:
            prof.disable()

    engine.step = profiled_step
    try:
        result = run()
    finally:
        engine.step = step
    stats = pstats.Stats(prof).stats
    steps = max(next((v[0] for (f, _, name), v in stats.items() if name == "step" and f.endswith("engine.py")), 1), 1)
    top = sorted(stats.items(), key=lambda kv: -kv[1][3])[:25]
    return result, [{"function": f"{f.rsplit('/', 1)[-1]}:{line}({name})", "calls_per_step": v[1] / steps,
                     "ms_per_step": 1000 * v[3] / steps, "own_ms_per_step": 1000 * v[2] / steps}
                    for (f, line, name), v in top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the tiny trained GLM")
    ap.add_argument("--random-9b", action="store_true",
                    help="GLM-4-9B-Chat with random weights built on the GPU (no checkpoint needed; tiny tokenizer)")
    ap.add_argument("--device-map", help="with --checkpoint: auto, or layers per GPU like 20,20 (as glmkit serve)")
    ap.add_argument("--plain", action="store_true", help="the plain path (static batching), no fast decoder")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["continuous", "static"])
    ap.add_argument("--direct", action="store_true", help="also submit straight to the engine (no HTTP)")
    ap.add_argument("--ttft-samples", type=int, default=20)
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--decoder-steps", type=int, default=100)
    ap.add_argument("--client-process", action="store_true",
                    help="run the HTTP clients in a process of their own (as a server's clients run elsewhere), "
                         "not as threads beside the server")
    ap.add_argument("--profile", action="store_true",
                    help="profile the engine thread at each level (cProfile; slows it): top functions per step")
    ap.add_argument("--name", default="server_load_cpu")
    args = ap.parse_args()
    from glmkit.engine import Engine
    from glmkit.server import ServerThread, create_app

    model, tokenizer, label = build(args)
    fast = not args.plain
    slots = max(args.clients + [2])  # the TTFT test runs a long and a short request at once
    engine = Engine(model, tokenizer, max_batch_size=slots, max_context=args.long_tokens + 128, fast_decode=fast)
    server = ServerThread(create_app(engine)).start()
    t_build = time.perf_counter()
    for p in PROMPTS:  # first calls: the decoder is built (compiled, graphs captured) here
        engine.submit(engine.encode([{"role": "user", "content": p}]), max_tokens=8).wait()
    build_s = time.perf_counter() - t_build
    decoder = decoder_speed(engine, args.clients, args.decoder_steps) if fast else []
    ceiling = {r["batch"]: r["decode_tok_s"] for r in decoder}
    levels, ttfts = [], {}
    pool = None
    if args.client_process:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(time.sleep, 0).result()  # started before the first window
    for mode in args.modes if fast else ["static"]:
        engine.scheduler.continuous = mode == "continuous"  # switched while the engine is idle
        for n in args.clients:
            for direct in ([False, True] if args.direct else [False]):
                def run(n: int = n, direct: bool = direct) -> dict:
                    return load_level(engine, server.url, n, args.seconds, args.max_tokens, direct, pool)

                if args.profile:
                    result, top = profiled(engine, run)
                    row = {"mode": mode, **result, "profile": top}
                else:
                    row = {"mode": mode, **run()}
                if n in ceiling:
                    row["vs_decoder"] = row["tokens_per_s"] / ceiling[n]
                levels.append(row)
                print(row, flush=True)
        if args.ttft_samples:
            est = ceiling.get(1) or levels[0]["tokens_per_s"]
            ttfts[mode] = ttft(engine, server.url, args.ttft_samples, args.long_tokens, est)
    if pool is not None:
        pool.shutdown()
    server.stop()
    engine.close()
    where = "in a process of their own" if args.client_process else "in the server's process"
    save_result(args.name, {
        "model": label, "device_map": args.device_map, "fast_decode": fast, "first_requests_s": build_s,
        "method": f"decoder: {args.decoder_steps} decode steps at each batch size after 3 warm-up steps; levels: "
                  f"{args.seconds:.0f} s each after a warm-up of as many concurrent 8-token requests, max_tokens "
                  f"{args.max_tokens}, temperature 0.8, openai client threads on loopback {where} (via=engine: submit() from "
                  f"threads, no HTTP); ttft: {args.ttft_samples} streaming 8-token requests idle, then as many sent "
                  f"during one {args.long_tokens}-token request, first chunk with text or a finish reason",
        "decoder": decoder, "levels": levels, "ttft": ttfts})


if __name__ == "__main__":
    main()
