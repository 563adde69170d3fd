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
import statistics

from glmkit.bench import SERVER_PROMPTS, ServeProcess, chat_sender, client_load, first_token_seconds, save_result

SERVERS = {"tp2": ["--tp", "2"], "split": ["--device-map", "20,20", "--fast-decode"], "one": ["--fast-decode"]}


def ttft(url: str, samples: int) -> dict:
    """Seconds to the first streamed text of 8-token requests on the idle server."""
    times = [first_token_seconds(url, SERVER_PROMPTS[i % len(SERVER_PROMPTS)]) for i in range(samples)]
    return {"samples": samples, "idle_p50_s": statistics.median(times), "idle_max_s": max(times)}


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

    for kind in args.servers:
        flags = SERVERS[kind]
        row = {"kind": kind, "server": "glmkit serve " + " ".join(flags)}
        server = ServeProcess(checkpoint, "--max-batch-size", str(max(args.clients)),
                              "--max-context", str(args.max_tokens + 128), *flags,
                              env={"TOKENIZERS_PARALLELISM": "false"}, timeout_s=900)
        try:
            server.launch().wait_ready()
        except RuntimeError as exc:  # recorded (with the end of its log); the other servers still run
            server.close()
            rows.append(row | {"error": str(exc)})
            save()
            continue
        row["startup_s"] = server.startup_s
        send = chat_sender(server.url, logit_bias=no_end)
        try:
            row["ttft"] = ttft(server.url, 2)
            row["levels"] = [client_load(send, n, args.seconds, args.max_tokens) for n in args.clients]
            row["ttft"] = ttft(server.url, args.ttft_samples)  # (the first two above: compile and graph capture)
        except Exception as exc:  # a failed level is recorded, and the server still shut down
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            row["shutdown"] = server.stop()
            server.close()
        print(row, flush=True)
        rows.append(row)
        save()


if __name__ == "__main__":
    main()
