"""``glmkit serve --tp 2`` against one-GPU ``glmkit serve --fast-decode``: tokens/s of N concurrent openai clients,
time to first token, and how long a SIGTERM takes to leave no process behind.

Each server runs as its own ``glmkit serve`` process (the command a user types); the clients are official
``openai`` client threads on loopback, sending ``--max-tokens`` requests back to back for ``--seconds`` per level
with the end tokens banned (random weights would stop at random).

    python benchmarks/server_tp.py --seconds 3 --clients 1 4 --max-tokens 32 --name server_tp_cpu   # tiny, CPU
    python benchmarks/server_tp.py --checkpoint /tmp/glm9b --name server_tp_2gpu     # 2 GPUs, about 5 minutes
Writes benchmarks/results/NAME.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import psutil

from glmkit.bench import save_result
from glmkit.parallel import free_port

SERVERS = {"tp2": ["--tp", "2"], "split": ["--device-map", "20,20", "--fast-decode"], "one": ["--fast-decode"]}
PROMPTS = ["Tell me about GPUs.", "What is a device map?", "How do I split the model over two GPUs?",
           "What limits decode speed?"]


def start(checkpoint: str, flags: list[str], slots: int, context: int) -> tuple[subprocess.Popen, str, float]:
    """A ``glmkit serve`` process and its URL, once ``/health`` answers; the seconds that took."""
    port = free_port()
    cmd = [sys.executable, "-m", "glmkit.cli", "serve", "--model", checkpoint, "--port", str(port),
           "--max-batch-size", str(slots), "--max-context", str(context), *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    base = f"http://127.0.0.1:{port}"
    while proc.poll() is None and time.perf_counter() - t0 < 900:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{' '.join(cmd)} did not come up (exit code {proc.poll()})")


def request(base: str, i: int, tokens: int, no_end: dict[str, float]) -> int:
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=900)
    r = c.chat.completions.create(model="glm-4", max_tokens=tokens, temperature=0.8, seed=i, logit_bias=no_end,
                                  messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    return r.usage.completion_tokens


def level(base: str, n: int, seconds: float, tokens: int, no_end: dict[str, float]) -> dict:
    """N clients sending requests back to back for ``seconds`` (after one warm-up round of N 8-token requests)."""
    warm = [threading.Thread(target=request, args=(base, i, 8, no_end)) for i in range(n)]
    [t.start() for t in warm]
    [t.join() for t in warm]
    counts, lock, stop_at = {"requests": 0, "tokens": 0}, threading.Lock(), time.perf_counter() + seconds

    def client(i: int) -> None:
        while time.perf_counter() < stop_at:
            got = request(base, i, tokens, no_end)
            with lock:
                counts["requests"] += 1
                counts["tokens"] += got

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    took = time.perf_counter() - t0
    return {"clients": n, "seconds": took, **counts, "tokens_per_s": counts["tokens"] / took}


def ttft(base: str, samples: int) -> dict:
    """Seconds to the first streamed text of 8-token requests on the idle server."""
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=900)
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        for chunk in c.chat.completions.create(model="glm-4", max_tokens=8, temperature=0, stream=True,
                                               messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]):
            if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                break
        times.append(time.perf_counter() - t0)
    return {"samples": samples, "idle_p50_s": statistics.median(times), "idle_max_s": max(times)}


def shutdown(proc: subprocess.Popen) -> dict:
    """SIGTERM to ``glmkit serve``: its exit code, seconds until every process it started is gone."""
    children = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:  # recorded as a hang, then everything it started is killed
        code = None
        proc.kill()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    return {"exit_code": code, "hung": code is None, "processes": 1 + len(children), "left_after_30s": len(alive),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the tiny trained GLM")
    ap.add_argument("--servers", nargs="+", default=["tp2", "one"], choices=list(SERVERS),
                    help="tp2: glmkit serve --tp 2; split: --device-map 20,20 --fast-decode; one: --fast-decode")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ttft-samples", type=int, default=10)
    ap.add_argument("--name", default="server_tp_cpu")
    args = ap.parse_args()
    from transformers import GenerationConfig

    from glmkit.models import TRAINED_TINY_DIR, model_label

    checkpoint = str(args.checkpoint or TRAINED_TINY_DIR)
    eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
    no_end = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    rows: list[dict] = []

    def save() -> None:
        one = [r for r in rows if r["kind"] == "one" and "levels" in r]
        for row in rows if one else []:
            for a, b in zip(row.get("levels", []), one[0]["levels"]):
                a["vs_one_gpu"] = a["tokens_per_s"] / b["tokens_per_s"]
        save_result(args.name, {
            "model": model_label(checkpoint), "rows": rows,
            "method": f"each server a `glmkit serve` process; per level {args.seconds:.0f} s of N openai client "
                      f"threads sending max_tokens={args.max_tokens} requests back to back (end tokens banned, "
                      "temperature 0.8) after a warm-up round of 8-token requests; ttft: streaming 8-token requests "
                      "on the idle server; shutdown: SIGTERM to glmkit serve until every process it started is gone"})

    for server in args.servers:
        flags = SERVERS[server]
        row = {"kind": server, "server": "glmkit serve " + " ".join(flags)}
        try:
            proc, base, row["startup_s"] = start(checkpoint, flags, max(args.clients), args.max_tokens + 128)
        except RuntimeError as exc:  # recorded; the other servers still run
            rows.append(row | {"error": str(exc)})
            save()
            continue
        try:
            row["ttft"] = ttft(base, 2)
            row["levels"] = [level(base, n, args.seconds, args.max_tokens, no_end) for n in args.clients]
            row["ttft"] = ttft(base, args.ttft_samples)  # (the first two above: compile and graph capture)
        except Exception as exc:  # a failed level is recorded, and the server still shut down
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            row["shutdown"] = shutdown(proc)
        print(row, flush=True)
        rows.append(row)
        save()


if __name__ == "__main__":
    main()
