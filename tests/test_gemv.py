"""glmkit's Triton GEMV kernels, run in Triton's CPU interpreter here (see the root conftest.py) and on a GPU there."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rand

from glmkit.fast_decode import FastDecoder
from glmkit.gemv import (
    ASSETS,
    KERNELS,
    GemvConfig,
    gemv,
    gemv_swiglu,
    load_table,
    load_tuned,
    pick_config,
    tables_for,
    triton_available,
    user_table_path,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")
# launch shapes that divide the weight evenly, leave a partial block of rows, of columns, or both
CONFIGS = [GemvConfig(16, 64, 4), GemvConfig(8, 128, 4), GemvConfig(32, 256, 4), GemvConfig(64, 32, 2)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("n, k", [(256, 512), (100, 300), (48, 640)])
def test_gemv_equals_linear_in_float32(config, n, k):
    w, x, b = rand(n, k), rand(1, 1, k, seed=1), rand(n, seed=2)
    y = gemv(x, w, b, config=config)
    assert y.shape == (1, 1, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_gemv_in_bfloat16_is_as_close_to_float64_as_linear():
    w, x = rand(512, 640, dtype=torch.bfloat16), rand(1, 1, 640, dtype=torch.bfloat16, seed=1)
    ref = F.linear(x.double(), w.double())
    ours, theirs = gemv(x, w).double(), F.linear(x, w).double()
    assert gemv(x, w).dtype == torch.bfloat16
    # one bf16 rounding of an fp32 sum: relative error about 2**-9
    assert ((ours - ref).norm() / ref.norm()).item() < 4e-3
    assert ((ours - ref).norm() / ref.norm()).item() < 2 * ((theirs - ref).norm() / ref.norm()).item() + 1e-3


@pytest.mark.parametrize("config", CONFIGS[:2], ids=str)
def test_gemv_swiglu_equals_up_times_silu_gate(config):
    w, x = rand(2 * 120, 320), rand(1, 1, 320, seed=1)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_swiglu(x, w, config=config), up * F.silu(gate), rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_problem():
    w = rand(64, 128)
    with pytest.raises(ValueError, match="one vector"):
        gemv(rand(2, 1, 128), w)  # two tokens
    with pytest.raises(ValueError, match="one vector"):
        gemv(rand(1, 1, 96), w)  # wrong width
    with pytest.raises(ValueError, match="even number of rows"):
        gemv_swiglu(rand(1, 1, 128), rand(63, 128))
    with pytest.raises(ValueError, match="contiguous"):
        gemv(rand(1, 1, 64), w.T)
    with pytest.raises(ValueError, match="one dtype"):
        gemv(rand(1, 1, 128, dtype=torch.bfloat16), w)


def test_tuned_table_covers_glm4_9b_and_every_shape_is_valid():
    from transformers import GlmConfig

    c = GlmConfig()
    tuned = load_tuned()
    shapes = {(c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size),
              (c.vocab_size, c.hidden_size), (c.hidden_size, c.hidden_size)}
    assert shapes <= set(tuned)
    for path in sorted(ASSETS.glob("gemv_tuned*.json")):
        for (kernel, _, _), cfg in load_table(path)[1].items():
            assert kernel in KERNELS
            # powers of two (Triton's block sizes must be) and at most 64 fp32 partial sums per thread
            assert all(v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k, cfg.num_warps))
            assert cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps * (2 if kernel in ("nf4", "fp4") else 1)


def _write_table(path, device, configs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tuned_on": device, "configs": configs}))


def test_tables_are_chosen_by_device_name_and_the_users_own_wins(tmp_path, monkeypatch):
    import glmkit.gemv

    h100 = "NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))
    assert tables_for(h100)[("bf16", 4096, 13696)] == load_tuned()[(4096, 13696)]
    assert tables_for("NVIDIA GeForce RTX 2080 Ti") == {}
    mine = {"rows": 4096, "columns": 13696, "block_n": 2, "block_k": 1024, "num_warps": 2}
    _write_table(user_table_path(), h100, [mine, {**mine, "kernel": "nf4", "rows": 7}])
    assert user_table_path() == tmp_path / "gemv_tuned.json"
    assert tables_for(h100)[("bf16", 4096, 13696)] == GemvConfig(2, 1024, 2)  # the user's table wins
    assert tables_for(h100)[("nf4", 7, 13696)] == GemvConfig(2, 1024, 2)
    assert ("bf16", 151552, 4096) in tables_for(h100)  # shapes the user did not tune stay
    _write_table(user_table_path(), "Some other card", [mine])
    assert tables_for(h100)[("bf16", 4096, 13696)] == load_tuned()[(4096, 13696)]  # another card's table: unused

    # on an untuned card: defaults, said once in one line
    monkeypatch.setattr(glmkit.gemv, "_ACTIVE", None)
    monkeypatch.setattr(glmkit.gemv, "device_name", lambda: "NVIDIA GeForce RTX 3060")
    with pytest.warns(UserWarning, match="no tuned launch shapes for NVIDIA GeForce RTX 3060.*glmkit tune"):
        assert glmkit.gemv.active_table() == {}
    monkeypatch.setattr(glmkit.gemv, "_ACTIVE", None)
    monkeypatch.setattr(glmkit.gemv, "device_name", lambda: h100)
    monkeypatch.setattr(glmkit.gemv, "INTERPRETER", False)
    assert pick_config(4096, 13696) == load_tuned()[(4096, 13696)]
    assert pick_config(4096, 13696, "fp16") == GemvConfig(8, 512, 4)  # untuned kernel: the rule of thumb


@pytest.fixture(scope="module")
def model(tiny_path):
    from glmkit.loading import load_model

    return load_model(tiny_path, dtype=torch.float32, device_map=DEVICE)


def test_fast_decoder_with_triton_gemv_gives_generates_greedy_tokens(model):
    ids = torch.randint(0, 800, (1, 7), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    fast = FastDecoder(model, max_len=16, gemv="triton", compile=False, cuda_graph=False)
    got = fast.generate(ids, max_new_tokens=5, ignore_eos=True)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_fast_decoder_gemv_choices(model):
    assert FastDecoder(model, max_len=16).gemv == ("triton" if DEVICE == "cuda" else False)  # auto
    assert FastDecoder(model, max_len=16, batch_size=2).gemv is False  # auto: cuBLAS beyond batch 1
    with pytest.raises(ValueError, match="batch_size=1"):
        FastDecoder(model, max_len=16, batch_size=2, gemv="triton")
    with pytest.raises(ValueError, match="gemv must be"):
        FastDecoder(model, max_len=16, gemv="cutlass")


def test_a_cpu_weight_without_the_interpreter_is_refused(monkeypatch):
    import glmkit.gemv

    monkeypatch.setattr(glmkit.gemv, "INTERPRETER", False)
    with pytest.raises(ValueError, match="runs on a GPU"):
        gemv(torch.randn(1, 1, 8), torch.randn(4, 8))


def test_auto_falls_back_to_cublas_with_a_warning_when_the_kernels_fail(model, monkeypatch):
    import glmkit.fast_decode

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(glmkit.fast_decode, "auto_gemv", lambda device, batch_size, dtype: "triton")
    monkeypatch.setattr(glmkit.fast_decode, "triton_gemv", broken)
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    auto = FastDecoder(model, max_len=16, compile=False, cuda_graph=False)
    assert auto.gemv == "triton"
    with pytest.warns(RuntimeWarning, match="uses cuBLAS instead"):
        got = auto.generate(ids, max_new_tokens=4, ignore_eos=True)
    assert auto.gemv is False and torch.equal(got, want)
    explicit = FastDecoder(model, max_len=16, gemv="triton", compile=False, cuda_graph=False)
    with pytest.raises(RuntimeError, match="no kernel image"):
        explicit.generate(ids, max_new_tokens=4, ignore_eos=True)


def test_write_table_keeps_this_cards_other_shapes_and_is_read_back(tmp_path, monkeypatch):
    from glmkit.gemv_tuning import write_table

    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))
    card = "NVIDIA GeForce RTX 3060"
    first = [{"kernel": "nf4", "rows": 4096, "columns": 4096, "block_n": 4, "block_k": 512, "num_warps": 4},
             {"kernel": "fp16", "rows": 4096, "columns": 4096, "block_n": 2, "block_k": 1024, "num_warps": 4}]
    assert write_table(first, device=card) == user_table_path()
    write_table([{**first[0], "block_n": 8}], device=card)  # re-tuned nf4 replaces; fp16 stays
    assert tables_for(card) == {("nf4", 4096, 4096): GemvConfig(8, 512, 4), ("fp16", 4096, 4096): GemvConfig(2, 1024, 4)}
    write_table([first[1]], device="another card")  # a table for another card starts over
    assert tables_for(card) == {} and len(tables_for("another card")) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_glmkit_tune_without_a_gpu_says_so(capsys):
    from glmkit.cli import main

    assert main(["tune"]) == 2
    assert "on a GPU; this machine has none" in capsys.readouterr().err


def test_fp16_gives_way_to_cublas_on_shapes_this_card_has_not_tuned(monkeypatch):
    import glmkit.gemv
    from glmkit.gemv import prefer_triton

    monkeypatch.setattr(glmkit.gemv, "INTERPRETER", False)
    monkeypatch.setattr(glmkit.gemv, "_ACTIVE", {("fp16", 4096, 4096): GemvConfig(1, 4096, 8)})
    assert prefer_triton("fp16", 4096, 4096) and not prefer_triton("fp16", 4096, 13696)
    assert prefer_triton("bf16", 4096, 13696) and prefer_triton("nf4", 4096, 13696)


def test_tuned_shard_shapes_are_the_shapes_a_tp_rank_multiplies():
    """``glmkit tune --tp 2`` times the weights one tensor-parallel rank reads (a table keyed by other shapes would
    never be looked up), for GLM-4-9B-Chat on the meta device."""
    from glmkit.gemv_tuning import projections
    from glmkit.models import glm4_9b_meta_model
    from glmkit.tp_decode import tp_shard

    shard = tp_shard(glm4_9b_meta_model(), rank=1, world=2)
    wqkv, bqkv, wo, _, wgu, wd, _ = shard["layers"][0]
    shapes = {"qkv": (wqkv.shape[0], wqkv.shape[1], bqkv is not None, False), "o_proj": (*wo.shape, False, False),
              "gate_up": (wgu.shape[0] // 2, wgu.shape[1], False, True), "down_proj": (*wd.shape, False, False),
              "lm_head": (*shard["lm_head"].shape, False, False)}
    assert projections(tp=2) == shapes
    with pytest.raises(ValueError, match="KV heads"):
        projections(tp=4)
