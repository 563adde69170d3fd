"""glmkit.gemv16_one on a CPU: the batch-1 16-bit kernel compiled for an H100/H200 (sm_90), sm_80 and sm_89 by NVRTC,
read back with cuobjdump, its layout held against the shared memory the Python side asks for, the launch against the
kernel's own parameter list, and where the decoder takes it. The kernel itself runs on a GPU only: its first-run check
(``gemv16_one.check``), ``benchmarks/gpu_smoke_gemv16.py`` and ``benchmarks/gemv16_step.py`` check it there."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import named_launch_args
from test_gemv4bit_mma import _cuobjdump

from glmkit import fast_decode, gemv4bit_mma, gemv16_one
from glmkit.gemv import dependent_launches

pytest.importorskip("triton")  # its wheel carries cuobjdump; the dev extra installs it and NVRTC on Linux x86-64

FORMS = [  # (bf16, norm, bias, residual, role): what the decoder launches, and fp16
    (True, True, True, False, "qkv"),  # q/k/v with the input norm and the bias folded in
    (True, False, False, True, "o_proj"),  # o_proj and the residual add, the next kernel launched late
    (False, True, True, False, "qkv"),
    (True, False, False, False, "qkv"),  # nothing folded
]


@pytest.mark.parametrize("bf16, norm, bias, residual, role", FORMS)
@pytest.mark.parametrize("arch, smem", [("sm_90", gemv16_one.SMEM_H200), ("sm_80", gemv16_one.SMEM_H200),
                                        ("sm_89", 99 * 1024)])
def test_compiles_without_spills(bf16, norm, bias, residual, role, arch, smem, tmp_path):
    """Every form compiles at its shape for the card (an H200's, an RTX 4070's smaller one) with the layout the
    Python side sizes, keeps everything in registers (one CTA an SM: at most 65536 / threads each), copies with
    cp.async and multiplies on the tensor cores in x's type; on Hopper it reads nothing the kernel before writes
    and writes nothing before it waits, and lets the next kernel launch first thing or (o_proj) last."""
    shape = gemv16_one.shape_for(4096, smem, role)
    options = gemv16_one._options(bf16, norm, bias, residual, shape, role in gemv16_one.LATE_ROLES)
    cubin = gemv4bit_mma.compile_cubin([*options, f"-DEXPECT_X_AT={shape.x_at()}"], arch, gemv16_one.source(),
                                       gemv16_one.NAME)
    usage = _cuobjdump(cubin, "-res-usage", tmp_path)
    assert "LOCAL:0" in usage and "STACK:0 " in usage, usage
    threads = 32 * shape.groups * shape.warps
    assert int(re.search(r"REG:(\d+)", usage).group(1)) * threads <= 65536
    assert shape.smem_bytes(4096) <= smem
    sass = _cuobjdump(cubin, "-sass", tmp_path)
    assert "LDGSTS" in sass  # cp.async
    assert re.search(r"HMMA\.16816\.F32" + (r"\.BF16" if bf16 else r"\s"), sass)
    assert re.search(r"\bBAR\.SYNC(\.DEFER_BLOCKING)? R", sass)  # a group's barrier, its number in a register
    if arch == "sm_90":  # programmatic dependent launch
        before, wait, after = sass.partition("ACQBULK")
        assert wait and "LDGSTS" in before  # the first stages copied before the wait
        assert not re.search(r"\b(LD|LDG|ST|STG|RED|ATOM|ATOMG)\.", before)  # nothing else read or written
        late = role in gemv16_one.LATE_ROLES
        assert ("PREEXIT" in before) != late and ("PREEXIT" in after) == late
        if late:  # after the last copies have landed: the end of the CTA's work
            assert after.rindex("PREEXIT") > after.rindex("LDGDEPBAR")


def test_the_layout_must_match_the_shared_memory_asked_for():
    """A shape whose layout the kernel would place elsewhere does not compile (the tests' static_assert)."""
    shape = gemv16_one.ROLES["qkv"]
    options = gemv16_one._options(True, True, True, False, shape)
    with pytest.raises(RuntimeError, match="X_AT"):
        gemv4bit_mma.compile_cubin([*options, f"-DEXPECT_X_AT={shape.x_at() + 16}"], "sm_90", gemv16_one.source(),
                                   gemv16_one.NAME)


@pytest.mark.parametrize("role, fold", [("qkv", "norm"), ("o_proj", "residual"), ("qkv", None)])
def test_launch_matches_the_kernels_parameters(role, fold, monkeypatch):
    """What ``gemv_16_one`` hands the kernel: a tensor for every pointer, an int or a float (a C double) for every
    number, in order; one CTA an SM less the SMs it leaves (only with programmatic dependent launch, at most
    ``LEAVE_SMS_MAX``), fewer when there are fewer tiles; the shared memory and options of the role's shape."""
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append((a, k)))
    monkeypatch.setattr(gemv4bit_mma, "dependent_launch_refused", lambda device: False)
    h200 = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=gemv16_one.SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    n, k = 4600, 1024
    x = torch.randn(1, 1, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    kwargs = {"norm": dict(bias=torch.zeros(n, dtype=x.dtype), norm_weight=torch.ones(k), eps=1e-6),
              "residual": dict(residual=torch.zeros(1, 1, n, dtype=x.dtype)), None: {}}[fold]
    y = gemv16_one.gemv_16_one(x, w, **kwargs, role=role, leave_sms=4)
    assert y.shape == (1, 1, n) and y.dtype == x.dtype
    (device, options, grid, block, args, shared, source, name), launch_kwargs = launches[0]
    assert source == gemv16_one.source() and name == gemv16_one.NAME
    named = named_launch_args(source, name, args)
    shape = gemv16_one.shape_for(k, role=role)
    assert grid == (132, 1, 1) and block == (32 * shape.groups * shape.warps, 1, 1)  # no SMs left without PDL
    assert shared == shape.smem_bytes(k) and launch_kwargs == {"pdl": False}
    assert f"-DLATE={int(role == 'o_proj')}" in options and f"-DWARPS={shape.warps}" in options
    assert f"-DNORM={int(fold == 'norm')}" in options and f"-DRESIDUAL={int(fold == 'residual')}" in options
    assert named["y"] is y and named["n"] == n and named["k"] == k and named["w"] is w
    if fold == "norm":
        assert named["norm_weight"].dtype == x.dtype and named["eps"] == 1e-6  # read in x's type
    with dependent_launches():
        gemv16_one.gemv_16_one(x, w, **kwargs, role=role, leave_sms=4)
        gemv16_one.gemv_16_one(x, w, **kwargs, role=role, leave_sms=9)  # too many to leave an SM each: none
        gemv16_one.gemv_16_one(w[:40, :].contiguous().view(1, 1, -1)[..., :k], w[:40], role=role)  # 3 tiles
    assert launches[1][0][2] == (128, 1, 1) and launches[1][1] == {"pdl": True}
    assert launches[2][0][2] == (132, 1, 1) and launches[3][0][2] == (3, 1, 1)


def test_shapes_for_each_role_and_card():
    """GLM-4-9B's q/k/v and o_proj get their shipped shapes on an H200 and smaller ones where a CTA may take less
    shared memory; rows that are not whole stages of every warp's run, and an unknown role, are refused."""
    for role in ("qkv", "o_proj"):
        h200 = gemv16_one.shape_for(4096, role=role)
        assert h200 == gemv16_one.ROLES[role] and h200.smem_bytes(4096) <= gemv16_one.SMEM_H200
        small = gemv16_one.shape_for(4096, 99 * 1024, role)
        assert small.smem_bytes(4096) <= 99 * 1024 and small.groups * small.warps < h200.groups * h200.warps
        assert gemv16_one.shape_for(4096 + 64, role=role) is None  # the Triton GEMV takes those rows
        assert gemv16_one.shape_for(4096, 8 * 1024, role) is None
    # rows shorter than every warp's whole stages at the measured shape (the trained tiny GLM's 256): Triton
    assert gemv16_one.shape_for(512, role="qkv") is not None and gemv16_one.shape_for(512, role="o_proj") is None
    assert gemv16_one.shape_for(256, role="qkv") is None
    with pytest.raises(ValueError, match="launch shapes for"):
        gemv16_one.shape_for(4096, role="gate_up")


def test_cpu_and_turned_off_stay_with_triton(monkeypatch):
    """On a CPU (and turned off anywhere) nothing takes the kernel, its check says so without running anything, and
    the decoder's layer gets no SMs left: its q/k/v and o_proj take the Triton GEMV."""
    x, w = torch.zeros(1, 1, 4096, dtype=torch.bfloat16), torch.zeros(4608, 4096, dtype=torch.bfloat16)
    assert not gemv16_one.usable(x, w) and not gemv16_one.check("cpu") and not gemv16_one.runs_on("cpu", x.dtype)
    assert fast_decode.gemv16_sms_left(x, w, w[:4096], "triton", 4) == 0
    with gemv16_one.turned_off():
        assert not gemv16_one.runs_on("cuda", torch.bfloat16)
        with gemv16_one.turned_off():
            pass
        assert gemv16_one._SWITCH.depth == 1
    assert gemv16_one._SWITCH.depth == 0
    monkeypatch.setenv("GLMKIT_16BIT_KERNEL", "triton")
    assert not gemv16_one.runs_on("cuda", torch.bfloat16)


def test_the_decoder_gives_it_only_steps_that_leave_sms(monkeypatch):
    """``gemv16_sms_left``: the SMs q/k/v leaves to the attention where glmkit's kernel takes q/k/v and o_proj, and
    0 (the Triton GEMVs) where the attention's programs are none or too many, no SMs are left (no programmatic
    dependent launch), in fp16, inside torch.compile's trace (a compiled layer: the kernel's checks read pointers),
    or where the Triton GEMV would not run; the first-run check is asked last (it launches kernels), and only then."""
    asked = []
    monkeypatch.setattr(gemv16_one, "usable", lambda x, w, role="qkv": True)
    monkeypatch.setattr(gemv16_one, "takes", lambda w, dtype, device, role="qkv": True)
    monkeypatch.setattr(gemv16_one, "check", lambda device, dtype: asked.append(dtype) or True)
    leaves = [True]
    monkeypatch.setattr(gemv16_one, "sms_left",
                        lambda device, programs: programs if leaves[0] and programs <= gemv16_one.LEAVE_SMS_MAX else 0)
    cuda = SimpleNamespace(type="cuda")
    x = SimpleNamespace(device=cuda, dtype=torch.bfloat16, numel=lambda: 4096, shape=(1, 1, 4096))
    w = torch.zeros(8, 4096)
    assert fast_decode.gemv16_sms_left(x, w, w, "triton", 4) == 4 and asked == [torch.bfloat16]
    assert fast_decode.gemv16_sms_left(x, w, w, "triton", 0) == 0
    assert fast_decode.gemv16_sms_left(x, w, w, "triton", gemv16_one.LEAVE_SMS_MAX + 1) == 0
    assert fast_decode.gemv16_sms_left(x, w, w, False, 4) == 0  # cuBLAS steps
    fp16 = SimpleNamespace(device=cuda, dtype=torch.float16, numel=lambda: 4096, shape=(1, 1, 4096))
    assert fast_decode.gemv16_sms_left(fp16, w, w, "triton", 4) == 0
    leaves[0] = False  # no programmatic dependent launch (pdl=False, a card before Hopper): no SMs left
    assert fast_decode.gemv16_sms_left(x, w, w, "triton", 4) == 0
    leaves[0] = True
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fast_decode.gemv16_sms_left(x, w, w, "triton", 4) == 0
    assert asked == [torch.bfloat16]


def test_an_explicit_shape_must_take_whole_stages(monkeypatch):
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: None)
    h200 = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=gemv16_one.SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    x, w = torch.zeros(1, 1, 1024, dtype=torch.bfloat16), torch.zeros(16, 1024, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="whole stages"):
        gemv16_one.gemv_16_one(x, w, shape=gemv16_one.Shape16(1, 16, 3, 2))  # 64 columns a warp
