"""Quantization on the trained tiny GLM: real bitsandbytes on the CPU, real perplexity, real agreement."""

import json
import math

import pytest
import torch

from glmkit.corpus import eval_prompts, heldout_texts
from glmkit.loading import load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.planning import unit_weight_bytes
from glmkit.quantization import (
    PRECISIONS,
    agreement,
    compare_precisions,
    greedy_tokens,
    load_precision,
    model_tensor_bytes,
    perplexity,
    plot_precisions,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TRAINED_TINY_DIR)


@pytest.fixture(scope="module")
def report():
    """``compare_precisions`` on all the held-out text in the precisions the tests look at (run once: every
    precision's perplexity costs seconds on a CPU)."""
    return compare_precisions(TRAINED_TINY_DIR, heldout_texts(), eval_prompts()[:2], ["bf16", "int8", "nf4", "fp4"], 8)


def test_trained_tiny_checkpoint_answers_from_its_corpus(tok):
    from glmkit.generation import chat

    model = load_precision(TRAINED_TINY_DIR, "bf16")
    reply = chat(model, tok, [{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}], max_new_tokens=30)
    assert "40" in reply.text and reply.finish_reason == "stop"


def test_training_log_shows_the_loss_falling():
    log = json.loads((TRAINED_TINY_DIR / "training_log.json").read_text())
    assert log["loss"][-1] < log["loss"][0] / 4


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_planned_weight_bytes_equal_what_is_allocated(precision):
    from transformers import AutoConfig

    dtype, quantization = PRECISIONS[precision]
    model = load_precision(TRAINED_TINY_DIR, precision)
    planned = sum(unit_weight_bytes(AutoConfig.from_pretrained(TRAINED_TINY_DIR), dtype, quantization).values())
    assert model_tensor_bytes(model) == planned


def test_fp4_costs_held_out_perplexity_and_int8_almost_none(report):
    # The issue's must-show, measured: held-out perplexity in bf16 is below fp4's. The held-out text includes lines
    # of the order-2 chain, whose odds the quantized attention and MLP weights compute (glmkit.corpus.chain_lines).
    ppl = {p: report.result(p).perplexity for p in ("bf16", "fp4", "nf4", "int8")}
    assert ppl["bf16"] < ppl["fp4"] < ppl["bf16"] * 1.05
    assert abs(ppl["nf4"] / ppl["bf16"] - 1) < 0.01
    assert abs(ppl["int8"] / ppl["bf16"] - 1) < abs(ppl["fp4"] / ppl["bf16"] - 1)


def test_perplexity_is_exp_of_the_mean_token_loss(tok):
    model = load_precision(TRAINED_TINY_DIR, "bf16")
    text = "With 2 GPUs of type RTX 3090, each card holds 20 of the 40 layers."
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert perplexity(model, tok, [text]) == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_greedy_agreement(tok):
    from glmkit.generation import encode_chat

    prompts = eval_prompts()[:2]
    model = load_precision(TRAINED_TINY_DIR, "bf16")
    bf16 = greedy_tokens(model, tok, prompts, 12)
    assert agreement(bf16, bf16) == 1.0
    assert all(len(t) == 12 for t in bf16)
    for prompt, tokens in zip(prompts, bf16):  # the left-padded batch continues each prompt as it would alone
        enc = encode_chat(tok, [{"role": "user", "content": prompt}])
        alone = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert alone[0, enc["input_ids"].shape[1]:].tolist() == tokens
    int8 = greedy_tokens(load_precision(TRAINED_TINY_DIR, "int8"), tok, prompts, 12)
    assert 0 <= agreement(bf16, int8) <= 1


def test_compare_precisions_report(report, tok):
    assert [r.precision for r in report.results] == ["bf16", "int8", "nf4", "fp4"]
    assert report.result("bf16").perplexity == pytest.approx(
        perplexity(load_precision(TRAINED_TINY_DIR, "bf16"), tok, heldout_texts()))  # its column is perplexity()'s
    assert report.result("bf16").agreement == 1.0
    assert report.result("nf4").measured_bytes < report.result("int8").measured_bytes < report.result("bf16").measured_bytes
    assert all(r.tokens_per_second > 0 and r.perplexity > 1 for r in report.results)
    assert "perplexity" in report._repr_html_()
    change = [bar.get_height() for bar in plot_precisions(report).axes[1].patches]  # % against bf16
    assert change[0] == 0
    assert change[2] == pytest.approx(100 * (report.result("nf4").perplexity / report.result("bf16").perplexity - 1))


def test_unknown_precision():
    with pytest.raises(ValueError, match="Unknown precision 'int4'"):
        load_precision(TRAINED_TINY_DIR, "int4")


def test_training_script_runs_and_learns(tmp_path):
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"))  # (not __main__)
    with torch.random.fork_rng():  # its seeding leaves the other tests' random numbers alone
        script["train"](tmp_path, steps=21, seq=64, batch=4)  # its main() with --steps 21 --batch 4 --seq 64, here
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["loss"][-1] < log["loss"][0]
    assert (tmp_path / "model.safetensors").exists()


def test_batched_perplexity_equals_one_text_at_a_time(tok):
    from glmkit.loading import load_model

    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32)
    texts = heldout_texts(6) + ["x", "GPU"]  # mixed lengths, and texts too short to score
    one_by_one = [perplexity(model, tok, [t]) for t in texts if len(tok(t, add_special_tokens=False).input_ids) > 1]
    counts = [len(tok(t, add_special_tokens=False).input_ids) - 1 for t in texts]
    counts = [c for c in counts if c > 0]
    expected = math.exp(sum(c * math.log(p) for c, p in zip(counts, one_by_one)) / sum(counts))
    assert perplexity(model, tok, texts, batch_size=3) == pytest.approx(expected, rel=1e-5)
