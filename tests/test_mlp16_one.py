"""glmkit.mlp16_one on a CPU: the one-kernel batch-1 MLP compiled for Hopper (sm_90) by NVRTC and read back with
cuobjdump, its layout held against the shared memory the Python side asks for, the launch against the kernel's own
parameter list, the split of the work over CTAs, what it computes against GLM's own MLP, and where the decoder takes
it. The kernel itself runs on a GPU only: its first-run check (``mlp16_one.check``), ``benchmarks/gpu_smoke_mlp16.py``
and ``benchmarks/mlp16_step.py`` check it there."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import named_launch_args
from test_gemv4bit_mma import _cuobjdump

from glmkit import fast_decode, gemv4bit_mma, mlp16_one
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import dependent_launches
from glmkit.gemv4bit_one import SMEM_H200
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR

pytest.importorskip("triton")  # its wheel carries cuobjdump; the dev extra installs it and NVRTC on Linux x86-64

SHAPES = [(4096, 13696), (256, 640), (1024, 2736), (512, 64)]  # GLM-4-9B, the trained tiny GLM, the check's


@pytest.mark.parametrize("hidden, inter", SHAPES)
@pytest.mark.parametrize("bf16", [True, False])
def test_compiles_without_spills(hidden, inter, bf16, tmp_path):
    """Each shape compiles for Hopper with the layout the Python side sizes and keeps everything in registers (one
    CTA an SM: at most 65536 / threads each); it copies with TMA bulk copies completing on shared-memory barriers,
    waits for the kernel before (programmatic dependent launch), lets the next one launch, and meets the other
    CTAs at a grid barrier (a 64-bit atomic add)."""
    shape = mlp16_one.shape_for(hidden, inter)
    cubin = gemv4bit_mma.compile_cubin([*shape.options(bf16), f"-DEXPECT_SMEM={shape.smem_bytes()}"], "sm_90",
                                       mlp16_one.source(), mlp16_one.NAME)
    usage = _cuobjdump(cubin, "-res-usage", tmp_path)
    assert "LOCAL:0" in usage and "STACK:0 " in usage, usage
    assert int(re.search(r"REG:(\d+)", usage).group(1)) * (hidden // 8 + 32) <= 65536
    assert shape.smem_bytes() <= SMEM_H200
    sass = _cuobjdump(cubin, "-sass", tmp_path)
    for op in ("UBLKCP", "SYNCS.PHASECHK", "SYNCS.ARRIVE", "ACQBULK", "PREEXIT", "ATOMG.E.ADD.64"):
        assert op in sass, op


def test_the_layout_must_match_the_shared_memory_asked_for():
    """A layout the kernel would place elsewhere does not compile (the tests' static_assert), nor a down row whose
    chunks do not add up."""
    shape = mlp16_one.shape_for(4096, 13696)
    with pytest.raises(RuntimeError, match="SMEM_END"):
        gemv4bit_mma.compile_cubin([*shape.options(True), f"-DEXPECT_SMEM={shape.smem_bytes() + 16}"], "sm_90",
                                   mlp16_one.source(), mlp16_one.NAME)
    bad = [o.replace("-DNCH=4", "-DNCH=3") for o in shape.options(True)]
    with pytest.raises(RuntimeError, match="chunks of a down row"):
        gemv4bit_mma.compile_cubin(bad, "sm_90", mlp16_one.source(), mlp16_one.NAME)


def test_shapes():
    """GLM-4-9B's MLP reads its down rows in 4 chunks of 3424 columns with the full ring; a card with less shared
    memory gets fewer slots; sizes the kernel cannot split, and rows wider than measured, are refused (the Triton
    GEMVs take them)."""
    glm = mlp16_one.shape_for(4096, 13696)
    assert (glm.chunks, glm.chunk, glm.ring) == (4, 3424, mlp16_one.RING) and glm.smem_bytes() <= SMEM_H200
    small = mlp16_one.shape_for(4096, 13696, 99 * 1024)
    assert 2 <= small.ring < glm.ring and small.smem_bytes() <= 99 * 1024
    assert mlp16_one.shape_for(4096, 13696, 32 * 1024) is None  # not even 2 slots
    assert small.smem_bytes() + mlp16_one.STATIC_SMEM <= 99 * 1024  # beside what the mbarriers take
    for hidden, inter in ((4096 + 64, 13696), (4096 + 256, 13696), (7936, 13696), (4096, 13696 + 4), (128, 640),
                          (4096, 8 * 4099)):
        assert mlp16_one.shape_for(hidden, inter) is None, (hidden, inter)
    assert mlp16_one.shape_for(256, 640).chunk * mlp16_one.shape_for(256, 640).chunks == 640


@pytest.mark.parametrize("hidden, inter, ctas", [(4096, 13696, 132), (4096, 13696, 114), (256, 640, 132),
                                                 (512, 64, 132), (1024, 2736, 78)])
def test_work_is_split_evenly(hidden, inter, ctas):
    """Every down row goes to exactly one CTA, at most ``MAX_ROWS`` each, and the rows left over go to the CTAs with
    one unit of gate/up rows fewer: no CTA reads more than one unit's or one row's bytes above another."""
    starts = mlp16_one.row_starts(hidden, ctas, inter)
    rows = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] == hidden and len(rows) == ctas and max(rows) <= mlp16_one.MAX_ROWS
    units = inter // 8
    per_cta_units = [len(range(c, units, ctas)) for c in range(ctas)]
    unit_bytes, row_bytes = 16 * hidden * 2, inter * 2
    load = [u * unit_bytes + r * row_bytes for u, r in zip(per_cta_units, rows)]
    assert max(load) - min(load) <= max(unit_bytes, row_bytes)
    if min(rows) < max(rows) and min(per_cta_units) < max(per_cta_units):
        fewer = {c for c in range(ctas) if per_cta_units[c] < max(per_cta_units)}
        more_rows = {c for c in range(ctas) if rows[c] > min(rows)}
        assert more_rows <= fewer or fewer <= more_rows


def test_launch_matches_the_kernels_parameters(monkeypatch):
    """What ``mlp_16_one`` hands the kernel: a tensor for every pointer, an int or a float (a C double) for every
    number, in order; one CTA an SM, a consumer thread per 8 columns and a producer warp, the shape's shared memory
    and options; programmatic dependent launch inside ``dependent_launches`` only. A workspace of other sizes is
    refused."""
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append((a, k)))
    h200 = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    hidden, inter = 1024, 2736
    x = torch.randn(1, 1, hidden, dtype=torch.bfloat16)
    wgu, wd = torch.randn(2 * inter, hidden, dtype=x.dtype), torch.randn(hidden, inter, dtype=x.dtype)
    ws = mlp16_one.Workspace(x.device, hidden, inter, x.dtype)
    y = mlp16_one.mlp_16_one(x, wgu, wd, torch.ones(hidden), 1e-6, ws)
    assert y.shape == x.shape and y.dtype == x.dtype
    (device, options, grid, block, args, shared, source, name), launch_kwargs = launches[0]
    named = named_launch_args(source, name, args)
    shape = mlp16_one.shape_for(hidden, inter)
    assert source == mlp16_one.source() and name == mlp16_one.NAME
    assert grid == (132, 1, 1) and block == (hidden // 8 + 32, 1, 1) and shared == shape.smem_bytes()
    assert options == shape.options(True) and launch_kwargs == {"pdl": False}
    assert named["y"] is y and named["wgu"] is wgu and named["wd"] is wd and named["eps"] == 1e-6
    assert named["norm_weight"].dtype == x.dtype  # read in x's type
    assert named["hbuf"] is ws.h and named["counter"] is ws.counter and named["row_start"] is ws.row_start
    assert ws.row_start.tolist() == mlp16_one.row_starts(hidden, 132, inter)
    with dependent_launches():
        mlp16_one.mlp_16_one(x, wgu, wd, torch.ones(hidden), 1e-6, ws)
    assert launches[1][1] == {"pdl": True}
    with pytest.raises(ValueError, match="Workspace"):
        mlp16_one.mlp_16_one(x, wgu[:2048], wd[:, :1024], torch.ones(hidden), 1e-6, ws)
    with pytest.raises(ValueError, match="132 SMs"):  # a grid the barrier would wait on forever, or rows left out
        mlp16_one.mlp_16_one(x, wgu, wd, torch.ones(hidden), 1e-6, mlp16_one.Workspace(x.device, hidden, inter,
                                                                                       x.dtype, ctas=140))


def test_a_first_launch_that_fails_turns_it_off(monkeypatch):
    """The first launch at a shape on a GPU is watched: where it raises, the kernel is turned off there (with the
    reason) and the caller told to take the Triton GEMVs; once a shape has launched, an error is the caller's."""
    turned_off, calls = [], []
    monkeypatch.setattr(gemv4bit_mma, "disable", lambda device, why, name, label: turned_off.append((why, name)))
    monkeypatch.setattr(mlp16_one, "_LAUNCHED", set())

    def launch(*args):
        calls.append(args)
        if len(calls) in (1, 3):
            raise RuntimeError("cuLaunchKernelEx failed with CUDA error 1")
        return args[0] + 1

    monkeypatch.setattr(mlp16_one, "mlp_16_one", launch)
    x, wd = torch.zeros(1, 1, 512), torch.zeros(512, 1024)
    assert mlp16_one.mlp_16_one_or_off(x, None, wd, None, 1e-5, None) is None
    assert turned_off == [("RuntimeError: cuLaunchKernelEx failed with CUDA error 1", mlp16_one.NAME)]
    assert torch.equal(mlp16_one.mlp_16_one_or_off(x, None, wd, None, 1e-5, None), x + 1)
    with pytest.raises(RuntimeError, match="error 1"):
        mlp16_one.mlp_16_one_or_off(x, None, wd, None, 1e-5, None)
    assert len(turned_off) == 1


def test_reference_is_glms_mlp_and_residual_add():
    """What the kernel computes (``reference``) is the trained tiny GLM's own MLP after its post-attention norm, plus
    the residual: exactly in fp32, within bf16's rounding in bf16."""
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    layer = model.model.layers[1]
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    eps = layer.post_attention_layernorm.variance_epsilon
    with torch.no_grad():
        want = x + layer.mlp(layer.post_attention_layernorm(x))
        weights = (layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight, layer.post_attention_layernorm.weight)
        got = mlp16_one.reference(x, *weights, eps)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        bf16 = mlp16_one.reference(x.bfloat16(), *(w.bfloat16() for w in weights), eps).float()
    assert ((bf16 - want).norm() / (want - x).norm()).item() < 2e-2


def test_cpu_turned_off_and_the_decoders_choice(monkeypatch):
    """On a CPU (and turned off anywhere) nothing takes the kernel and its check says so without running anything;
    a decoder on a CPU holds no workspace for it. ``mlp16_takes``: only on the Triton step, uncompiled, with the
    decoder's workspace of the right sizes and where the kernel takes the weights; its first-run check asked last."""
    x = torch.zeros(1, 1, 4096, dtype=torch.bfloat16)
    wgu, wd = torch.zeros(2 * 13696, 4096, dtype=x.dtype), torch.zeros(4096, 13696, dtype=x.dtype)
    assert not mlp16_one.usable(x, wgu, wd) and not mlp16_one.check("cpu") and not mlp16_one.runs_on("cpu", x.dtype)
    with mlp16_one.turned_off():
        assert not mlp16_one.runs_on("cuda", torch.bfloat16)
    monkeypatch.setenv("GLMKIT_MLP_KERNEL", "triton")
    assert not mlp16_one.runs_on("cuda", torch.bfloat16)
    monkeypatch.delenv("GLMKIT_MLP_KERNEL")
    decoder = FastDecoder(load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu"), max_len=16)
    assert all(st.mlp_workspace is None for st in decoder.stages)

    asked = []
    monkeypatch.setattr(mlp16_one, "usable", lambda x, wgu, wd: True)
    monkeypatch.setattr(mlp16_one, "check", lambda device, dtype: asked.append(dtype) or True)
    ws = mlp16_one.Workspace(x.device, 4096, 13696, x.dtype, ctas=132)
    assert fast_decode.mlp16_takes(x, wgu, wd, "triton", ws) and asked == [torch.bfloat16]
    assert not fast_decode.mlp16_takes(x, wgu, wd, "triton", None)
    assert not fast_decode.mlp16_takes(x, wgu, wd, False, ws)  # cuBLAS steps
    assert not fast_decode.mlp16_takes(x, wgu[:2048], wd[:, :1024], "triton", ws)  # not this workspace's sizes
    assert not fast_decode.mlp16_takes(x.float(), wgu, wd, "triton", ws)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fast_decode.mlp16_takes(x, wgu, wd, "triton", ws)
    assert asked == [torch.bfloat16]
