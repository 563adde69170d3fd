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
    add_norm_gemv,
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

    monkeypatch.setattr(glmkit.fast_decode, "auto_gemv", lambda device, batch_size, dtype, four_bit=False: "triton")
    monkeypatch.setattr(glmkit.fast_decode, "triton_gemv", broken)
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    auto = FastDecoder(model, max_len=16, compile=False, cuda_graph=False)
    assert auto.gemv == "triton"
    with pytest.warns(RuntimeWarning, match="uses cuBLAS \\(gemv=False\\) instead"):
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


def test_cuda_kernel_shapes_share_the_tables_and_are_read_apart(tmp_path, monkeypatch):
    """The batch-1 4-bit CUDA kernel's tuned shapes (``glmkit tune``: ``table_configs`` of its rows) go into the same
    table as the Triton shapes; ``tables_for`` reads the Triton shapes, ``cuda_shapes_for`` the CUDA ones, each by
    device name, and a re-tuned shape replaces the old one."""
    from glmkit.gemv import cuda_shapes_for
    from glmkit.gemv_tuning import table_configs, write_table

    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))
    card = "NVIDIA GeForce RTX 4070"
    tuned = {"projection": "gate_up", "kernel": "4bit-one", "rows": 13696, "columns": 4096,
             "best": {"groups": 2, "warps": 4, "depth": 3, "wide": False, "us": 80.0, "tb_s": 0.35}}
    triton = {"projection": "o_proj", "kernel": "nf4", "rows": 4096, "columns": 4096,
              "best": {"block_n": 2, "block_k": 1024, "num_warps": 2, "lookup": "shuffle"}}
    configs = table_configs([tuned, triton])
    assert configs[0] == {"kernel": "4bit-one", "rows": 13696, "columns": 4096, "groups": 2, "warps": 4, "depth": 3,
                          "wide": False}  # rows as the kernel launches them (gate/up: one half), no timings
    write_table(configs, device=card)
    assert set(tables_for(card)) == {("nf4", 4096, 4096)}
    assert cuda_shapes_for(card) == {("4bit-one", 13696, 4096): {"groups": 2, "warps": 4, "depth": 3, "wide": False}}
    write_table(table_configs([{**tuned, "best": {**tuned["best"], "groups": 1}}]), device=card)
    assert cuda_shapes_for(card)[("4bit-one", 13696, 4096)]["groups"] == 1 and len(tables_for(card)) == 1
    assert cuda_shapes_for("another card") == {}
    broken = {"kernel": "4bit-one", "rows": 7, "columns": 64, "groups": 2, "warps": 4}  # no depth, no table width
    _write_table(user_table_path(), card, [broken, configs[1]])
    with pytest.warns(UserWarning, match="without rows, columns, groups, warps, depth, wide is skipped"):
        assert cuda_shapes_for(card) == {} and len(tables_for(card)) == 1


def test_both_4bit_cuda_kernels_shapes_are_read_by_kernel_and_a_malformed_one_is_skipped(tmp_path, monkeypatch):
    """The batch-1 and the 2-8-row 4-bit CUDA kernels' shapes sit in one table, each read with its own fields; an entry
    of either missing a field is skipped with a warning that names its kernel, and never read as a Triton shape."""
    from glmkit.gemv import cuda_shapes_for
    from glmkit.gemv_tuning import table_configs, write_table

    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))
    card = "NVIDIA GeForce RTX 4070"
    one = {"projection": "o_proj", "kernel": "4bit-one", "rows": 4096, "columns": 4096,
           "best": {"groups": 2, "warps": 4, "depth": 2, "wide": True}}
    mma = {"projection": "o_proj", "kernel": "4bit-mma", "rows": 4096, "columns": 4096,
           "best": {"warps": 4, "unroll": 1, "min_blocks": 3, "us_summed": 30.0}}
    write_table(table_configs([one, mma]), device=card)
    assert cuda_shapes_for(card) == {("4bit-one", 4096, 4096): {"groups": 2, "warps": 4, "depth": 2, "wide": True},
                                     ("4bit-mma", 4096, 4096): {"warps": 4, "unroll": 1, "min_blocks": 3}}
    assert tables_for(card) == {}
    _write_table(user_table_path(), card, [{"kernel": "4bit-mma", "rows": 7, "columns": 64, "warps": 4}])
    with pytest.warns(UserWarning, match="a 4bit-mma shape without rows, columns, warps, unroll, min_blocks"):
        assert cuda_shapes_for(card) == {} and tables_for(card) == {}


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


def _rms_norm(x, g, eps=1e-5):
    from glmkit.fast_decode import rms_norm

    return rms_norm(x, g, eps)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("n, k", [(100, 300), (48, 640)])
def test_norm_and_residual_folded_into_the_gemv_equal_the_unfused_ops_in_float32(config, n, k):
    w, x, b, g, r = rand(n, k), rand(1, 1, k, seed=1), rand(n, seed=2), rand(k, seed=3), rand(1, 1, n, seed=4)
    w = w / k**0.5  # outputs of order 1 (silu's exp stays finite)
    torch.testing.assert_close(gemv(x, w, b, config=config, norm_weight=g, eps=1e-5),
                               F.linear(_rms_norm(x, g), w, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv(x, w, b, config=config, residual=r), r + F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    wgu = rand(2 * n, k, seed=5) / k**0.5
    gate, up = F.linear(_rms_norm(x, g), wgu).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_swiglu(x, wgu, config=config, norm_weight=g), up * F.silu(gate), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_out_takes_the_16_bit_product_widened_to_float32(dtype):
    # the decoder's logits: the product rounded to x's dtype, as F.linear rounds it, then written as fp32 (.float())
    w, x, g = rand(96, 256).to(dtype), rand(1, 1, 256, seed=1).to(dtype), rand(256, seed=2).to(dtype)
    out = torch.full((1, 96), float("nan"), device=DEVICE)
    assert gemv(x, w, norm_weight=g, out=out) is out
    assert torch.equal(out, gemv(x, w, norm_weight=g).view(1, 96).float())
    with pytest.raises(ValueError, match="in x's torch.float32 or in float32"):
        gemv(x.float(), w.float(), out=torch.empty(96, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_norm_and_residual_in_16_bits_are_as_close_to_float64_as_pytorchs_ops(dtype):
    """The fused kernels against the ops they replace, both measured against float64: RMSNorm folded in (the
    normalised x never rounded to 16 bits) is as close as rms_norm + F.linear; the residual add is rounded as
    PyTorch rounds ``r + F.linear(a, w)``."""
    import glmkit.gemv

    n, k = 200, 576  # odd against every block shape: partial blocks of rows and of columns
    w, x, b = rand(n, k, dtype=dtype) * 0.05, rand(1, 1, k, dtype=dtype, seed=1) * 3, rand(n, dtype=dtype, seed=2)
    g, r = (1 + 0.1 * rand(k, seed=3)).to(dtype), rand(1, 1, n, dtype=dtype, seed=4)
    wgu = rand(2 * n, k, dtype=dtype, seed=5) * 0.05

    def rel(ours, ref):
        return ((ours.double() - ref).norm() / ref.norm()).item()

    def swiglu(y):
        gate, up = y.chunk(2, dim=-1)
        return up * F.silu(gate)

    x64, g64 = x.double(), g.double()
    normed64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * g64
    cases = {  # name: (fused kernel, PyTorch's unfused ops, float64 reference)
        "norm + bias": (gemv(x, w, b, norm_weight=g, eps=1e-5), F.linear(_rms_norm(x, g), w, b),
                        F.linear(normed64, w.double(), b.double())),
        "norm + swiglu": (gemv_swiglu(x, wgu, norm_weight=g, eps=1e-5), swiglu(F.linear(_rms_norm(x, g), wgu)),
                          swiglu(F.linear(normed64, wgu.double()))),
        "residual": (gemv(x, w, residual=r), r + F.linear(x, w), r.double() + F.linear(x64, w.double())),
    }
    # Triton's CPU interpreter truncates fp32 to bf16 where a GPU rounds to nearest (fp16 it rounds): up to twice
    # the error of each bf16 rounding there
    slack = 2.5 if dtype == torch.bfloat16 and glmkit.gemv.INTERPRETER else 1.5
    for name, (ours, theirs, ref) in cases.items():
        assert ours.dtype == dtype and ours.shape == theirs.shape, name
        assert rel(ours, ref) < slack * rel(theirs, ref) + 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k", [(100, 300), (48, 640)])
def test_add_norm_gemv_writes_x_plus_d_exactly_and_multiplies_its_norm(dtype, n, k):
    """The residual add before the norm (a tensor-parallel rank's all-reduced partial sum): s is PyTorch's x + d to the
    bit, whichever program writes it, and the product is F.linear(rms_norm(s, g), W) (with bias; SwiGLU), for launch
    shapes that run one program or several, with partial blocks of rows and of columns."""
    w, b, wgu = rand(n, k, seed=1) / k**0.5, rand(n, seed=2), rand(2 * n, k, seed=3) / k**0.5
    x, d, g = rand(1, 1, k, seed=4) * 3, rand(1, 1, k, seed=5), 1 + 0.1 * rand(k, seed=6)
    w, b, wgu, x, d, g = (t.to(dtype) for t in (w, b, wgu, x, d, g))
    s = x + d
    want = F.linear(_rms_norm(s.float(), g.float()), w.float(), b.float())
    gate, up = F.linear(_rms_norm(s.float(), g.float()), wgu.float()).chunk(2, dim=-1)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for config in [*CONFIGS, GemvConfig(128, 1024, 4)]:  # the last: one program
        y, added = add_norm_gemv(x, d, w, g, b, eps=1e-5, config=config)
        assert torch.equal(added, s) and added.dtype == dtype and added.shape == x.shape, config
        assert added.data_ptr() not in (x.data_ptr(), d.data_ptr())
        torch.testing.assert_close(y.float(), want, **tol)
        a, added = add_norm_gemv(x, d, wgu, g, eps=1e-5, swiglu=True, config=config)
        assert torch.equal(added, s), config
        torch.testing.assert_close(a.float(), up * F.silu(gate), **tol)


def test_add_norm_gemv_rounds_the_sum_to_nearest_even_as_pytorch():
    """bf16 sums that need rounding (a bit below, at and above halfway between two bf16 numbers, ties either way): the
    written stream is PyTorch's x + d in every case (Triton's interpreter truncates where a GPU rounds)."""
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = 2.0**-7  # of numbers in [1, 2) in bf16
    x = torch.cat([one + torch.arange(16, dtype=torch.bfloat16) * ulp] * 8)[None, None]  # 1 .. 1 + 15 ulp, even/odd
    steps = torch.tensor([0.25, 0.5, 0.75, 1.5, 2.5, -0.5, -1.5]) * ulp  # x's ulp: below, at and past halfway
    d = steps.repeat(19)[:128].to(torch.bfloat16)[None, None]  # exact in bf16
    truncated = ((x.float() + d.float()).view(torch.int32) >> 16 << 16).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(truncated, x + d)  # truncating would fail this test
    w, g = rand(8, 128, dtype=torch.bfloat16), torch.ones(128, dtype=torch.bfloat16)
    _, added = add_norm_gemv(x, d, w, g, config=GemvConfig(4, 32, 2))
    assert torch.equal(added, x + d)


def test_fused_inputs_of_the_wrong_size_or_dtype_are_refused():
    w, x = rand(64, 128), rand(1, 1, 128)
    with pytest.raises(ValueError, match="norm_weight must hold 128 values"):
        gemv(x, w, norm_weight=rand(64))
    with pytest.raises(ValueError, match="residual must hold 64 values"):
        gemv(x, w, residual=rand(1, 1, 64, dtype=torch.bfloat16))


def test_fast_decoder_folds_the_norms_and_residual_adds_into_the_gemvs(monkeypatch):
    """The trained tiny GLM-4 through FastDecoder(gemv="triton"): every projection of a decode step is one GEMV
    launch with the norm or the residual add folded in (no norm of its own), and the greedy tokens are generate()'s."""
    import glmkit.fast_decode
    from glmkit.generation import encode_chat
    from glmkit.loading import load_model, load_tokenizer
    from glmkit.models import TRAINED_TINY_DIR

    trained = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map=DEVICE)
    launches = []

    def counting(x, weight, bias=None, **fused):
        launches.append(sorted(k for k, v in fused.items() if v is not None and k != "eps"))
        return gemv(x, weight, bias, **fused)

    def counting_swiglu(x, weight, **fused):
        launches.append(["swiglu", *sorted(k for k, v in fused.items() if v is not None and k != "eps")])
        return gemv_swiglu(x, weight, **fused)

    def no_norm(*args, **kwargs):
        raise AssertionError("a decode step ran a norm of its own")

    monkeypatch.setattr(glmkit.fast_decode, "triton_gemv", counting)
    monkeypatch.setattr(glmkit.fast_decode, "gemv_swiglu", counting_swiglu)
    tok = load_tokenizer(TRAINED_TINY_DIR)
    ids = encode_chat(tok, [{"role": "user", "content": "How many layers?"}])["input_ids"].to(DEVICE)
    fast = FastDecoder(trained, max_len=64, gemv="triton", compile=False, cuda_graph=False)
    assert fast.fuses_norms(1)
    assert not FastDecoder(trained, max_len=64, gemv="triton", fuse_norms=False, compile=False,
                           cuda_graph=False).fuses_norms(1)  # norms as kernels of their own, to compare
    fast.prefill(ids)  # a warm-up step, then the prompt (cuBLAS, norms apart)
    launches.clear()
    monkeypatch.setattr(glmkit.fast_decode, "rms_norm", no_norm)
    fast.decode_step(ids[0, -1:], ids.shape[1])
    layers = trained.config.num_hidden_layers
    # per layer: qkv (norm), o_proj (residual), gate_up (norm, SwiGLU), down (residual); then lm_head (norm),
    # written straight into the decoder's fp32 logits (out)
    per_layer = [["norm_weight"], ["residual"], ["swiglu", "norm_weight"], ["residual"]]
    assert launches == per_layer * layers + [["norm_weight", "out"]]
    monkeypatch.undo()
    want = trained.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=10), want)


@pytest.mark.parametrize("name, swiglu", [("qkv", False), ("gate_up", True), ("down_proj", False)])
def test_the_tuner_times_the_fused_launch_the_decoder_makes(name, swiglu, monkeypatch):
    """``glmkit tune`` checks (against float64) and times each 16-bit projection with the norm or residual add the
    decoder folds into it: the table then holds the shapes of the kernels the decoder launches."""
    torch.manual_seed(0)  # the inputs the tuner draws: the same every run (its checks have a bar)
    import glmkit.gemv_tuning
    from glmkit.gemv_tuning import FUSED, projections, tune_projection

    assert set(FUSED) == set(projections())
    folded = []

    def recording(kernel):
        def run(*args, **kwargs):
            folded.append(sorted(k for k in ("norm_weight", "residual") if kwargs.get(k) is not None))
            return kernel(*args, **kwargs)
        return run

    monkeypatch.setattr(glmkit.gemv_tuning, "gemv", recording(gemv))
    monkeypatch.setattr(glmkit.gemv_tuning, "gemv_swiglu", recording(gemv_swiglu))
    shapes = [GemvConfig(16, 64, 4), GemvConfig(8, 256, 2)]
    row = tune_projection(name, 40, 200, name == "qkv", swiglu, "bf16", shapes=shapes, device=DEVICE,
                          timer=lambda fn, copies: (fn(0), 1e-6)[1], fused=FUSED[name])
    assert row["fused"] == FUSED[name] and row["best"] is not None
    assert all(t["rel_err"] < 2e-2 for t in row["tried"])  # against float64 with the norm or the residual
    want = ["residual"] if name == "down_proj" else ["norm_weight"]
    assert folded and all(f == want for f in folded)


@pytest.mark.parametrize("name, swiglu", [("qkv", False), ("gate_up", True), ("lm_head", False)])
def test_the_tp_tuner_times_the_add_norm_launch_a_rank_makes(name, swiglu, monkeypatch):
    """``glmkit tune --tp 2`` checks and times qkv, gate_up and lm_head as a tensor-parallel rank launches them: the
    all-reduced partial sum added and the RMSNorm applied in the GEMV (``add_norm_gemv``)."""
    torch.manual_seed(0)  # the inputs the tuner draws: the same every run (its checks have a bar)
    import glmkit.gemv_tuning
    from glmkit.gemv_tuning import FUSED_TP, projections, tune_projection

    assert set(FUSED_TP) == set(projections(tp=2)) and FUSED_TP[name] == "add_norm"
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs.get("swiglu"))
        return add_norm_gemv(*args, **kwargs)

    monkeypatch.setattr(glmkit.gemv_tuning, "add_norm_gemv", recording)
    shapes = [GemvConfig(16, 64, 4), GemvConfig(8, 256, 2)]
    row = tune_projection(name, 40, 200, name == "qkv", swiglu, "bf16", shapes=shapes, device=DEVICE,
                          timer=lambda fn, copies: (fn(0), 1e-6)[1], fused=FUSED_TP[name])
    assert row["fused"] == "add_norm" and row["best"] is not None
    assert all(t["rel_err"] < 2e-2 for t in row["tried"])  # against float64 of rms_norm(x + d)
    assert calls and all(c == swiglu for c in calls)


COMPILE_FOR_SM90 = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from glmkit.gemv import _gemv_kernel as kernel

sig = {**{p: "*bf16" for p in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "r_ptr", "d_ptr", "s_ptr")},
       "N": "i32", "K": "i32", "K_FULL": "i32", "eps": "fp32"}

def build(**flags):
    consts = {**dict(HAS_BIAS=False, SWIGLU=False, NORM=False, RESIDUAL=False, ADD=False, ROUND_BITS=False,
                     BLOCK_N=8, BLOCK_K=512, EVEN_N=False, EVEN_K=False, PDL=0), **flags}
    src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)

try:  # a trivial kernel: is there a toolchain for sm_90 here at all? (a broken glmkit kernel must fail below)
    triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32"}), target=GPUTarget("cuda", 90, 32))
except Exception as exc:
    print("NO TOOLCHAIN", type(exc).__name__, str(exc)[:200])
    raise SystemExit(0)
assert "cubin" in build().asm  # the plain kernel, as it ran on H100s and H200s
for norm, residual, swiglu, add in [(True, False, False, False), (True, False, True, False),
                                    (False, True, False, False), (True, False, False, True), (True, False, True, True)]:
    assert "cubin" in build(NORM=norm, RESIDUAL=residual, SWIGLU=swiglu, ADD=add, HAS_BIAS=norm and not swiglu).asm
ptx = build(NORM=True, SWIGLU=True, ADD=True, PDL=1).asm["ptx"]  # programmatic dependent launch: griddepcontrol
assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
from glmkit.attention import _combine_kernel, _decode_attention_kernel  # their PDL variants too
ptrs = {p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
ptrs.update({"pos_ptr": "*i64", "row_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
             "ticket_ptr": "*i32", "max_len": "i32", "scale_log2": "fp32"})
ptrs.update({n: "i32" for n in _decode_attention_kernel.arg_names if n.startswith("stride_")})
for fn, sig, consts in [
        (_decode_attention_kernel, ptrs, dict(KV=2, GROUP=16, HEAD_DIM=128, ROTARY=64, BLOCK_G=16, BLOCK_D=128,
                                              BLOCK_N=64, SPLIT=256, SPLITS=4, IEEE=False, PDL=1, PRELOAD=True, LATE=True,
                                              AHEAD=False, TICKETS=False, BLOCK_S=4, COS_TABLE=False)),
        (_combine_kernel, {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": "*bf16"},
         dict(HEADS=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=4, SPLIT=256, SPLITS=4, PDL=1))]:
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
from glmkit.attention import SHORT_AHEAD, SHORT_STAGES, SHORT_TILE  # a short cache: one program per KV head
consts = dict(KV=2, GROUP=16, HEAD_DIM=128, ROTARY=64, BLOCK_G=16, BLOCK_D=128, BLOCK_N=SHORT_TILE[0], SPLIT=512,
              SPLITS=1, IEEE=False, PDL=1, PRELOAD=True, LATE=True, AHEAD=SHORT_AHEAD, TICKETS=True, BLOCK_S=1,
              COS_TABLE=True)
src = ASTSource(fn=_decode_attention_kernel, signature={**ptrs, **{k: "constexpr" for k in consts}},
                constexprs={(_decode_attention_kernel.arg_names.index(k),): v for k, v in consts.items()})
short = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": SHORT_TILE[1], **({"num_stages": SHORT_STAGES} if SHORT_STAGES else {})})
assert "cubin" in short.asm and short.metadata.shared <= 227 * 1024  # fits one SM's shared memory
import os, re, subprocess, tempfile  # a short cache whose kernel before leaves it SMs: tiles of EARLY_TILE's 256
import triton.backends.nvidia
from glmkit.attention import Grid, combine_step, reads_ahead
cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
# one split and two (the kernel before leaving SMs), then long caches combined by the last program of a KV head
for max_len, early in ((200, True), (296, True), (2048, False), (8192, False), (32768, False)):
    grid = Grid.of(1, 2, max_len, tickets=True, early=early)
    consts.update(BLOCK_N=grid.tile, SPLIT=grid.split, SPLITS=grid.splits, AHEAD=reads_ahead(grid, 1),
                  BLOCK_S=combine_step(grid.splits, True))
    src = ASTSource(fn=_decode_attention_kernel, signature={**ptrs, **{k: "constexpr" for k in consts}},
                    constexprs={(_decode_attention_kernel.arg_names.index(k),): v for k, v in consts.items()})
    staged = SHORT_STAGES and (grid.splits == 1 or grid.side_by_side)  # as decode_attention launches it
    built = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": grid.warps, **({"num_stages": SHORT_STAGES} if staged else {})})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(built.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))  # spilled registers live on the stack
    assert stack <= 1024, (max_len, grid, usage)  # a 256-position tile read ahead: 3176; 32 splits a step: 5760
from glmkit.attention import TICKET_TILE  # tiles side by side, the last program of a KV head combining them
consts.update(BLOCK_N=TICKET_TILE[0], SPLIT=TICKET_TILE[0], SPLITS=4, AHEAD=False, BLOCK_S=4)
src = ASTSource(fn=_decode_attention_kernel, signature={**ptrs, **{k: "constexpr" for k in consts}},
                constexprs={(_decode_attention_kernel.arg_names.index(k),): v for k, v in consts.items()})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": TICKET_TILE[1], **({"num_stages": SHORT_STAGES} if SHORT_STAGES else {})}
                     ).asm["ptx"]
ticket = ptx.index("atom.global.gpu.acq_rel.add")  # released after every thread's partial stores: a barrier first
assert ptx.rfind("bar.sync", 0, ticket) > ptx.rfind("st.global", 0, ticket) > 0
assert ptx[ptx.rfind("\\n", 0, ticket):ticket].strip().startswith("@%p")  # one thread's atomic (predicated)
# the others' partials read from L2 only after the count, passed to every thread through a barrier
assert ticket < ptx.find("bar.sync", ticket) < ptx.find("ld.global.cg", ticket)
from glmkit.allreduce import _push_allreduce_kernel as push  # the two-rank push all-reduce: its flags' ordering
sig = {**{p: "*bf16" for p in ("x_ptr", "out_ptr", "mine_ptr", "peer_ptr")},
       **{p: "*i32" for p in ("my_flags", "peer_flags", "calls")}, "N": "i32", "CAP": "i32"}
for rank in (0, 1):
    consts = dict(RANK=rank, BLOCK=4096, PDL=1, ON_GPU=True)
    src = ASTSource(fn=push, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs={(push.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert "atom.global.sys.release.exch" in ptx and "ld.global.sys.acquire" in ptx and "griddepcontrol.wait" in ptx
    assert ptx.index("fence.acq_rel.sys") < ptx.index("atom.global.sys.release.exch")  # every thread's stores first
print("OK")
"""


MUTATIONS_FOR_SM90 = """
import torch
import triton
from triton.backends.compiler import GPUTarget
try:
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
except ImportError:
    print("NO ANALYSIS")
    raise SystemExit(0)
from glmkit.gemv import _gemv_kernel

class Hopper:  # the target torch.compile's analysis builds for: an H100/H200, without one here
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Hopper())
names = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "r_ptr", "d_ptr", "s_ptr")
tensors = {n: torch.empty(8 * 128, dtype=torch.bfloat16) for n in names}
for add in (False, True):
    kw = {**tensors, "N": 8, "K": 128, "K_FULL": 128, "eps": 1e-5, "HAS_BIAS": False, "SWIGLU": False, "NORM": True,
          "RESIDUAL": False, "ADD": add, "ROUND_BITS": False, "BLOCK_N": 8, "BLOCK_K": 128, "EVEN_N": True,
          "EVEN_K": True, "PDL": 0}
    rw = identify_accessed_tensors(_gemv_kernel, kw, {}).read_writes
    print(add, sorted(d.name for d in rw.writes), sorted(d.name for d in rw.reads))
"""


RUN_EACH = """
import runpy, sys, traceback
for path in sys.argv[1:]:
    print("=== " + path, flush=True)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            print(f"SCRIPT EXITED {exc.code}")
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("SCRIPT RAISED")
"""


@pytest.fixture(scope="module")
def sm90(tmp_path_factory) -> dict[str, str]:
    """The two sm_90 scripts above, one after the other in one fresh process without Triton's interpreter (one
    interpreter start, not two): what each printed, a traceback and SCRIPT RAISED when it raised. Each is a file:
    Triton reads a @jit function's source from it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path_factory.mktemp("sm90")
    scripts = {"compile": COMPILE_FOR_SM90, "mutations": MUTATIONS_FOR_SM90}
    for name, text in scripts.items():
        (folder / f"{name}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", RUN_EACH, *(str(folder / f"{n}.py") for n in scripts)], env=env,
                         capture_output=True, text=True, timeout=600)
    sections = dict(zip(scripts, out.stdout.split("=== ")[1:]))
    missing = [n for n in scripts if n not in sections]
    assert out.returncode == 0 and not missing, f"exit {out.returncode}, no output of {missing}: {out.stderr[-2000:]}"
    return {name: text.split("\n", 1)[1] for name, text in sections.items()}  # without the === line


def test_torch_compile_sees_the_fused_launches_write_only_their_outputs(sm90):
    """torch.compile (which traces the decoders' launches) reads the kernel's Triton IR to learn which tensors it
    writes: y alone, and s with the add, never the weight or the unused pointer slots the launch fills with it (were
    they taken as written, each compiled step would copy the weights)."""
    out = sm90["mutations"]
    if out.startswith("NO ANALYSIS"):
        pytest.skip(f"torch's kernel analysis is not at hand here: {out[-300:]}")
    assert "SCRIPT " not in out, out[-2000:]
    plain, add = out.strip().splitlines()[-2:]
    assert plain.startswith("False ['y_ptr'] ") and "d_ptr" not in plain and "s_ptr" not in plain
    assert add.startswith("True ['s_ptr', 'y_ptr'] ") and "'d_ptr'" in add


def test_the_fused_kernels_compile_for_an_h100_or_h200_without_one(sm90):
    """Triton's CPU interpreter runs the kernels' arithmetic but not Triton's compiler: build the fused variants for
    sm_90 (Hopper) down to a cubin, in a process without the interpreter, so a GPU-only compile error shows here."""
    out = sm90["compile"]
    assert "SCRIPT " not in out, out[-2000:]
    if out.startswith("NO TOOLCHAIN"):
        pytest.skip(f"this Triton cannot build for sm_90 here: {out.strip()}")
    assert out.strip().endswith("OK")
