"""The monitor on a real GPU: does snapshot() agree with nvidia-smi, and what does live polling cost?

Loads GLM-4-9B-Chat (random weights, bf16), compares glmkit.monitor.snapshot() with nvidia-smi at the
same moment, then measures plain generate() decode tok/s (batch 1, 32-token prompt, 128 new tokens)
with no monitor and with the live widget polling every 0.5 s and every 0.1 s, alternating runs.

    python benchmarks/monitor_check.py --checkpoint /tmp/glm9b
Writes benchmarks/results/monitor_check.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import statistics
import time

from glmkit.bench import decode_tokens_per_second, load_random_9b, nvidia_smi_used_bytes, save_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--path", choices=["generate", "fast"], default="generate",
                    help="decode with plain generate() (Python-bound, noisy) or glmkit's fast path (GPU-bound)")
    ap.add_argument("--name", default="monitor_check")
    args = ap.parse_args()
    import torch

    from glmkit.monitor import snapshot
    from glmkit.widgets import MemoryPoller

    model = load_random_9b(args.checkpoint)
    torch.cuda.synchronize()
    agreement = []
    for _ in range(3):
        smi = nvidia_smi_used_bytes(0)
        snap = snapshot().device("cuda:0")
        agreement.append({"nvidia_smi_used": smi, "glmkit_used": snap.used, "glmkit_process": snap.process,
                          "torch_reserved": snap.torch_reserved, "source": snap.source,
                          "relative_difference": abs(snap.used - smi) / smi if smi else None})
    print(agreement, flush=True)

    try:
        from glmkit.widgets import LiveMonitor

        def make(interval: float):
            return LiveMonitor(interval=interval)
        kind = "LiveMonitor (ipywidgets, no front end attached)"
    except ImportError:
        def make(interval: float):
            return MemoryPoller(lambda s: None, interval).start()
        kind = "MemoryPoller"

    measure = decode_tokens_per_second
    if args.path == "fast":
        from glmkit.fast_decode import FastDecoder

        decoder = FastDecoder(model, max_len=32 + args.new_tokens)

        def measure(model, new_tokens):  # same measurement on the fast path
            return decoder.tokens_per_second(32, new_tokens)["decode_tok_s"]

    for _ in range(3):
        measure(model, 32)  # warm-up (the first calls are slow)
    speeds: dict[str, list[float]] = {"none": [], "1.0 s": [], "0.5 s": [], "0.1 s": []}
    polls: dict[str, int] = {}
    busy: dict[str, float] = {}
    seconds: dict[str, float] = {}
    labels = list(speeds)
    for rep in range(args.repeats):
        for label in labels[rep % len(labels):] + labels[: rep % len(labels)]:  # rotate the order: no position bias
            mon = None if label == "none" else make(float(label.split()[0]))
            t0 = time.perf_counter()
            speeds[label].append(measure(model, args.new_tokens))
            if mon is not None:
                poller = getattr(mon, "poller", mon)
                mon.stop()
                polls[label] = polls.get(label, 0) + poller.polls
                busy[label] = busy.get(label, 0.0) + poller.busy_seconds
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0
        print({k: [round(x, 2) for x in v] for k, v in speeds.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    overhead = {k: 1 - med[k] / med["none"] for k in med if k != "none"}
    # paired: each repeat's monitored run against the unmonitored run of the same repeat
    paired = {k: 1 - statistics.median(a / b for a, b in zip(speeds[k], speeds["none"])) for k in speeds if k != "none"}
    duty = {k: busy[k] / seconds[k] for k in busy}  # share of wall time the poll thread was working
    save_result(args.name, {
        "agreement": agreement, "monitor_kind": kind, "decode_tok_s": speeds, "median_tok_s": med,
        "polling_overhead": overhead, "paired_overhead": paired, "polls": polls, "poll_busy_seconds": busy,
        "poll_duty_cycle": duty, "ms_per_poll": {k: 1000 * busy[k] / polls[k] for k in busy if polls[k]},
        "decode_path": args.path,
        "method": f"{args.path}, batch 1, 32-token prompt, {args.new_tokens} new tokens, "
                  f"{args.repeats} repeats in rotating order, median",
    })
    print(med, overhead, paired, duty)


if __name__ == "__main__":
    main()
