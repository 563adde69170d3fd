"""Is the host on a decode token's critical path? For FastDecoder's defaults (bf16, nf4): wall time per token of
the token loop (``stream``), of bare ``decode_step`` calls, and of bare graph replays, each beside the host's own
time for the same loop (no synchronisation inside it). Where the host's time per token reaches the wall time, the
GPU waits for the host."""

from __future__ import annotations

import argparse
import time

import torch

from glmkit.bench import save_result
from glmkit.models import ensure_random_checkpoint

N = 200


def timed(fn, n: int = N) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"host_us_per_call": host / n * 1e6, "wall_us_per_call": wall / n * 1e6}


def probe(dec) -> dict:
    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    for _ in dec.stream(ids, 4, ignore_eos=True):
        pass
    out = {}
    it = dec.stream(ids, N + 2, ignore_eos=True)
    next(it)
    out["stream"] = timed(lambda i: next(it))
    token = torch.tensor([5], device="cuda")
    out["decode_step"] = timed(lambda i: dec.decode_step(token, 40 + (i % 50)))
    st = dec.stages[0]
    out["graph_replay"] = timed(lambda i: st.graphs[1, dec.max_len].replay())
    logits = dec.logits[:1]
    out["argmax"] = timed(lambda i: logits.argmax(-1))
    out["control_writes"] = timed(lambda i: (st.control[0, :1].copy_(token), st.control[1].fill_(40),
                                             st.control[2].fill_(1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    args = ap.parse_args()
    from glmkit.fast_decode import FastDecoder
    from glmkit.quantization import load_precision

    ensure_random_checkpoint(args.checkpoint)
    out = {"rows": {}}
    for precision in ("bf16", "nf4"):
        model = load_precision(args.checkpoint, precision, device_map="cuda:0")
        dec = FastDecoder(model, max_len=512)
        out["rows"][precision] = probe(dec)
        print(precision, out["rows"][precision], flush=True)
        save_result("host_probe", out)
        del dec, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
