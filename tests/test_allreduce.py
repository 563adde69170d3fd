"""The all-reduce choice of the tensor-parallel decoder on CPUs (2 gloo processes): "symm" and "auto" fall back to
the group's own all-reduce and say why, sums stay right, and a ``TPLeader`` fed host tensors drives a follower to
one process's greedy tokens with the vocabulary-split embedding."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmkit.allreduce import AllReduce
from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR
from glmkit.tp_decode import TPDecoder, TPLeader, follow

PROMPT = torch.tensor([[5, 17, 33, 100, 7, 9, 200, 3]])
STEPS = 8


def _rank(rank: int, folder: str) -> None:
    """One of the 2 processes: the all-reduce modes, then a leader (rank 0) and a follower (rank 1)."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        out = {}
        for mode in ("symm", "auto", "nccl"):
            ar = AllReduce(dist.group.WORLD, torch.device("cpu"), torch.float32, mode=mode)
            out[mode] = (ar.mode, ar.reason, ar(torch.full((3, 4), float(rank + 1))).tolist())
        model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
        dec = TPDecoder(model, max_len=48, batch_size=2, group=dist.group.WORLD, allreduce="symm")
        out["embed_rows"] = dec.embed.shape[0]
        commands = dist.new_group(backend="gloo")
        if rank == 0:
            leader = TPLeader(dec, commands)
            logits = leader.prefill(PROMPT, slot=1)
            tokens = []
            for i in range(STEPS):
                tokens.append(int(logits[-1].argmax()))
                # host tensors, as the runner passes them: row 0 idles at position 0, row 1 decodes
                logits = leader.decode_step(torch.tensor([0, tokens[-1]]), torch.tensor([0, PROMPT.shape[1] + i]))
            leader.close()
            out["tokens"] = tokens
        else:
            out["calls"] = follow(dec, commands)
        torch.save(out, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank, args=(str(folder),), nprocs=2)
    return [torch.load(folder / f"{r}.pt") for r in (0, 1)]


def test_symm_and_auto_fall_back_to_the_groups_all_reduce_on_cpus(ranks):
    for out in ranks:
        for mode in ("symm", "auto"):
            chosen, reason, total = out[mode]
            assert chosen == "nccl" and "CPU" in reason
            assert total == [[3.0] * 4] * 3  # 1 + 2 on every rank
        assert out["nccl"] == ("nccl", None, [[3.0] * 4] * 3)


def test_leader_fed_host_tensors_gives_one_process_tokens_with_a_split_embedding(ranks):
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    want = FastDecoder(model, max_len=48).generate(PROMPT, STEPS, ignore_eos=True)[0, PROMPT.shape[1]:].tolist()
    assert ranks[0]["tokens"] == want
    assert ranks[1]["calls"] == 1 + STEPS  # the prefill and every decode step
    assert ranks[0]["embed_rows"] == ranks[1]["embed_rows"] == model.config.vocab_size // 2

