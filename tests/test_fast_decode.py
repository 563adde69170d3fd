import pytest
import torch

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
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'reduction'"):
        FastDecoder(model, attention="flash")
    quantized = load_model(tiny_path, device_map="cpu", quantization="int8", dtype=torch.float16)
    with pytest.raises(ValueError, match="int8.*quantization='nf4'"):  # nf4/fp4 run: tests/test_fast_decode_quantized.py
        FastDecoder(quantized)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, vocab_size=128))
    with pytest.raises(TypeError, match="GLM"):
        FastDecoder(llama)


def test_compiled_decoders_of_many_shapes_in_one_process(model):
    # torch's default allows 8 compiled shapes of one function; a tuning session builds more decoders than that
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    for extra in range(10):
        decoder = FastDecoder(model, max_len=8 + extra, compile=True)
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
    pos, got = torch.tensor([5, 11]), [[], []]
    for _ in range(8):
        tokens = logits.argmax(-1)
        for row, t in zip(got, tokens.tolist()):
            row.append(t)
        logits = dec.decode_step(tokens, pos).clone()  # each row at its own position
        pos += 1
    for p, row in zip(prompts, got):
        want = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert row == want[0, p.shape[1]:].tolist()
    with pytest.raises(ValueError, match="slot"):
        dec.prefill(prompts[0], slot=2)
