import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from glmkit.device_map import as_model
from glmkit.models import build_tiny_checkpoint, glm4_9b_chat_config, tiny_glm_config


def _greedy(path, prompt="How many layers does GLM-4 have?"):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_glm4_9b_chat_config_matches_the_published_architecture():
    c = glm4_9b_chat_config()
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (40, 4096, 13696)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 128)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (151552, 131072, False)
    assert c.eos_token_id == [151329, 151336, 151338]
    assert c.rope_parameters["partial_rotary_factor"] == 0.5
    model = as_model(c)
    assert sum(p.numel() for p in model.parameters()) == 9_399_951_360


def test_tiny_config_is_4bit_friendly_and_keeps_glm_ratios():
    c = tiny_glm_config()
    model = as_model(c)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p.shape[0] % 64 == 0 and p.shape[1] % 64 == 0, name
    assert c.num_attention_heads // c.num_key_value_heads == 2
    assert type(model).__name__ == "GlmForCausalLM"


def test_tiny_checkpoint_round_trip_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", seed=0)
    b = build_tiny_checkpoint(tmp_path / "b", seed=0)
    c = build_tiny_checkpoint(tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])
    tokens_a = _greedy(a)
    assert tokens_a == _greedy(a) == _greedy(b)
    assert tokens_a != _greedy(c)
    assert len(tokens_a) == 12


def test_tiny_checkpoint_has_generation_config_and_tokenizer(tmp_path):
    path = build_tiny_checkpoint(tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert model.generation_config.eos_token_id == eos
    assert model.config.pad_token_id == eos[0]
