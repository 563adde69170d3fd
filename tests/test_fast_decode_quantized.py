"""FastDecoder on bitsandbytes 4-bit and fp16 models: the same greedy tokens as generate() on the trained tiny GLM
(Triton's interpreter on a CPU; kept to a few tokens: the interpreter is slow)."""

import pytest
import torch

from glmkit.fast_decode import FastDecoder, decoder_layer
from glmkit.gemv4bit import Packed4bit, triton_available
from glmkit.models import TRAINED_TINY_DIR

pytest.importorskip("bitsandbytes")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")


@pytest.fixture(scope="module")
def prompt():
    from glmkit.generation import encode_chat
    from glmkit.loading import load_tokenizer

    tokenizer = load_tokenizer(TRAINED_TINY_DIR)
    return encode_chat(tokenizer, [{"role": "user", "content": "What is a GPU?"}])["input_ids"].to(DEVICE)


def _load(precision):
    from glmkit.quantization import load_precision

    return load_precision(TRAINED_TINY_DIR, precision, device_map=DEVICE)


def _greedy(model, ids, new_tokens):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)


@needs_triton
def test_fast_decoder_with_triton_kernels_gives_generates_greedy_tokens_in_fp16(prompt):
    # (nf4 with the Triton kernels: compiled below; eagerly, in the fallback test after it)
    model = _load("fp16")
    fast = FastDecoder(model, max_len=prompt.shape[1] + 4, gemv="triton", compile=False, cuda_graph=False)
    assert torch.equal(fast.generate(prompt, max_new_tokens=3, ignore_eos=True), _greedy(model, prompt, 3))


@needs_triton
def test_compiled_nf4_layers_call_the_4bit_ops_and_give_generates_greedy_tokens(prompt):
    # gemv="auto" on a GPU: the layer compiled around glmkit's 4-bit ops (here with a backend that records the graph
    # dynamo traced, then AOT-traces it: Inductor on a CPU would add seconds, and the graph is what is tested)
    from torch._dynamo import lookup_backend

    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return lookup_backend("aot_eager")(gm, example_inputs)

    model = _load("nf4-dq")
    fast = FastDecoder(model, max_len=prompt.shape[1] + 3, gemv="triton", compile=True, cuda_graph=False,
                       compile_options={"backend": backend})
    qkv, _, wo, _, wgu, wd, _ = fast.stages[0].weights[0]
    assert all(isinstance(w, Packed4bit) and w.nested for w in (*qkv, wo, wgu, wd))
    # the kernels read bitsandbytes' own tensors: no second copy of the weights
    assert wgu.data.data_ptr() == model.model.layers[0].mlp.gate_up_proj.weight.data_ptr()
    assert torch.equal(fast.generate(prompt, max_new_tokens=3, ignore_eos=True), _greedy(model, prompt, 3))
    assert fast.compiled and len(graphs) == 1  # one compiled layer for all six
    assert {"glmkit.gemv_4bit.default", "glmkit.gemv_4bit_multi.default", "glmkit.gemv_4bit_swiglu.default"} <= graphs[0]


def _norm_kernels(decoder, prompt):
    """The RMSNorm kernels (aten::rsqrt) of one decode step after the prompt's first token (CPU: eager)."""
    from torch.profiler import ProfilerActivity, profile

    tokens = decoder.stream(prompt, 3, ignore_eos=True)
    next(tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next(tokens)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::rsqrt")


@needs_triton
def test_the_4bit_one_row_step_folds_its_norms_into_the_gemvs_and_gives_generates_greedy_tokens(prompt):
    # batch 1, uncompiled: each norm travels with the residual stream from the GEMV that wrote it to the next
    # (gemv_4bit_residual -> gemv_4bit_normed): no norm kernels in the step; fuse_norms=False keeps them apart
    model = _load("nf4-dq")
    fused = FastDecoder(model, max_len=prompt.shape[1] + 4, gemv="triton", compile=False, cuda_graph=False)
    apart = FastDecoder(model, max_len=prompt.shape[1] + 4, gemv="triton", compile=False, cuda_graph=False,
                        fuse_norms=False)
    assert fused.fuses_norms(1) and not apart.fuses_norms(1)
    assert torch.equal(fused.generate(prompt, max_new_tokens=4, ignore_eos=True), _greedy(model, prompt, 4))
    assert _norm_kernels(fused, prompt) == 0 < _norm_kernels(apart, prompt)
    # a compiled layer calls the 4-bit ops and keeps the norms apart (the fused launches are no ops)
    assert not FastDecoder(model, max_len=8, gemv="triton", compile=True, cuda_graph=False).fuses_norms(1)
    # as on a GPU, where the default compiles: the one-row step still folds its norms with glmkit's attention
    # (its layer then runs uncompiled), and keeps them apart with attention="sdpa" (there the layer compiles)
    for attention, folds in (("triton", True), ("sdpa", False)):
        auto = FastDecoder(model, max_len=8, gemv="triton", attention=attention)
        auto.compiled = True
        assert auto.fuses_norms(1) == folds and (not folds or auto.layer_fn_for(1) is decoder_layer)


def test_programmatic_dependent_launch_is_on_for_4bit_models_only_where_the_batch1_cuda_kernel_runs(monkeypatch):
    # on a GPU that has it (Hopper), PDL is the default for 16/32-bit models; for a 4-bit model where glmkit's batch-1
    # CUDA kernel runs (nf4_one_step.json: the step 14% faster with it), not through the Triton 4-bit kernels (a step
    # measured slower with it, benchmarks/results/nf4_fused.json) unless asked for (the GPU stood in for: none here)
    import glmkit.fast_decode
    from glmkit import gemv4bit_one
    from glmkit.loading import load_model

    monkeypatch.setattr(glmkit.fast_decode, "choose_pdl", lambda pdl, devices: True if pdl is None else pdl)
    model = _load("nf4")
    assert not FastDecoder(model, max_len=8, gemv=False).pdl and FastDecoder(model, max_len=8, gemv=False, pdl=True).pdl
    assert FastDecoder(load_model(device_map="cpu", dtype=torch.float32), max_len=8, gemv=False).pdl
    asked = []
    monkeypatch.setattr(gemv4bit_one, "runs_on", lambda device, dtype: asked.append((device, dtype)) or True)
    dtype = model.get_input_embeddings().weight.dtype  # the decoder's 16-bit type (the embeddings stay unquantized)
    decoder = FastDecoder(model, max_len=8, gemv="triton", compile=False, batch_size=2)
    assert decoder.pdl and asked == [(torch.device("cpu"), dtype)]
    assert decoder.uses_pdl(1) and not decoder.uses_pdl(2)  # 2-8 rows take other kernels: plain launches
    assert not FastDecoder(model, max_len=8, gemv=False, pdl=False).pdl
    # double quantization: the batch-1 CUDA kernel does not read it (the Triton kernel does, slower with PDL)
    assert not FastDecoder(_load("nf4-dq"), max_len=8, gemv=False).pdl


@needs_triton
def test_where_q_k_v_leaves_sms_to_the_attention_it_reads_early_tiles_and_gives_generates_greedy_tokens(prompt,
                                                                                                      monkeypatch):
    # on a Hopper GPU with programmatic dependent launch the batch-1 CUDA kernel leaves an SM to each of the
    # attention's programs (glmkit.gemv4bit.sms_left_by), which then read tiles of EARLY_TILE; here (no such GPU) the
    # decoder is told it did, and asks the kernel for as many SMs as the attention's grid has programs
    import glmkit.attention
    import glmkit.fast_decode as fast_decode

    model = _load("nf4")
    asked, early = [], []
    monkeypatch.setattr(fast_decode, "sms_left_by", lambda stream, ws, programs: asked.append(programs) or programs)
    attend = fast_decode.qkv_decode_attention
    monkeypatch.setattr(fast_decode, "qkv_decode_attention",
                        lambda *a, **kw: early.append(kw["early"]) or attend(*a, **kw))
    max_len = prompt.shape[1] + 4
    dec = FastDecoder(model, max_len=max_len, gemv="triton", attention="triton", compile=False, cuda_graph=False)
    assert torch.equal(dec.generate(prompt, max_new_tokens=4, ignore_eos=True), _greedy(model, prompt, 4))
    kv = model.config.num_key_value_heads
    assert asked and set(asked) == {glmkit.attention.Grid.of(1, kv, max_len, True, early=True).programs}
    assert early and all(early)


@needs_triton
def test_a_4bit_layer_that_does_not_compile_runs_eagerly_with_a_warning(prompt):
    def backend(gm, example_inputs):
        raise RuntimeError("this backend cannot build the layer")

    model = _load("nf4")
    fast = FastDecoder(model, max_len=prompt.shape[1] + 2, gemv="triton", compile=True, cuda_graph=False,
                       compile_options={"backend": backend})
    with pytest.warns(RuntimeWarning, match="(?s)4-bit decoder layer failed.*uses eager layers \\(compile=False\\)"):
        got = fast.generate(prompt, max_new_tokens=2, ignore_eos=True)
    assert not fast.compiled and torch.equal(got, _greedy(model, prompt, 2))


@needs_triton
def test_a_batch_through_the_4bit_kernels_gives_each_row_generates_greedy_tokens(prompt):
    # a 4-bit step of several rows: glmkit's 4-bit kernels, a program per row (gemv="triton"; "auto" picks it up to
    # FOUR_BIT_MAX_BATCH rows on a GPU); lm_head (16-bit) through cuBLAS at more than one row
    from glmkit.fast_decode import FOUR_BIT_MAX_BATCH, auto_gemv

    model = _load("nf4")
    want = _greedy(model, prompt, 3)
    other = torch.cat([prompt[:, :1], prompt[:, 1:].flip(1)], dim=1)  # another prompt of the same length
    fast = FastDecoder(model, max_len=prompt.shape[1] + 3, gemv="triton", batch_size=2, compile=False,
                       cuda_graph=False)
    assert fast.gemv_by_bucket == {1: "triton", 2: "triton"}
    got = fast.generate(torch.cat([prompt, other]), max_new_tokens=3, ignore_eos=True)
    assert torch.equal(got[:1], want) and torch.equal(got[1:], _greedy(model, other, 3))
    assert auto_gemv(torch.device("cpu"), 2, four_bit=True) is False  # "auto": GPUs only
    assert FOUR_BIT_MAX_BATCH >= 2
    with pytest.raises(ValueError, match="up to 64"):
        FastDecoder(model, max_len=8, gemv="triton", batch_size=65)


def test_fast_decoder_with_bitsandbytes_matmul_gives_generates_greedy_tokens(prompt):
    model = _load("fp4")
    want = _greedy(model, prompt, 6)  # on AVX512-BF16 CPUs bitsandbytes repacks the weights here: read back
    fast = FastDecoder(model, max_len=prompt.shape[1] + 6, gemv=False, batch_size=2)
    got = fast.generate(prompt.expand(2, -1), max_new_tokens=6, ignore_eos=True)
    assert torch.equal(got, want.expand(2, -1))
    assert "lm_head" in repr(fast)  # its table view shows a 4-bit model too (packed q/k/v: no fused copy to size)


def test_the_engine_serves_an_nf4_model_through_the_fast_path_with_generates_greedy_tokens(prompt):
    # Engine(fast_decode=True) on bitsandbytes nf4 weights (bitsandbytes' matmul on a CPU, glmkit's 4-bit kernels on a
    # GPU): two requests decoding together in the fast decoder's rows, each with generate()'s greedy tokens
    from glmkit.engine import Engine
    from glmkit.loading import load_tokenizer
    from glmkit.runner import FastRunner

    model = _load("nf4")
    engine = Engine(model, load_tokenizer(TRAINED_TINY_DIR), max_batch_size=2, max_context=128, fast_decode=True)
    try:
        other = engine.encode([{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}])
        prompts = [prompt[0].tolist(), other]
        got = [r.wait(60) for r in [engine.submit(ids, max_tokens=8) for ids in prompts]]
        assert isinstance(engine.runner, FastRunner) and engine.fast_requests == 2
        assert isinstance(engine.runner.decoder.stages[0].weights[0][4], Packed4bit)  # gate/up read in place, 4 bits
        eos = set(model.generation_config.eos_token_id)
        for ids, req in zip(prompts, got):
            want = _greedy(model, torch.tensor([ids], device=DEVICE), 8)[0, len(ids):].tolist()
            want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
            assert req.error is None and req.tokens == want and len(want) >= 3
    finally:
        engine.close()


def test_int8_and_other_quantizations_are_refused_with_what_to_use_instead():
    from glmkit.gemv4bit import unsupported_quantization

    class Model(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = type("Config", (), {"quantization_config": config})()

    assert unsupported_quantization(Model(None)) is None
    assert unsupported_quantization(Model({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})) is None
    with pytest.raises(ValueError, match="int8.*quantization='nf4'.*generate"):
        FastDecoder.check(_load("int8"))
    reason = unsupported_quantization(Model({"quant_method": "gptq", "bits": 4}))
    assert "not gptq" in reason and "quantization='nf4'" in reason


@pytest.mark.parametrize("gemv", [False, pytest.param("triton", marks=needs_triton)], ids=["bitsandbytes", "glmkit"])
def test_nf4_on_a_layer_split_gives_generates_greedy_tokens(prompt, gemv):
    # glmkit's kernels (uncompiled): the norms folded into the GEMVs on both segments, the second starting from the
    # residual stream the first hands over
    from accelerate import dispatch_model

    from glmkit.device_map import split_layers

    model = _load("nf4")
    split = dispatch_model(model, split_layers(model, [3, 3], devices=["cpu", torch.device("cpu")]), main_device="cpu")
    fast = FastDecoder(split, max_len=prompt.shape[1] + 4, gemv=gemv, compile=False)
    assert len(fast.stages) == 2 and isinstance(fast.stages[1].weights[0][4], Packed4bit)
    assert fast.fuses_norms(1) == (gemv == "triton")
    assert torch.equal(fast.generate(prompt, max_new_tokens=4, ignore_eos=True).cpu(), _greedy(split, prompt, 4).cpu())


def test_glmkit_generate_quantization_nf4_fast_decode_says_what_generate_says(capsys):
    import json

    from glmkit.cli import main

    args = ["generate", "--quantization", "nf4", "--dtype", "bfloat16", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--fast-decode"]) == 0
    fast = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fast["tokens"] == plain["tokens"] and len(plain["tokens"]) >= 1
    # bench: the same flags measure the nf4 model's fast path (its own decoder, warmed up before it is timed)
    bench = ["bench", "--quantization", "nf4", "--dtype", "bfloat16", "--prompt-len", "8", "--new-tokens", "4", "--json"]
    assert main([*bench, "--fast-decode"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["path"] == "fast" and row["batch_size"] == 1 and row["decode_tok_s"] > 0
    assert main(["bench", "--quantization", "nf4", "--tp", "2"]) == 2
    assert "instead of --tp" in capsys.readouterr().err


@needs_triton
def test_more_rows_than_the_row_kernel_takes_go_through_the_tensor_core_kernel(prompt, monkeypatch):
    # a step of more than ROW_KERNEL_MAX_VECTORS rows: glmkit's tensor-core kernel (each weight looked up once for
    # all rows; "auto" picks it on a GPU up to FOUR_BIT_MAX_BATCH rows): each row gives generate()'s tokens
    from glmkit import gemv4bit

    model = _load("nf4")
    rows = gemv4bit.ROW_KERNEL_MAX_VECTORS + 1
    prompts = torch.cat([torch.cat([prompt[:, :1], prompt[:, 1:].roll(i, dims=1)], dim=1) for i in range(rows)])
    launched = []
    tensor_cores = gemv4bit._launch_tensor_cores
    monkeypatch.setattr(gemv4bit, "_launch_tensor_cores", lambda x, *a: launched.append(x.numel()) or tensor_cores(x, *a))
    fast = FastDecoder(model, max_len=prompt.shape[1] + 2, gemv="triton", batch_size=rows, compile=False,
                       cuda_graph=False, graph_batch_sizes=[rows])
    got = fast.generate(prompts, max_new_tokens=2, ignore_eos=True)
    assert launched and all(n // model.config.hidden_size > gemv4bit.ROW_KERNEL_MAX_VECTORS for n in launched)
    for i in range(rows):
        assert torch.equal(got[i:i + 1], _greedy(model, prompts[i:i + 1], 2)), i


def test_several_rows_of_4bit_q_k_v_are_one_gemm_of_their_weights_dequantized_side_by_side(monkeypatch):
    # (a prompt's q/k/v in the decoder's own prefill: one GEMM as a 16-bit model's fused q/k/v, not three)
    import glmkit.fast_decode as fast_decode
    from glmkit.gemv4bit import quantize, reference_linear

    g = torch.Generator().manual_seed(0)
    ws = tuple(quantize(torch.randn(n, 128, generator=g), "nf4") for n in (64, 32, 32))
    x, bias = torch.randn(1, 5, 128, generator=g), torch.randn(128, generator=g)
    want = torch.cat([reference_linear(x, w) for w in ws], dim=-1) + bias
    gemms, kernels = [], []
    real_linear, real_4bit = fast_decode.F.linear, fast_decode.linear_4bit
    monkeypatch.setattr(fast_decode.F, "linear", lambda *a, **k: gemms.append(a[1].shape) or real_linear(*a, **k))
    monkeypatch.setattr(fast_decode, "linear_4bit", lambda *a, **k: kernels.append(a[1].shape) or real_4bit(*a, **k))
    y = fast_decode.linear(x, ws, bias, False)
    assert gemms == [(128, 128)] and kernels == []  # one GEMM of all 128 rows
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    gemms.clear()
    one = fast_decode.linear(x[:, :1], ws, bias, False)  # one token: bitsandbytes' own kernel, weight by weight
    assert kernels == [(64, 128), (32, 128), (32, 128)]
    torch.testing.assert_close(one, want[:, :1], rtol=1e-4, atol=1e-4)
