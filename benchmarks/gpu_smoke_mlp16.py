"""Quick GPU check of glmkit's one-kernel batch-1 MLP (``glmkit.mlp16_one``; under a minute on an H200): its first-run
check in bf16 and fp16; GLM-4-9B's MLP and smaller ones (down rows in one chunk and in several, fewer units of gate/up
rows than CTAs) against fp32 and beside the two Triton GEMVs it replaces, launched twice (bitwise the same: the grid
barrier's counter goes on from launch to launch); the same launches in a CUDA graph with programmatic dependent
launch, replayed (bitwise the eager result); then a random GLM (hidden 1024, 2 KV heads) in bf16 and fp16 through
``FastDecoder``, whose batch-1 step takes the kernel, against the same step on the Triton GEMVs and against fp32, and
greedy tokens of the two; and the same model split in two stages on this GPU (accelerate's hooks), each stage with a
workspace of its own. Prints one line per check; exits non-zero where one fails.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_smoke_mlp16.py
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from accelerate import dispatch_model
from smoke_verdicts import finish, pdl_graph, verdict
from transformers import GlmConfig, GlmForCausalLM

from glmkit import mlp16_one
from glmkit.device_map import split_layers
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import gemv as triton_gemv
from glmkit.gemv import gemv_swiglu


def rel(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    """Relative error of a against b in what the MLP adds to x."""
    return ((a.float() - b.float()).norm() / (b.float() - x.float()).norm()).item()


for dtype in (torch.bfloat16, torch.float16):
    verdict(f"first-run check {dtype}", mlp16_one.check("cuda", dtype), "")

g = torch.Generator("cuda").manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for hidden, inter in ((4096, 13696), (1024, 2736), (256, 640), (512, 64)):
        x = torch.randn(1, 1, hidden, device="cuda", generator=g).to(dtype)
        wgu = (torch.randn(2 * inter, hidden, device="cuda", generator=g) * 0.02).to(dtype)
        wd = (torch.randn(hidden, inter, device="cuda", generator=g) * 0.02).to(dtype)
        norm = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
        name = f"{dtype} {hidden}x{inter}"
        if not mlp16_one.usable(x, wgu, wd):
            verdict(name, False, "not usable")
            continue
        ws = mlp16_one.Workspace(x.device, hidden, inter, dtype)
        want = mlp16_one.reference(x, wgu, wd, norm, 1e-5)
        got, again = (mlp16_one.mlp_16_one(x, wgu, wd, norm, 1e-5, ws) for _ in range(2))
        tri = triton_gemv(gemv_swiglu(x, wgu, norm_weight=norm), wd, residual=x)
        err, err_triton = rel(got, want, x), rel(tri, want, x)
        verdict(f"{name} against fp32", err < 1e-2 and err <= 2 * err_triton + 2e-3 and torch.equal(got, again),
                f"relative error {err:.2e} (Triton GEMVs {err_triton:.2e}); launched twice: the same bits")
        def launches(x=x, wgu=wgu, wd=wd, norm=norm, ws=ws) -> tuple[torch.Tensor, torch.Tensor]:
            first = mlp16_one.mlp_16_one(x, wgu, wd, norm, 1e-5, ws)
            return first, mlp16_one.mlp_16_one(first, wgu, wd, norm, 1e-5, ws)

        graph, (first, second) = pdl_graph(partial(mlp16_one.mlp_16_one, x, wgu, wd, norm, 1e-5, ws), launches)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        chained = mlp16_one.mlp_16_one(got, wgu, wd, norm, 1e-5, ws)
        verdict(f"{name} in a graph, PDL", torch.equal(first, got) and torch.equal(second, chained),
                "bitwise the eager result, two launches back to back, three replays")

config = GlmConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=128, attention_bias=True,
                   tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)
torch.manual_seed(0)
fp32 = GlmForCausalLM(config).cuda().eval()
with torch.no_grad():
    for pname, p in fp32.named_parameters():
        if pname.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        elif pname.endswith("bias"):
            p.normal_(0.0, 0.1)
ids = torch.randint(0, 2000, (1, 24), device="cuda", generator=g)
want_logits = fp32(torch.cat([ids, ids[:, -1:]], dim=1)).logits[0, -1].float()

calls: list[int] = []  # the decoders' layers' launches of the kernel (warm-up and capture: Python runs)
_real = mlp16_one.mlp_16_one


def _counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    calls.append(1)
    return _real(*args, **kwargs)


mlp16_one.mlp_16_one = _counted


def run(model: torch.nn.Module, triton_only: bool) -> tuple[torch.Tensor, list[int]]:
    with mlp16_one.turned_off() if triton_only else contextlib.nullcontext():
        dec = FastDecoder(model, max_len=64)
        dec.prefill(ids)
        dec.decode_step(ids[0, -1:], ids.shape[1])  # captures the graph
        dec.prefill(ids)
        logits = dec.decode_step(ids[0, -1:], ids.shape[1]).float().clone()
        return logits, dec.generate(ids, 24, ignore_eos=True)[0, ids.shape[1]:].tolist()


for dtype in (torch.bfloat16, torch.float16):
    model = GlmForCausalLM(config).cuda().eval()
    model.load_state_dict(fp32.state_dict())
    model = model.to(dtype)
    calls.clear()
    kernel, kernel_tokens = run(model, False)
    taken = len(calls)
    calls.clear()
    triton_only, triton_tokens = run(model, True)
    verdict(f"FastDecoder {dtype}: its layers launch the kernel (none when turned off)", taken > 0 and not calls,
            f"{taken} launches, turned off {len(calls)}")
    err, err_triton = (((a - want_logits).norm() / want_logits.norm()).item() for a in (kernel, triton_only))
    same = sum(a == b for a, b in zip(kernel_tokens, triton_tokens))
    verdict(f"FastDecoder {dtype} step against fp32", err <= 1.5 * err_triton + 1e-3,
            f"relative error {err:.2e} (Triton GEMVs {err_triton:.2e}); greedy tokens equal {same} of "
            f"{len(triton_tokens)}")
    # a layer split with both halves on this GPU (a map naming it twice: two stages, two graphs a step), as accelerate
    # dispatches it: each stage launches the kernel with a workspace of its own
    split = dispatch_model(model, split_layers(config, [2, 1], devices=[0, "cuda:0"]), main_device="cuda:0")
    calls.clear()
    split_logits, split_tokens = run(split, False)
    spaces = [st.mlp_workspace for st in FastDecoder(split, max_len=64).stages]
    split_err = ((split_logits - want_logits).norm() / want_logits.norm()).item()
    verdict(f"FastDecoder {dtype} over a split on one GPU",
            len(spaces) == 2 and None not in spaces and spaces[0] is not spaces[1] and len(calls) > 0
            and split_err <= 1.5 * err + 1e-3,
            f"{len(spaces)} stages, {len(calls)} launches; against fp32 {split_err:.2e} (one stage {err:.2e}); the "
            f"same bits as one stage: {torch.equal(split_logits, kernel)}; greedy tokens equal "
            f"{sum(a == b for a, b in zip(split_tokens, kernel_tokens))} of {len(kernel_tokens)}")
finish()
