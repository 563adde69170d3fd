"""Quick GPU check of glmkit's batch-1 16-bit CUDA kernel (``glmkit.gemv16_one``; about a minute on an H200): its
first-run check in bf16 and fp16; q/k/v (norm and bias folded in) and o_proj (residual add) at GLM-4-9B's shapes and
at rows that end inside a tile, against fp32 and beside the Triton GEMV; the same launches in a CUDA graph with
programmatic dependent launch (bitwise the eager result); then a random GLM of GLM-4-9B's head shape (head_dim 128,
2 KV heads, hidden 1024) in bf16 through ``FastDecoder``, whose batch-1 step takes the kernel, against the same step on
the Triton GEMVs and against fp32. Prints one line per check; exits non-zero where one fails.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_smoke_gemv16.py
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from smoke_verdicts import finish, pdl_graph, verdict
from transformers import GlmConfig, GlmForCausalLM

from glmkit import fast_decode, gemv16_one
from glmkit.attention import Grid
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import dependent_launches
from glmkit.gemv import gemv as triton_gemv


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


for dtype in (torch.bfloat16, torch.float16):
    verdict(f"first-run check {dtype}", gemv16_one.check("cuda", dtype), "")

g = torch.Generator("cuda").manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for n, k in ((4608, 4096), (4096, 4096), (4600, 4096), (40, 1024)):
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype)
        x = torch.randn(1, 1, k, device="cuda", generator=g).to(dtype)
        bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype)
        norm = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype)
        residual = torch.randn(1, 1, n, device="cuda", generator=g).to(dtype)
        for role, form in (("qkv", dict(bias=bias, norm_weight=norm)), ("o_proj", dict(residual=residual))):
            if not gemv16_one.usable(x, w, role):
                verdict(f"{dtype} {n}x{k} {role}", k % 1024 != 0, "not usable (rows of this width take Triton)")
                continue
            want = gemv16_one._reference(x, w, form.get("bias"), form.get("norm_weight"), 1e-5, form.get("residual"))
            got = gemv16_one.gemv_16_one(x, w, **form, role=role)
            tri = triton_gemv(x, w, form.get("bias"), norm_weight=form.get("norm_weight"), residual=form.get("residual"))
            err, err_triton = rel(got, want), rel(tri, want)
            verdict(f"{dtype} {n}x{k} {role} against fp32", err < 1e-2 and err <= 2 * err_triton + 1e-3,
                    f"relative error {err:.2e} (Triton GEMV {err_triton:.2e})")
            def launches(x=x, w=w, form=form, role=role) -> tuple[torch.Tensor, torch.Tensor]:
                return (gemv16_one.gemv_16_one(x, w, **form, role=role, leave_sms=4),
                        gemv16_one.gemv_16_one(x, w, **form, role=role))

            graph, (first, second) = pdl_graph(partial(gemv16_one.gemv_16_one, x, w, **form, role=role, leave_sms=4),
                                               launches)
            graph.replay()
            torch.cuda.synchronize()
            verdict(f"{dtype} {n}x{k} {role} in a graph, PDL", torch.equal(first, got) and torch.equal(second, got),
                    "bitwise the eager result")

config = GlmConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=128, attention_bias=True,
                   tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=0,
                   eos_token_id=None)
torch.manual_seed(0)
fp32 = GlmForCausalLM(config).cuda().eval()
with torch.no_grad():  # (transformers' init: norm weights 1 and biases 0, under which both kernels' roundings agree)
    for name, p in fp32.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
bf16 = GlmForCausalLM(config).cuda().eval()
bf16.load_state_dict(fp32.state_dict())
bf16 = bf16.to(torch.bfloat16)
ids = torch.randint(0, 2000, (1, 24), device="cuda", generator=g)
layer = bf16.model.layers[0]
x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
wqkv = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
programs = Grid.of(1, 2, 64, True, early=True).programs
with dependent_launches():
    left = fast_decode.gemv16_sms_left(x, wqkv, layer.self_attn.o_proj.weight, "triton", programs)
verdict("FastDecoder's step takes the kernel", left == programs, f"SMs left to the attention: {left} of {programs}")


calls: list[str] = []  # the roles the decoders' layers launched the kernel for (warm-up and capture: Python runs)
_real = gemv16_one.gemv_16_one


def _counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    calls.append(kwargs.get("role", "qkv"))
    return _real(*args, **kwargs)


gemv16_one.gemv_16_one = _counted


def step_logits(model: torch.nn.Module, triton_only: bool) -> torch.Tensor:
    ctx = gemv16_one.turned_off() if triton_only else contextlib.nullcontext()
    with ctx:
        dec = FastDecoder(model, max_len=64)
        dec.prefill(ids)
        dec.decode_step(ids[0, -1:], ids.shape[1])  # captures the graph
        dec.prefill(ids)
        return dec.decode_step(ids[0, -1:], ids.shape[1]).float().clone()


want = fp32(torch.cat([ids, ids[:, -1:]], dim=1)).logits[0, -1].float()
cuda = step_logits(bf16, False)
taken = sorted(set(calls))
calls.clear()
triton_only = step_logits(bf16, True)
verdict("FastDecoder's layers launch the kernel (none when turned off)", taken == ["o_proj", "qkv"] and not calls,
        f"roles {taken}, turned off {sorted(set(calls))}")
verdict("FastDecoder bf16 step against fp32", rel(cuda, want) <= 1.5 * rel(triton_only, want) + 1e-3
        and not torch.equal(cuda, triton_only),
        f"relative error {rel(cuda, want):.2e} (Triton GEMVs {rel(triton_only, want):.2e}); the two "
        f"{rel(cuda, triton_only):.2e} apart")
finish()
