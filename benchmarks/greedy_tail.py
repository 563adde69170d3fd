"""Greedy decoding with the next token picked inside the step (``glmkit.greedy``, ``FastDecoder.decode_greedy``)
against the loop before it (the step's graph, then PyTorch's argmax and the control row's writes outside it): GLM-4-9B
(random weights) in nf4 and bf16 on one GPU, one run.

Variants (taking turns, three rounds): per precision, ``argmax after the step`` (the decoder's graphs captured without
the greedy pick, and the token loop as ``decode_tokens`` was: argmax, then ``decode_step``) and ``greedy in the step``
(the default decoder's ``stream``). Each loop is timed twice: ``ignore_eos`` (the speed benchmarks' loop) and with an
end-token check every token (as ``generate()`` does; an id no token has, so that all 256 tokens run), which waits for
each token: the old loop before it queued the next step, the new one after. Per variant: decode tok/s (best round),
nf4 against bf16 with the same loop, and the 32 greedy tokens against the other loop's.

    PYTHONPATH=.:benchmarks python benchmarks/greedy_tail.py --checkpoint /tmp/glm9b    # about 3 minutes on an H200
Writes benchmarks/results/greedy_tail.json (or --name; and to $OUT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from nf4_fused import NEW, PROMPT, ROUNDS, start

from glmkit import fast_decode
from glmkit.bench import save_result
from glmkit.fast_decode import FastDecoder, stream_rate
from glmkit.generation import pick_token

LOOPS = ("argmax after the step", "greedy in the step")
NEVER = 10**9  # an end-token id no token has: the check runs every token, the loop all NEW tokens


def argmax_after_the_step(decoder: FastDecoder, ids: torch.Tensor, new: int, eos: torch.Tensor | None
                          ) -> Iterator[torch.Tensor]:
    """The greedy token loop as ``decode_tokens`` was: argmax of the step's logits, the end-token check (waits for
    the token), then the next ``decode_step``."""
    n, logits = ids.shape[1], decoder.prefill(ids)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=decoder.device)
    for i in range(new):
        token = pick_token(logits)
        yield token
        if eos is not None:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                return
        if i + 1 < new:
            logits = decoder.decode_step(token, n + i)


def tokens(loop: str, decoder: FastDecoder, ids: torch.Tensor, new: int, check_eos: bool) -> Iterator[torch.Tensor]:
    """The token iterator of ``loop``: ``decoder.stream``'s, or the loop before it."""
    if loop == "greedy in the step":
        return decoder.stream(ids, new, eos_token_ids=[NEVER], ignore_eos=not check_eos)
    return argmax_after_the_step(decoder, ids, new, torch.tensor([NEVER], device="cuda") if check_eos else None)


def tok_s(loop: str, decoder: FastDecoder, ids: torch.Tensor, check_eos: bool) -> float:
    """Decode tok/s of ``loop``: its NEW - 1 steps after the first token over their time, a NEW-token run's time less
    a one-token run's (``stream_rate``, as ``decode_speed``: the new loop queues each step before it yields the token
    before, so the first token's wait would hold a step)."""
    return stream_rate(lambda new: tokens(loop, decoder, ids, new, check_eos), NEW, torch.cuda.synchronize)[1]


def build(model: torch.nn.Module, loop: str) -> FastDecoder:
    """A decoder for PROMPT + NEW tokens, its graphs captured by a warm-up of ``loop`` (for the loop before: with
    no greedy pick in the step)."""
    decoder = FastDecoder(model, max_len=PROMPT + NEW + 8)
    no_pick = mock.patch.object(fast_decode, "greedy_next", lambda *a, **k: None)
    with no_pick if loop == LOOPS[0] else contextlib.nullcontext():
        ids = torch.randint(0, 1000, (1, PROMPT), device="cuda")
        for _ in tokens(loop, decoder, ids, 4, False):
            pass
    return decoder


def main() -> None:
    args, models, bw, rooflines = start(__doc__.splitlines()[0], "greedy_tail")
    decoders = {(p, loop): build(models[p], loop) for p in ("nf4", "bf16") for loop in LOOPS}
    rows: dict[tuple[str, str], dict[str, Any]] = {
        key: {"precision": key[0], "loop": key[1], "decode_tok_s": [], "decode_tok_s_eos_check": []}
        for key in decoders}
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for _ in range(ROUNDS):
        for key, decoder in decoders.items():
            row, loop = rows[key], key[1]
            for check, field in ((False, "decode_tok_s"), (True, "decode_tok_s_eos_check")):
                row[field].append(tok_s(loop, decoder, ids, check))
    for row in rows.values():
        row["best_tok_s"] = max(row["decode_tok_s"])
        row["best_tok_s_eos_check"] = max(row["decode_tok_s_eos_check"])
    argmax_tokens = {p: [int(t) for t in tokens(LOOPS[0], decoders[(p, LOOPS[0])], ids, 32, False)]
                     for p in ("nf4", "bf16")}  # each loop's 32 greedy tokens against these
    for (p, loop), row in rows.items():
        row["fraction_of_roofline"] = row["best_tok_s"] / rooflines[p]
        before = rows[(p, LOOPS[0])]
        row["over_argmax_after"] = row["best_tok_s"] / before["best_tok_s"]
        row["over_argmax_after_eos_check"] = row["best_tok_s_eos_check"] / before["best_tok_s_eos_check"]
        bf16 = rows[("bf16", loop)]
        row["over_bf16_same_loop"] = row["best_tok_s"] / bf16["best_tok_s"]
        got, want = [int(t) for t in tokens(loop, decoders[(p, loop)], ids, 32, False)], argmax_tokens[p]
        row["tokens_as_argmax_after"], row["of"] = sum(a == b for a, b in zip(got, want)), len(want)
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items() if not isinstance(x, list)},
              flush=True)
    save_result(args.name, {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "rounds": ROUNDS,
                            "prompt": PROMPT, "new_tokens": NEW, "roofline_tok_s": rooflines,
                            "rows": list(rows.values())})


if __name__ == "__main__":
    main()
