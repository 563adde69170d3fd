"""The tensor-parallel fast decoder: 2 gloo processes through ``glmkit generate --tp 2 --fast-decode`` give one
process's tokens, and seeded sampling picks the same tokens on both ranks and in one process; a server's leader
drives followers."""

import pytest
import torch

from glmkit.fast_decode import FastDecoder
from glmkit.generation import chat_ids, eos_token_ids
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.parallel import run_generate
from glmkit.tp_decode import TPDecoder, embed_part, tp_shard

FAST = ["--fast-decode"]
PROMPT = "How many layers does GLM-4-9B-Chat have?"  # glmkit generate's default prompt


@pytest.fixture(scope="module")
def one_process(generate_here) -> dict:
    """``glmkit generate --fast-decode`` in one process (this one): the greedy reference (run once for both tests)."""
    return generate_here(*FAST)


def one_rank_sample(seed: int, temperature: float = 20.0, new_tokens: int = 16) -> list[int]:
    """What ``glmkit generate --tp 2 --fast-decode --temperature T --seed S`` does on each rank, with one rank that
    holds every weight (``TPDecoder`` without a group), in this process: its reply's tokens."""
    model = load_model(TRAINED_TINY_DIR, dtype="float32", device_map="cpu")
    ids = chat_ids(load_tokenizer(TRAINED_TINY_DIR), [{"role": "user", "content": PROMPT}])
    eos = list(eos_token_ids(model))
    out = TPDecoder(model, len(ids) + new_tokens).generate(torch.tensor([ids]), new_tokens, eos=eos, seed=seed,
                                                             temperature=temperature)
    new = out[0, len(ids):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in eos), len(new))]


def test_two_process_tp_fast_decode_matches_one_process(one_process):
    two = run_generate(TRAINED_TINY_DIR, tp=2, extra=FAST)
    assert one_process["processes"] == 1 and two["processes"] == 2 and two["ranks_agree"]
    assert two["tokens"] == one_process["tokens"] and "40" in two["text"]


def test_two_process_seeded_sampling_agrees_on_both_ranks_and_with_one_process(one_process):
    greedy = one_process
    sampled = run_generate(TRAINED_TINY_DIR, tp=2, extra=FAST + ["--temperature", "20", "--seed", "3"])
    assert sampled["ranks_agree"] and sampled["tokens"] != greedy["tokens"]  # the same draws on both ranks; sampled
    # The seed, not the process, decides the draws: the same seed again in one process picks the same tokens, another
    # seed others (at temperature 20 the tiny model's choices are nearly uniform: two seeds agreeing is no chance).
    assert one_rank_sample(3) == one_rank_sample(3) == sampled["tokens"] != one_rank_sample(4)


def test_shards_partition_every_weight():
    model = load_model(device_map="cpu", dtype=torch.float32)
    halves = [tp_shard(model, r, 2) for r in (0, 1)]
    layer = model.model.layers[0]
    down = torch.cat([h["layers"][0][5] for h in halves], dim=1)  # down_proj columns
    assert torch.equal(down, layer.mlp.down_proj.weight)
    o = torch.cat([h["layers"][0][2] for h in halves], dim=1)  # o_proj columns (the rank's heads)
    assert torch.equal(o, layer.self_attn.o_proj.weight)
    assert torch.equal(torch.cat([h["lm_head"] for h in halves]), model.lm_head.weight)


def test_the_embedding_halves_sum_to_the_whole_lookup():
    model = load_model(device_map="cpu", dtype=torch.float32)
    table = model.get_input_embeddings().weight
    halves = [tp_shard(model, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["embed"] for h in halves]), table)
    ids = torch.tensor([[0, 1, table.shape[0] // 2 - 1, table.shape[0] // 2, table.shape[0] - 1]])
    parts = [embed_part(ids, h["embed"], h["embed_start"]) for h in halves]
    assert torch.equal(parts[0] + parts[1], torch.nn.functional.embedding(ids, table))
    assert not parts[0][0, 3:].any() and not parts[1][0, :3].any()  # each rank: zeros for the other's ids


def test_one_rank_buckets_and_continued_prefill_match_fast_decoder():
    model = load_model(device_map="cpu", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 100, 7, 9, 200, 3]])
    want = FastDecoder(model, max_len=48).generate(ids, 10, ignore_eos=True)[0, 8:].tolist()
    dec = TPDecoder(model, max_len=48, batch_size=4)
    assert dec.buckets == [1, 2, 4]
    dec.prefill(ids[:, :5], slot=2)
    logits = dec.prefill(ids[:, 5:], slot=2, start=5)
    got = []
    for i in range(10):
        token = int(logits[-1].argmax())
        got.append(token)
        logits = dec.decode_step(torch.tensor([0, 0, token]), torch.tensor([0, 0, 8 + i]))  # 3 rows: bucket 4
    assert got == want


def test_uneven_split_is_refused_with_the_degree_to_use():
    model = load_model(device_map="cpu", dtype=torch.float32)
    try:
        tp_shard(model, 0, 4)
    except ValueError as exc:
        assert "4 ranks cannot split" in str(exc) and "--tp 1 or 2" in str(exc)
    else:
        raise AssertionError("a 4-way split of 2 KV heads was accepted")


def test_a_released_decoder_resizes_into_one_that_shares_its_weights_and_takes_another_all_reduce():
    from glmkit.allreduce import AllReduce

    model = load_model(device_map="cpu", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 100]])
    want = FastDecoder(model, max_len=32).generate(ids, 6, ignore_eos=True)
    dec = TPDecoder(model, max_len=32)
    dec.release()
    assert dec.k_cache is None and not dec.ready
    ar = AllReduce(None, torch.device("cpu"), torch.float32, mode="nccl")
    new = dec.resized(2, allreduce=ar)
    assert new.allreduce is ar and new.lm_head is dec.lm_head and new.k_cache.shape[1] == 2
    assert torch.equal(new.generate(ids.expand(2, -1), 6, ignore_eos=True), want.expand(2, -1))
