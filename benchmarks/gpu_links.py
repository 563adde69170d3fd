"""The link between two GPUs: its type (NVML), measured copy bandwidth and latency each way, and the latency of
the transfer a two-GPU device-map split makes at its boundary for every decode step (one hidden state per
sequence: 8 KiB per token for GLM-4-9B-Chat in bf16). Needs a machine with 2 GPUs (the multi-GPU issue).

    python benchmarks/gpu_links.py
Writes benchmarks/results/gpu_links.json (and to $OUT).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from glmkit.bench import peer_copy_seconds, save_result
from glmkit.env import gpu_links
from glmkit.models import glm4_9b_chat_config

BATCHES = (1, 8, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth-bytes", type=int, default=2**28)
    args = ap.parse_args()
    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"gpu_links.py needs two GPUs; this machine has {torch.cuda.device_count()}.")
    hidden_bytes = glm4_9b_chat_config().hidden_size * 2  # one token's hidden state in bf16
    result = {"links": [asdict(link) for link in gpu_links()], "peer_access": torch.cuda.can_device_access_peer(0, 1),
              "hidden_state_bytes": hidden_bytes, "directions": []}
    for src, dst in ((0, 1), (1, 0)):
        row = {"from": src, "to": dst,
               "bandwidth_bytes_s": args.bandwidth_bytes / peer_copy_seconds(args.bandwidth_bytes, src, dst),
               "hidden_state_seconds": {b: peer_copy_seconds(hidden_bytes * b, src, dst, repeats=200) for b in BATCHES}}
        result["directions"].append(row)
        print(row, flush=True)
    save_result("gpu_links", {"method": f"copies of {args.bandwidth_bytes} bytes for bandwidth and of one hidden state "
                                        f"per sequence (batch {BATCHES}) for latency, each waited for; medians", **result})


if __name__ == "__main__":
    main()
