"""The tensor-parallel fast decoder: seeded sampling through ``glmkit generate --tp 2 --fast-decode`` (2 gloo
processes under torchrun) picks the same tokens on both ranks and in one process; in 2 gloo processes of this test
(forked), the all-reduce choice on CPUs ("symm" and "auto" fall back to the group's own all-reduce and say why, sums
stay right) and a ``TPLeader`` fed host tensors that drives a follower to one process's greedy tokens with the
vocabulary-split embedding; and a kernel that fails on one rank alone, from which both ranks fall back alike.
(Greedy ``--tp 2 --fast-decode`` against one process through the CLI: notebook 08, whose checked cell runs it;
through the server: tests/test_tp_serve.py.)"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmkit.allreduce import AllReduce
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import triton_available
from glmkit.generation import chat_ids, eos_token_ids
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.parallel import run_generate
from glmkit.tp_decode import TPDecoder, TPLeader, embed_part, follow, tp_shard

FAST = ["--fast-decode"]
SAMPLED = 6  # tokens of the seeded sampling test
PROMPT = "How many layers does GLM-4-9B-Chat have?"  # glmkit generate's default prompt
# the ranks' batch-1 step on glmkit's Triton GEMVs (in Triton's CPU interpreter here), as on a GPU: the fused one
GEMV = "triton" if triton_available() else "auto"


@pytest.fixture(scope="module")
def one_process(generate_here) -> dict:
    """``glmkit generate --fast-decode`` in one process (this one): the greedy tokens sampling must differ from."""
    return generate_here(*FAST)


@pytest.fixture
def triton_ranks(monkeypatch):
    """The torchrun processes' TPDecoders run their batch-1 step on glmkit's Triton GEMVs (``parallel.tp_decoder``)."""
    monkeypatch.setenv("GLMKIT_TP_GEMV", GEMV)


def one_rank_sample(seed: int, temperature: float = 20.0, new_tokens: int = 16) -> list[int]:
    """What ``glmkit generate --tp 2 --fast-decode --temperature T --seed S`` does on each rank, with one rank that
    holds every weight (``TPDecoder`` without a group), in this process: its reply's tokens."""
    model = load_model(TRAINED_TINY_DIR, dtype="float32", device_map="cpu")
    ids = chat_ids(load_tokenizer(TRAINED_TINY_DIR), [{"role": "user", "content": PROMPT}])
    eos = list(eos_token_ids(model))
    out = TPDecoder(model, len(ids) + new_tokens, gemv=GEMV).generate(torch.tensor([ids]), new_tokens, eos=eos, seed=seed,
                                                             temperature=temperature)
    new = out[0, len(ids):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in eos), len(new))]


IDS = torch.tensor([[5, 17, 33, 100, 7, 9, 200, 3]])
STEPS = 8


def _rank(rank: int, folder: str, model: torch.nn.Module) -> None:
    """One of the 2 processes: the all-reduce modes, then a leader (rank 0) and a follower (rank 1), each splitting
    ``model`` (the whole trained tiny GLM-4, loaded before the fork)."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        out = {}
        for mode in ("symm", "push", "auto", "nccl"):
            ar = AllReduce(dist.group.WORLD, torch.device("cpu"), torch.float32, mode=mode)
            out[mode] = (ar.mode, ar.reason, ar(torch.full((3, 4), float(rank + 1))).tolist())
        dec = TPDecoder(model, max_len=48, batch_size=2, group=dist.group.WORLD, allreduce="symm")
        out["embed_rows"] = dec.embed.shape[0]
        commands = dist.new_group(backend="gloo")
        if rank == 0:
            leader = TPLeader(dec, commands)
            logits = leader.prefill(IDS, slot=1)
            tokens = []
            for i in range(STEPS):
                tokens.append(int(logits[-1].argmax()))
                # host tensors, as the runner passes them: row 0 idles at position 0, row 1 decodes
                logits = leader.decode_step(torch.tensor([0, tokens[-1]]), torch.tensor([0, IDS.shape[1] + i]))
            leader.close()
            out["tokens"] = tokens
        else:
            out["calls"] = follow(dec, commands)
        torch.save(out, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def fork_ranks(fn, folder, model: torch.nn.Module) -> list[dict]:
    """What ``fn(rank, folder, model)`` saved in each of 2 gloo processes. They are forked from this one, the model
    already loaded: real processes with their own group, without the ~7 s a spawned interpreter spends importing torch
    and transformers again (they run only CPU tensors and gloo, nothing a fork cannot carry). A rank stuck for 2
    minutes (say, waiting in a collective the other never joins) fails the test."""
    procs = mp.start_processes(fn, args=(str(folder), model), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):  # (raises with the rank's traceback if one failed)
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            pytest.fail("the 2 forked gloo ranks did not finish in 2 minutes")
    return [torch.load(folder / f"{r}.pt") for r in (0, 1)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo processes saw in ``_rank``."""
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    return fork_ranks(_rank, tmp_path_factory.mktemp("tp"), model)


PUSH_CALLS = [(1, 64), (2, 4096), (3, 4095), (1, 4096), (1, 64)]  # both sets of slots, 1-3 programs, partial blocks


def _push_rank(rank: int, data: list, flags: list, calls: list, inputs: list, outputs: list) -> None:
    """One of two processes: glmkit's push all-reduce kernel, back to back, on memory both processes share."""
    from glmkit.allreduce import PUSH_BLOCK, _push_allreduce_kernel

    cap = data[0].numel() // 4
    x = inputs[rank]
    for i, (rows, cols) in enumerate(PUSH_CALLS):
        t = x[: rows * cols].view(rows, cols) * (i + 1)
        out = torch.empty_like(t)
        _push_allreduce_kernel[((t.numel() + PUSH_BLOCK - 1) // PUSH_BLOCK,)](
            t, out, data[rank], data[1 - rank], flags[rank], flags[1 - rank], calls[rank], t.numel(), cap,
            RANK=rank, BLOCK=PUSH_BLOCK, PDL=0, ON_GPU=False)
        outputs[rank][i, : t.numel()] = out.flatten()


@pytest.mark.skipif(not triton_available(), reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_the_push_kernel_sums_two_processes_partials_call_after_call():
    """glmkit's push all-reduce (``AllReduce(mode="push")``, two GPUs on a GPU machine) run by two real processes
    through Triton's interpreter on shared memory, with no synchronisation between calls but the kernel's own flags:
    each call's sum is exact on both ranks, whichever rank runs ahead."""
    from glmkit.allreduce import PUSH_BLOCK

    cap = 4 * PUSH_BLOCK
    data = [torch.zeros(4 * cap).share_memory_() for _ in range(2)]
    flags = [torch.zeros(4, dtype=torch.int32).share_memory_() for _ in range(2)]
    calls = [torch.zeros(4, dtype=torch.int32).share_memory_() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3 * PUSH_BLOCK, generator=g).share_memory_() for _ in range(2)]
    outputs = [torch.full((len(PUSH_CALLS), 3 * PUSH_BLOCK), float("nan")).share_memory_() for _ in range(2)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_push_rank, args=(r, data, flags, calls, inputs, outputs)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0], "a rank failed or waited for its peer for 2 minutes"
    for i, (rows, cols) in enumerate(PUSH_CALLS):
        n = rows * cols
        want = (inputs[0][:n] * (i + 1)) + (inputs[1][:n] * (i + 1))
        assert torch.equal(outputs[0][i, :n], want) and torch.equal(outputs[1][i, :n], want), i
    assert calls[0].tolist() == calls[1].tolist() == flags[0].tolist() == [5, 2, 1, 0]  # calls per program


def test_symm_push_and_auto_fall_back_to_the_groups_all_reduce_on_cpus(ranks):
    for out in ranks:
        for mode in ("symm", "push", "auto"):
            chosen, reason, total = out[mode]
            assert chosen == "nccl" and "CPU" in reason
            assert total == [[3.0] * 4] * 3  # 1 + 2 on every rank
        assert out["nccl"] == ("nccl", None, [[3.0] * 4] * 3)


def test_leader_fed_host_tensors_gives_one_process_tokens_with_a_split_embedding(ranks):
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    want = FastDecoder(model, max_len=48).generate(IDS, STEPS, ignore_eos=True)[0, IDS.shape[1]:].tolist()
    assert ranks[0]["tokens"] == want
    assert ranks[1]["calls"] == 1 + STEPS  # the prefill and every decode step
    assert ranks[0]["embed_rows"] == ranks[1]["embed_rows"] == model.config.vocab_size // 2


def test_two_process_seeded_sampling_agrees_on_both_ranks_and_with_one_process(one_process, triton_ranks):
    greedy = one_process["tokens"][:SAMPLED]  # (the ranks' Triton interpreter is slow: a few tokens tell enough)
    sampled = run_generate(TRAINED_TINY_DIR, tp=2, max_new_tokens=SAMPLED,
                           extra=FAST + ["--temperature", "20", "--seed", "3"])
    assert sampled["ranks_agree"] and sampled["tokens"] != greedy  # the same draws on both ranks; sampled
    # The seed, not the process, decides the draws: the same seed in one process picks the 2 processes' tokens, another
    # seed others (at temperature 20 the tiny model's choices are nearly uniform: two seeds agreeing is no chance).
    assert one_rank_sample(3, new_tokens=SAMPLED) == sampled["tokens"] != one_rank_sample(4, new_tokens=SAMPLED)


def _rank_whose_gemvs_fail(rank: int, folder: str, model: torch.nn.Module) -> None:
    """A TPDecoder that chose glmkit's attention and GEMVs itself (as on a GPU), whose GEMVs fail on rank 1 alone:
    what each rank decoded, warned and kept."""
    import warnings

    import glmkit.fast_decode
    import glmkit.tp_decode

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:  # (a forked child: its patches die with it)
        glmkit.tp_decode.auto_attention = lambda device, dtype: "triton"
        glmkit.tp_decode.auto_gemv = lambda device, batch_size: "triton"
        if rank == 1:
            glmkit.fast_decode.triton_gemv = broken
        dec = TPDecoder(model, max_len=16, group=dist.group.WORLD, compile=False, cuda_graph=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = dec.generate(IDS[:, :5], FALLBACK_TOKENS, ignore_eos=True)[0, 5:].tolist()
        torch.save({"tokens": tokens, "attention": dec.attention, "gemv": dec.gemv,
                    "warnings": [str(w.message) for w in caught if "failed" in str(w.message)]}, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


FALLBACK_TOKENS = 3


@pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")
def test_a_kernel_failing_on_one_rank_falls_back_on_both_and_the_warning_names_it(tmp_path):
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    want = FastDecoder(model, max_len=16).generate(IDS[:, :5], FALLBACK_TOKENS, ignore_eos=True)[0, 5:].tolist()
    failed, other = fork_ranks(_rank_whose_gemvs_fail, tmp_path, model)[::-1]
    # the GEMVs, not the attention tried first, gave way, on both ranks: neither waits for the other forever
    for out in (failed, other):
        assert (out["attention"], out["gemv"], out["tokens"]) == ("triton", False, want)
    instead = "; TPDecoder uses cuBLAS (gemv=False) instead."
    assert failed["warnings"] == ["glmkit's Triton GEMV kernels failed here (RuntimeError: no kernel image is "
                                  "available for execution on the device)" + instead]
    assert other["warnings"] == ["glmkit's Triton GEMV kernels failed in another process" + instead]


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


@pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")
def test_a_ranks_batch_1_step_folds_every_add_and_norm_into_its_gemvs(monkeypatch):
    """Rank 0's shard of a TP=2 trained tiny GLM-4 (no collectives) on the Triton batch-1 step: each projection is
    one GEMV launch, the adds of the all-reduced partial sums and the norms ride in the GEMV after them, and no add or
    norm runs apart; one rank holding every weight (world 1) then decodes generate()'s greedy tokens."""
    import glmkit.fast_decode
    import glmkit.tp_decode
    from glmkit.gemv import add_norm_gemv
    from glmkit.gemv import gemv as triton_gemv

    trained = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    launches = []

    def counting(x, weight, bias=None, **fused):
        launches.append(sorted(k for k, v in fused.items() if v is not None and k != "eps"))
        return triton_gemv(x, weight, bias, **fused)

    def counting_add_norm(x, add, weight, norm_weight, bias=None, eps=1e-5, swiglu=False):
        launches.append(["add", "norm_weight", *(["swiglu"] if swiglu else [])])
        return add_norm_gemv(x, add, weight, norm_weight, bias, eps=eps, swiglu=swiglu)

    def refused(*args, **kwargs):
        raise AssertionError("a decode step ran a norm or an activation of its own")

    class Ops(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            ops.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    ids = torch.tensor([[5, 17, 33, 100, 7, 9, 200, 3]])
    shard = TPDecoder(trained, max_len=32, rank=0, world=2, gemv="triton", attention="triton", compile=False,
                      cuda_graph=False)
    shard.prefill(ids)  # a warm-up step, then the prompt (cuBLAS, norms apart)
    for name, fn in (("triton_gemv", counting), ("gemv_swiglu", refused), ("rms_norm", refused)):
        monkeypatch.setattr(glmkit.fast_decode, name, fn)
    monkeypatch.setattr(glmkit.tp_decode, "add_norm_gemv", counting_add_norm)
    monkeypatch.setattr(glmkit.tp_decode, "rms_norm", refused)
    launches.clear()
    ops: list[str] = []
    with Ops():
        shard.decode_step(torch.tensor([3]), 8)
    monkeypatch.undo()
    layers = trained.config.num_hidden_layers
    # per layer: qkv (add + norm; the first layer: norm), o_proj, gate_up (add + norm, SwiGLU), down; lm_head (add +
    # the final norm)
    per_layer = [["add", "norm_weight"], [], ["add", "norm_weight", "swiglu"], []]
    assert launches == [["norm_weight"], *per_layer[1:]] + per_layer * (layers - 1) + [["add", "norm_weight"]]
    assert not {"add", "__add__", "__iadd__", "mul", "rsqrt", "pow", "mean", "silu"} & set(ops), sorted(set(ops))
    want = trained.generate(ids, max_new_tokens=10, do_sample=False)
    whole = TPDecoder(trained, max_len=32, gemv="triton", compile=False, cuda_graph=False)
    assert whole.fuses_norms("triton") and torch.equal(whole.generate(ids, 10), want)
