import pytest
import torch
from helpers import greedy_rows

from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path, dtype=torch.float32, device_map="cpu")


def test_greedy_tokens_equal_generate_batch_2(model):
    ids = torch.randint(0, 800, (2, 9), generator=torch.Generator().manual_seed(1))
    fast = FastDecoder(model, max_len=64, batch_size=2).generate(ids, max_new_tokens=20, ignore_eos=True)
    slow = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(fast, slow)


def test_greedy_equal_on_the_trained_model_and_stops_at_eos():
    trained = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    from glmkit.generation import encode_chat
    from glmkit.loading import load_tokenizer

    tok = load_tokenizer(TRAINED_TINY_DIR)
    ids = encode_chat(tok, [{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}])["input_ids"]
    fast = FastDecoder(trained, max_len=128).generate(ids, max_new_tokens=40)
    slow = trained.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(fast, slow)
    assert int(fast[0, -1]) in trained.generation_config.eos_token_id  # stopped at the end token


def test_chunked_prefill_gives_the_same_tokens(model):
    ids = torch.randint(0, 800, (1, 50), generator=torch.Generator().manual_seed(2))
    dec = FastDecoder(model, max_len=80)
    whole = dec.generate(ids, max_new_tokens=8, ignore_eos=True)
    chunked = dec.generate(ids, max_new_tokens=8, ignore_eos=True, prefill_chunk=16)
    assert torch.equal(whole, chunked)


def test_sampling_is_seeded_and_respects_top_p(model):
    ids = torch.tensor([[5, 6, 7]])
    dec = FastDecoder(model, max_len=40)

    def run(seed):
        return dec.generate(ids, 10, temperature=1.0, top_p=0.9, ignore_eos=True,
                            generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    tiny_p = dec.generate(ids, 10, temperature=1.0, top_p=1e-6, ignore_eos=True, generator=torch.Generator().manual_seed(3))
    greedy = dec.generate(ids, 10, ignore_eos=True)
    assert torch.equal(tiny_p, greedy)  # top-p that keeps one token is greedy


def test_stream_yields_one_token_per_step(model):
    dec = FastDecoder(model, max_len=40)
    steps = list(dec.stream(torch.tensor([[1, 2, 3]]), max_new_tokens=5, ignore_eos=True))
    assert len(steps) == 5 and all(t.shape == (1,) for t in steps)
    speed = dec.tokens_per_second(prompt_len=4, new_tokens=8)
    assert speed["decode_tok_s"] > 0 and speed["ttft_s"] > 0


def test_bad_input_is_explained(model, tiny_path):
    dec = FastDecoder(model, max_len=16)
    with pytest.raises(ValueError, match="exceed max_len=16"):
        dec.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="built for batch size 1"):
        dec.generate(torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention must be 'auto', 'triton', 'sdpa' or 'reduction'"):
        FastDecoder(model, attention="flash")
    with pytest.raises(ValueError, match="pdl=True needs .*compute capability 9.0.*leave pdl unset"):
        FastDecoder(model, pdl=True)  # programmatic dependent launch: Hopper GPUs only
    quantized = load_model(tiny_path, device_map="cpu", quantization="int8", dtype=torch.float16)
    with pytest.raises(ValueError, match="int8.*quantization='nf4'"):  # nf4/fp4 run: tests/test_fast_decode_quantized.py
        FastDecoder(quantized)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, vocab_size=128))
    with pytest.raises(TypeError, match="GLM"):
        FastDecoder(llama)


def test_the_fused_triton_step_runs_its_layers_uncompiled_unless_compile_is_asked_for(model):
    """The batch-1 Triton step's layer is glmkit's kernels alone: left uncompiled by default (so that programmatic
    dependent launch can reach them), compiled when compile=True is asked for; other steps keep the compiled one."""
    from glmkit.fast_decode import decoder_layer

    auto = FastDecoder(model, max_len=8, gemv="triton", attention="triton", compile=None)
    auto.compiled, auto.layer_fn = True, torch.compile(decoder_layer)  # as on a GPU (compiles only when called)
    assert auto.fuses_norms(1) and auto.layer_fn_for(1) is decoder_layer
    assert not auto.uses_pdl(1)  # a CPU: no programmatic dependent launch
    asked = FastDecoder(model, max_len=8, gemv="triton", attention="triton", compile=True)
    assert asked.layer_fn_for(1) is asked.layer_fn is not decoder_layer
    for other in ({"fuse_norms": False}, {"attention": "sdpa"}):  # norm or rope kernels: the compiled layer
        apart = FastDecoder(model, max_len=8, gemv="triton", compile=None, **{"attention": "triton", **other})
        apart.layer_fn = auto.layer_fn
        assert apart.layer_fn_for(1) is apart.layer_fn


def test_compiled_decoders_of_more_shapes_than_torchs_limit_in_one_process(model):
    # torch allows 8 compiled shapes of one function by default (fullgraph turns the 9th into an error); a tuning session
    # builds more decoders than that. With the limit at 1 here, a second shape goes past it: the first decoder is the
    # default (inductor), the second uses dynamo's eager backend, which counts against the same limit without inductor's
    # second compile (seconds on a CPU). (torch's own patch: pytest's monkeypatch would delete the setting on undo.)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        for extra, options in enumerate([None, {"backend": "eager"}]):
            decoder = FastDecoder(model, max_len=8 + extra, compile=True, compile_options=options)
            assert torch.equal(decoder.generate(ids, max_new_tokens=2, ignore_eos=True), expected)


@pytest.mark.parametrize("compile", [False, True])
def test_reduction_attention_gives_the_same_tokens(model, compile):
    ids = torch.randint(0, 800, (2, 9), generator=torch.Generator().manual_seed(3))
    fast = FastDecoder(model, max_len=40, batch_size=2, attention="reduction", compile=compile)
    slow = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=16, ignore_eos=True), slow)


def test_prompts_of_different_lengths_in_slots_decode_like_generate(model):
    prompts = [torch.randint(0, 800, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    dec = FastDecoder(model, max_len=32, batch_size=2)
    logits = torch.cat([dec.prefill(p, slot=i) for i, p in enumerate(prompts)])
    got = greedy_rows(dec, logits, torch.tensor([5, 11]), 8)
    for p, row in zip(prompts, got):
        want = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert row == want[0, p.shape[1]:].tolist()
    with pytest.raises(ValueError, match="slot"):
        dec.prefill(prompts[0], slot=2)


# --- a layer split: each segment of the device map runs its share of the step -------------------------------------


def two_segment_map(model, counts=(3, 3)):
    """A map with two entries for one device: 'cpu' and torch.device('cpu') are two entries, so the decoder runs
    two segments with a hand-over between them, as it would on two GPUs (on a GPU: 0 and 'cuda:0')."""
    from glmkit.device_map import split_layers

    return split_layers(model, list(counts), devices=["cpu", torch.device("cpu")])


@pytest.fixture(scope="module")
def split():
    from accelerate import dispatch_model

    trained = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    return dispatch_model(trained, two_segment_map(trained), main_device="cpu")  # accelerate's hooks, as a real split


def chat_ids(text):
    from glmkit.generation import encode_chat
    from glmkit.loading import load_tokenizer

    return encode_chat(load_tokenizer(TRAINED_TINY_DIR), [{"role": "user", "content": text}])["input_ids"]


def reference(model, ids, n):
    """generate()'s new tokens for one prompt (up to and including its end token, if it says one)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_split_runs_as_two_segments_with_generates_tokens(split):
    dec = FastDecoder(split, max_len=128)
    assert [(len(s.layers), s.embed, s.head) for s in dec.segments] == [(3, True, False), (3, False, True)]
    assert [s.layers for s in dec.segments] == [range(0, 3), range(3, 6)]
    ids = chat_ids("How many layers does GLM-4-9B-Chat have?")
    fast = dec.generate(ids, max_new_tokens=40)
    assert torch.equal(fast, split.generate(ids, max_new_tokens=40, do_sample=False))
    assert int(fast[0, -1]) in split.generation_config.eos_token_id  # a real answer that stopped at the end token
    chunked = dec.generate(ids, max_new_tokens=40, prefill_chunk=7)
    assert torch.equal(chunked, fast)


def test_embeddings_and_lm_head_on_their_own_entries_are_segments_too():
    from accelerate import dispatch_model

    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    device_map = {name: torch.device("cpu") for name in two_segment_map(model)}
    device_map["model.embed_tokens"] = device_map["lm_head"] = "cpu"  # e.g. accelerate's "auto" on uneven cards
    model = dispatch_model(model, device_map, main_device="cpu")
    dec = FastDecoder(model, max_len=64, batch_size=2)
    assert [(len(s.layers), s.embed, s.head) for s in dec.segments] == [(0, True, False), (6, False, False),
                                                                        (0, False, True)]
    assert "layers 0..5" in repr(dec) and "lm_head" in dec.rows()[2][2]
    ids = torch.randint(0, 800, (2, 9), generator=torch.Generator().manual_seed(6))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False)
    assert torch.equal(dec.generate(ids, max_new_tokens=10, ignore_eos=True), want)


def test_split_batched_prompts_of_different_lengths_with_chunked_prefill(split):
    prompts = [chat_ids("How many layers does GLM-4-9B-Chat have?"), chat_ids("How do I split the model?"),
               torch.randint(0, 800, (1, 5), generator=torch.Generator().manual_seed(5))]
    dec = FastDecoder(split, max_len=96, batch_size=3)
    assert dec.buckets == [1, 2, 3]
    logits = torch.cat([dec.prefill(p, chunk=6, slot=i) for i, p in enumerate(prompts)])
    got = greedy_rows(dec, logits, torch.tensor([p.shape[1] for p in prompts]), 12)
    for p, row in zip(prompts, got):
        want = reference(split, p, 12)
        assert row[:len(want)] == want


def test_a_step_for_fewer_rows_uses_a_smaller_bucket_and_leaves_the_other_rows_alone(split):
    a, b = chat_ids("How many layers does GLM-4-9B-Chat have?"), chat_ids("How do I split the model?")
    dec = FastDecoder(split, max_len=96, batch_size=4)
    assert dec.buckets == [1, 2, 4] and dec.bucket(3) == 4 and dec.bucket(1) == 1
    logits = torch.cat([dec.prefill(a, slot=0), dec.prefill(a, slot=1), dec.prefill(a, slot=2)])
    dec.prefill(b[:, :9], slot=3)  # row 3: a prompt half-way through its prefill while rows 0..2 decode
    rows = [k[3].clone() for k in dec.k_layers]
    got = []
    for i in range(10):  # 3 live rows: the 4-row step with a dummy row 3
        tokens = logits.argmax(-1)
        got.append(tokens.tolist())
        logits = dec.decode_step(tokens, a.shape[1] + i)
        assert logits.shape == (3, split.config.vocab_size)
    want = reference(split, a, 10)
    assert [step[0] for step in got[:len(want)]] == want and all(len(set(step)) == 1 for step in got)
    assert all(torch.equal(k[3], r) for k, r in zip(dec.k_layers, rows))  # the dummy row wrote nothing
    last = dec.prefill(b[:, 9:], slot=3, start=9)  # the rest of row 3's prompt continues where it stopped
    assert torch.allclose(last, FastDecoder(split, max_len=96).prefill(b), atol=1e-5)


def test_prefill_continuation_equals_a_one_shot_prefill(split):
    ids = chat_ids("How many layers does GLM-4-9B-Chat have?")
    n = ids.shape[1]
    whole, pieces = FastDecoder(split, max_len=96), FastDecoder(split, max_len=96)
    want = whole.prefill(ids)
    for start in range(0, n, 5):  # one piece per engine step
        got = pieces.prefill(ids[:, start:start + 5], start=start)
    assert torch.allclose(got, want, atol=1e-5)
    tokens = []
    for i in range(12):
        token = got.argmax(-1)
        tokens.append(int(token))
        got = pieces.decode_step(token, n + i)
    want = reference(split, ids, 12)
    assert tokens[:len(want)] == want


def test_split_and_bucket_errors_are_explained(split):
    from glmkit.device_map import DeviceMapError

    dec = FastDecoder(split, max_len=16, batch_size=2)
    with pytest.raises(ValueError, match="1 to batch_size=2 rows, got 3"):
        dec.decode_step(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="1 tokens and 2 positions"):
        dec.decode_step(torch.tensor([1]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="reaches position 17"):
        dec.prefill(torch.ones(1, 5, dtype=torch.long), slot=0, start=12)
    with pytest.raises(ValueError, match="graph_batch_sizes"):
        FastDecoder(split, max_len=16, batch_size=2, graph_batch_sizes=[1, 4])
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    unplaced = two_segment_map(model)
    del unplaced["model.layers.4"]
    model.hf_device_map = unplaced
    with pytest.raises(DeviceMapError, match="not in the device map: model.layers.4"):
        FastDecoder(model)
    model.hf_device_map = {**two_segment_map(model), "model.layers.5": "cuda:7", "model.norm": "cuda:7", "lm_head": "cuda:7"}
    with pytest.raises(ValueError, match="model.layers.5 on cuda:7, but this machine has"):
        FastDecoder.check(model)
    # transformers offloads the modules mapped to the string 'cpu' when other entries are devices: refused, clearly
    offloaded = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map=two_segment_map(model))
    with pytest.raises(ValueError, match="offloaded"):
        FastDecoder(offloaded)


def test_cli_generate_and_bench_take_fast_decode(capsys):
    import json

    from glmkit.cli import main

    ids = ["--prompt-ids", "5", "6", "7", "8", "--max-new-tokens", "6", "--json", "--dtype", "float32"]
    assert main(["generate", *ids]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["generate", *ids, "--fast-decode", "--device-map", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == plain["tokens"]
    assert main(["bench", "--fast-decode", "--new-tokens", "3", "--prompt-len", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["path"] == "fast" and row["decode_tok_s"] > 0
    assert main(["generate", "--fast-decode", "--quantization", "nf4", "--tp", "2"]) == 2  # TP slices 16-bit weights
    assert "instead of --tp" in capsys.readouterr().err


def test_the_engine_takes_a_split_model_for_its_fast_path(split):
    from glmkit.engine import Engine
    from glmkit.loading import load_tokenizer

    Engine(split, load_tokenizer(TRAINED_TINY_DIR), fast_decode=True).close()  # refused it before issue 19


def test_a_hop_through_host_memory_decodes_the_same_tokens(split):
    ids = chat_ids("What crosses between the two cards?")
    peer = FastDecoder(split, max_len=96).generate(ids, max_new_tokens=24)
    host = FastDecoder(split, max_len=96, hop="host")
    assert torch.equal(host.generate(ids, max_new_tokens=24), peer)
    assert host.stages[1].staging is not None and host.stages[0].staging is None  # only the second segment receives
    with pytest.raises(ValueError, match="hop must be one of"):
        FastDecoder(split, max_len=96, hop="pcie")


def test_own_prefill_fills_the_cache_as_the_models_prefill_does(model, monkeypatch):
    """A short prompt goes through the decoder's own layers, a long one through the model (chunked, memory-lean):
    both leave the same K/V in the cache and give the same logits, whole or continued from a position."""
    import glmkit.fast_decode as fd

    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    runs = []
    for limit in (fd.OWN_PREFILL_MAX, 0):  # the decoder's own layers, then the model's forward
        monkeypatch.setattr(fd, "OWN_PREFILL_MAX", limit)
        dec = FastDecoder(model, max_len=64, batch_size=2)
        whole = dec.prefill(ids, slot=1)
        head = dec.prefill(ids[:, :9], slot=0)
        rest = dec.prefill(ids[:, 9:], slot=0, start=9, chunk=5)
        runs.append((whole, head, rest, dec.k_layers[-1][:, :, :23].clone(), dec.v_layers[0][:, :, :23].clone()))
    for own, models in zip(*runs):
        torch.testing.assert_close(own, models, rtol=1e-4, atol=1e-4)
    own = runs[0]
    torch.testing.assert_close(own[1], model(ids[:, :9]).logits[:, -1].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own[2], own[0], rtol=1e-4, atol=1e-4)  # in pieces = whole


def test_stream_rate_takes_the_faster_one_token_stream():
    """The decode rate is the whole stream's steps after its first token over its time less a one-token stream's;
    that one runs twice and the faster counts, so a one-token stream slow once does not raise the rate. A clock that
    each token moves on by 10 ms, a prompt by 30 ms, and the first one-token stream's prompt by 200 ms more."""
    from glmkit.fast_decode import stream_rate

    now, prompts = [0.0], []

    def stream(new: int):
        prompts.append(new)
        now[0] += 0.03 + (0.2 if len(prompts) == 1 else 0.0)
        for _ in range(new):
            now[0] += 0.01
            yield 0

    ttft, rate = stream_rate(stream, 8, lambda: None, clock=lambda: now[0])
    assert prompts == [1, 8, 1]  # the one-token stream before the whole one, and again after it
    assert ttft == pytest.approx(0.04) and rate == pytest.approx(7 / 0.07)
