"""glmkit.gemv4bit_one on a CPU: the batch-1 kernel compiled for an H100/H200 (sm_90) and for sm_80 by NVRTC, read
back with cuobjdump, and the launch the Python side builds held against the kernel's own parameter list. The kernel
itself runs on a GPU only: its first-run check (``gemv4bit.check_one``), ``benchmarks/gpu_smoke_4bit.py`` and
``benchmarks/nf4_one.py`` check its products there."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import named_launch_args
from test_gemv4bit_mma import _cuobjdump

from glmkit import gemv4bit, gemv4bit_mma, gemv4bit_one
from glmkit.gemv import dependent_launches
from glmkit.gemv4bit import quantize

pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")  # its wheel carries cuobjdump; the dev extra installs it and NVRTC on Linux x86-64


@pytest.mark.parametrize("bf16, swiglu, bias, segments, normed, residual, k", [
    (True, False, True, 3, True, False, 4096),  # GLM's q/k/v with the input norm folded in
    (True, False, False, 1, False, True, 4096),  # o_proj, then the residual add and the next norm's stream
    (True, False, False, 1, False, True, 13696),  # down_proj (x read from shared memory: too long for registers)
    (True, True, False, 1, True, False, 4096),  # gate/up with SwiGLU
    (False, False, True, 3, False, False, 4096),  # fp16, nothing folded
])
@pytest.mark.parametrize("arch, smem", [("sm_90", gemv4bit_one.SMEM_H200), ("sm_80", gemv4bit_one.SMEM_H200),
                                        ("sm_89", 99 * 1024)])
def test_compiles_without_spills(bf16, swiglu, bias, segments, normed, residual, k, arch, smem, tmp_path,
                                 f16_products=True, monkeypatch=None):
    """Every form the decoders launch compiles at its shipped shape (an H200's, an RTX 4070's narrower one), keeps
    everything in registers (16 warps an SM: at most 128 each), and does what the design says: copies with cp.async,
    products on the tensor cores in fp16 (a bf16 x converted as it is staged, after the largest value is found:
    ``F16_PRODUCTS``), lookups from shared memory after a byte permute, each group of warps on its own barrier; x held
    in registers for rows of 4096 columns (its only 16-byte shared loads: two a slot, once a launch), read from shared
    memory each stage for down_proj's."""
    if monkeypatch is not None:
        monkeypatch.setattr(gemv4bit_one, "F16_PRODUCTS", f16_products)
    f16_products = gemv4bit_one.F16_PRODUCTS  # (what the options below are built with)
    shape = gemv4bit_one.shape_for(swiglu, k, smem)
    options = gemv4bit_one._options(bf16, swiglu, bias, segments, normed, residual, shape, k)
    scaled = bf16 and f16_products
    in_registers = gemv4bit_one.data_stages(shape, k) <= gemv4bit_one.X_REGS_MAX
    assert in_registers == (k == 4096) and f"-DX_REGS={int(in_registers)}" in options
    cubin = gemv4bit_mma.compile_cubin(options, arch, gemv4bit_one.source(), gemv4bit_one.NAME)
    usage = _cuobjdump(cubin, "-res-usage", tmp_path)
    # nothing spilled to memory
    assert "LOCAL:0" in usage and "STACK:0 " in usage, usage
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    assert registers * 32 * shape.groups * shape.warps <= 65536
    assert shape.smem_bytes(swiglu, k) <= smem
    sass = _cuobjdump(cubin, "-sass", tmp_path)
    assert "LDGSTS" in sass  # cp.async
    assert re.search(r"HMMA\.16816\.F32" + (r"\.BF16" if bf16 and not f16_products else r"\s"), sass)
    # a bf16 x's largest value: a warp's (REDUX), then the CTA's; then x times a power of two, to fp16 (F2FP)
    assert bool("REDUX" in sass and re.search(r"\bF2FP(\.F16\.F32)?\.PACK_AB\b", sass)) == scaled
    assert sass.count(" PRMT ") >= 16 and len(re.findall(r"\bLDS\b", sass)) >= 16
    assert re.search(r"\bBAR\.SYNC(\.DEFER_BLOCKING)? R", sass)  # a group's barrier, its number in a register
    wide_loads = len(re.findall(r"\bLDS\.128\b", sass))
    assert wide_loads == 4 if in_registers else wide_loads > 4  # (4 stages: 2 slots of x, two 16-byte loads each)
    if arch == "sm_90":  # programmatic dependent launch: the next kernel may launch; wait for the one before
        before, wait, _ = sass.partition("ACQBULK")
        assert wait and "PREEXIT" in before
        # before the wait only the weights' copies (LDGSTS) and the lookup table's two values a thread: nothing that
        # the kernel before writes is read, and nothing is written (the compiler once moved x's 16-byte loads up)
        assert not re.search(r"\b(LD|ST|STG|RED|ATOM|ATOMG)\.", before)
        assert re.findall(r"\bLDG\.[A-Z0-9.]+", before) == ["LDG.E.CONSTANT"] * 2


def test_compiles_with_bf16_products(tmp_path, monkeypatch):
    """``F16_PRODUCTS = False``: a bf16 x's products on the tensor cores in bf16, x staged as it is."""
    test_compiles_without_spills(True, False, True, 3, True, False, 4096, "sm_90", gemv4bit_one.SMEM_H200, tmp_path,
                                 f16_products=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("swiglu, heights, fold", [(False, (40, 16, 24), "normed"), (True, (2 * 40,), None),
                                                    (False, (100,), "residual")])
def test_launch_matches_the_kernels_parameters(swiglu, heights, fold, monkeypatch):
    """What ``gemv_4bit_one`` hands the kernel: a tensor for every pointer, an int or a float for every number, in
    order; one CTA an SM, fewer when there are fewer tiles of 16 rows; the shared memory its shape says."""
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append((a, k)))
    h200 = SimpleNamespace(multi_processor_count=4, shared_memory_per_block_optin=gemv4bit_one.SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    ws = tuple(quantize(torch.randn(h, 128), "nf4") for h in heights)
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    n = heights[0] // 2 if swiglu else sum(heights)
    tiles = gemv4bit_one.tiles(list(heights), swiglu)
    fold_args = {}
    if fold == "normed":
        fold_args = dict(squares=torch.ones(3), eps=1e-6)
    elif fold == "residual":
        fold_args = dict(residual=torch.zeros(1, 1, n, dtype=x.dtype), norm_weight=torch.ones(n),
                         scaled=torch.empty(1, 1, n, dtype=x.dtype), partials=torch.empty(tiles))
    y = gemv4bit_one.gemv_4bit_one(x, ws, torch.zeros(n) if fold == "normed" else None, swiglu, **fold_args)
    assert y.shape == (1, 1, n) and y.dtype == x.dtype
    (device, options, grid, block, args, shared, source, name), _ = launches[0]
    assert source == gemv4bit_one.source() and name == gemv4bit_one.NAME
    named = named_launch_args(source, name, args)
    shape = gemv4bit_one.shape_for(swiglu, 128)
    assert grid == (min(4, tiles), 1, 1) and block == (32 * shape.groups * shape.warps, 1, 1)
    assert shared == shape.smem_bytes(swiglu, 128) and device == x.device
    assert launches[0][1] == {"pdl": False}  # programmatic dependent launch only inside dependent_launches
    with dependent_launches():
        gemv4bit_one.gemv_4bit_one(x, ws, torch.zeros(n) if fold == "normed" else None, swiglu, **fold_args)
    assert launches[1][1] == {"pdl": True}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 9))  # no PDL before Hopper
    with dependent_launches():
        gemv4bit_one.gemv_4bit_one(x, ws, torch.zeros(n) if fold == "normed" else None, swiglu, **fold_args)
    assert launches[2][1] == {"pdl": False}
    assert named["y"] is y and named["chunks"] == 2 and named["tiles"] == tiles
    assert f"-DNORMED={int(fold == 'normed')}" in options and f"-DRESIDUAL={int(fold == 'residual')}" in options
    assert f"-DSWIGLU={int(swiglu)}" in options and f"-DSEGMENTS={len(heights)}" in options
    assert named["q1"] is ws[min(1, len(ws) - 1)].data  # q, k and v in their slots, unused slots repeat the first
    if fold == "normed":
        assert named["squares"] is fold_args["squares"] and named["n_squares"] == 3 and named["eps"] == 1e-6
        assert named["bias"].dtype == x.dtype  # read in x's type
    if fold == "residual":
        assert named["partials"] is fold_args["partials"] and named["scaled"] is fold_args["scaled"]
        assert named["norm_weight"].dtype == x.dtype


def test_a_launch_takes_the_shape_tuned_for_this_card_where_it_fits(monkeypatch):
    """A tuned shape for the launch's rows and columns (``glmkit tune``, read through
    ``glmkit.gemv.active_cuda_shapes``) is what the kernel is launched with: its threads and shared memory; one that
    does not fit this card's shared memory, or none, leaves the untuned default (``shape_for``)."""
    import glmkit.gemv

    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append(a))
    card = SimpleNamespace(multi_processor_count=4, shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 9))
    ws = (quantize(torch.randn(48, 128), "nf4"),)
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    tuned = gemv4bit_one.OneShape(1, 2, 3, False)
    too_big = gemv4bit_one.OneShape(8, 8, 4, True)
    assert too_big.smem_bytes(False, 128) > 99 * 1024 >= tuned.smem_bytes(False, 128)
    default = gemv4bit_one.shape_for(False, 128, 99 * 1024)
    for table, want in (({}, default), ({(gemv4bit_one.TABLE_KERNEL, 48, 128): vars(tuned)}, tuned),
                        ({(gemv4bit_one.TABLE_KERNEL, 48, 128): vars(too_big)}, default),
                        ({(gemv4bit_one.TABLE_KERNEL, 40, 128): vars(tuned)}, default)):  # another launch's rows
        monkeypatch.setattr(glmkit.gemv, "_ACTIVE_CUDA", table)
        gemv4bit_one.gemv_4bit_one(x, ws, None, False)
        (_, options, _, block, _, shared, *_) = launches[-1]
        assert block == (32 * want.groups * want.warps, 1, 1) and shared == want.smem_bytes(False, 128)
        assert f"-DDEPTH={want.depth}" in options and f"-DWIDE={int(want.wide)}" in options


def test_shapes_and_tiles():
    # GLM-4-9B: q/k/v 288 tiles, o_proj and down_proj 256, gate/up 856 (16 gate rows and their up rows each)
    assert gemv4bit_one.tiles([4096, 256, 256], False) == 288 and gemv4bit_one.tiles([27392], True) == 856
    for swiglu, k in ((False, 4096), (False, 13696), (True, 4096)):
        h200 = gemv4bit_one.shape_for(swiglu, k)
        assert h200.wide and h200.smem_bytes(swiglu, k) <= gemv4bit_one.SMEM_H200 and h200.groups * h200.warps == 16
        # a 12 GB consumer card (sm_86/sm_89: 99 KiB a CTA) gets a smaller shape of the same stages, with the
        # narrow table (the wide one would leave it fewer warps); 32 KiB: none
        small = gemv4bit_one.shape_for(swiglu, k, 99 * 1024)
        assert small.smem_bytes(swiglu, k) <= 99 * 1024 and small.depth == 2 and small.groups * small.warps >= 4
        assert not small.wide and replace(small, wide=True).smem_bytes(swiglu, k) > 99 * 1024
        assert gemv4bit_one.shape_for(swiglu, k, 32 * 1024) is None  # the narrow lookup table alone takes 32 KiB
        assert gemv4bit_one.shape_for(swiglu, k, 163 * 1024).smem_bytes(swiglu, k) <= 163 * 1024  # an A100
    # x's part: every warp's run of whole stages (4 chunks of 64), 128 bytes a chunk
    assert gemv4bit_one.SHAPE.x_bytes(4096) == 4096 * 2 and gemv4bit_one.SHAPE.x_bytes(13696) == 4 * 56 * 128


@pytest.mark.parametrize("shape", [gemv4bit_one.SHAPE, gemv4bit_one.OneShape(3, 4, 2), gemv4bit_one.OneShape(4, 4, 3),
                                   gemv4bit_one.OneShape(1, 4, 2), gemv4bit_one.OneShape(4, 4, 2, wide=False)])
def test_the_shared_memory_asked_for_is_where_the_kernels_layout_ends(shape):
    """``smem_bytes`` against the kernel's own SMEM_END (the end of its layout: rings before the 64 KiB-aligned
    table, the table, the other rings, the sums), for sm_80 (dynamic shared memory from the window's first byte) and
    sm_90 (1 KiB in): the kernel compiles where it asserts it fits, and 16 bytes fewer do not fit where the layout
    ends last."""
    fits = {}
    for swiglu in (False, True):
        for arch in ("sm_80", "sm_90"):
            for less in (0, 16):
                options = gemv4bit_one._options(True, swiglu, False, 1, False, True, shape, 4096)
                options.append(f"-DEXPECT_SMEM_END={shape.layout_bytes(swiglu) - less}")
                try:
                    gemv4bit_mma.compile_cubin(options, arch, gemv4bit_one.source(), gemv4bit_one.NAME)
                    fits[swiglu, arch, less] = True
                except RuntimeError as e:
                    assert "SMEM_END" in str(e)
                    fits[swiglu, arch, less] = False
        assert fits[swiglu, "sm_80", 0] and fits[swiglu, "sm_90", 0]
        assert not (fits[swiglu, "sm_80", 16] and fits[swiglu, "sm_90", 16])


def test_a_card_with_less_shared_memory_gets_a_shape_that_fits(monkeypatch):
    """What an RTX 4070 (99 KiB a CTA, 46 SMs) would be handed (its properties stood in for: no GPU here)."""
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append(a))
    card = SimpleNamespace(multi_processor_count=46, shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    w = quantize(torch.randn(64, 128), "nf4")
    gemv4bit_one.gemv_4bit_one(torch.randn(1, 1, 128, dtype=torch.bfloat16), (w,), None, True)
    _, options, grid, block, _, shared, *_ = launches[0]
    # 8 warps in 2 groups, the narrow table (the wide one would leave 4), a CTA for each of the 2 tiles
    assert shared <= 99 * 1024 and block[0] == 32 * 8 and "-DGROUPS=2" in options and "-DWIDE=0" in options
    assert grid == (2, 1, 1)


def test_cpu_stays_with_triton(monkeypatch):
    """On a CPU one token goes through the Triton kernel (in the interpreter), never the CUDA kernel, and a residual
    add's sums of squares come one per Triton program."""
    w = quantize(torch.randn(32, 128), "nf4")
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    assert not gemv4bit_one.usable(x, (w,)) and not gemv4bit.check_one("cpu")
    assert gemv4bit.kernel_for_rows("cpu", 1) == "per row"
    monkeypatch.setattr(gemv4bit_one, "gemv_4bit_one", lambda *a, **k: pytest.fail("the CUDA kernel ran on a CPU"))
    y = gemv4bit.gemv_4bit(x, w)
    assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, atol=5e-2, rtol=2e-2)
    if gemv4bit.INTERPRETER:
        _, stream = gemv4bit.gemv_4bit_residual(x, w, torch.zeros(1, 1, 32, dtype=x.dtype), torch.ones(32))
        cfg = gemv4bit.config_for(w)
        assert stream.squares.numel() == gemv4bit._row_blocks([32], cfg, gemv4bit._paired(False))


def test_double_quantization_and_misaligned_weights_take_the_triton_kernel(monkeypatch):
    """What the kernel does not read (nested scales, bytes not 16-byte aligned) is never handed to it, even on a
    GPU it runs on (stood in for: this machine has none)."""
    monkeypatch.setattr(gemv4bit_one, "runs_on", lambda device, dtype, env=True: True)
    monkeypatch.setattr(gemv4bit_one, "smem_limit", lambda device: gemv4bit_one.SMEM_H200)
    x = SimpleNamespace(is_cuda=True, numel=lambda: 128, shape=(1, 1, 128), device="cuda", dtype=torch.bfloat16)
    plain, nested = quantize(torch.randn(32, 128), "nf4"), quantize(torch.randn(32, 128), "nf4", double_quant=True)
    assert gemv4bit_one.usable(x, (plain,)) and not gemv4bit_one.usable(x, (nested,))
    shifted = plain._replace(data=plain.data[8:])
    assert not gemv4bit_one.usable(x, (shifted,))
    assert not gemv4bit_one.usable(SimpleNamespace(**{**vars(x), "numel": lambda: 256}), (plain,))  # two tokens


def test_a_failed_first_run_check_turns_off_this_kernel_only(monkeypatch):
    """A disagreement in the batch-1 kernel's first-run check warns, names the kernel and turns it off on that GPU;
    the 2-8-row CUDA kernel stays on (the GPU's calls stood in for: this machine has none)."""
    import contextlib

    monkeypatch.setattr(gemv4bit_mma, "_BROKEN", {})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    with pytest.warns(RuntimeWarning, match="batch-1 4-bit CUDA kernel is off on a GPU: its products differ"):
        ok = gemv4bit._checked({}, "cuda:0", torch.bfloat16, lambda device, dtype: "its products differ",
                               gemv4bit_one)
    assert not ok and not gemv4bit_mma.enabled("cuda:0", gemv4bit_one.NAME) and gemv4bit_mma.enabled("cuda:0")
    answers = {}
    assert gemv4bit._checked(answers, "cuda:1", torch.bfloat16, lambda device, dtype: None, gemv4bit_one)
    assert answers == {(torch.device("cuda:1"), torch.bfloat16): True} and gemv4bit_mma.enabled("cuda:1",
                                                                                                gemv4bit_one.NAME)


@pytest.mark.skipif(not gemv4bit.INTERPRETER, reason="the Triton kernel that takes over runs in Triton's interpreter here")
def test_a_residual_add_the_cuda_kernel_fails_on_is_redone_by_the_triton_kernel(monkeypatch):
    """The batch-1 kernel raising in ``gemv_4bit_residual`` (stood in for: this machine has no GPU) turns it off and
    the Triton kernel redoes the launch with its own number of sums of squares."""
    def broken(*args, **kwargs):
        raise RuntimeError("launch failed")

    off = []
    monkeypatch.setattr(gemv4bit, "_takes_one", lambda *a, **k: not off)
    monkeypatch.setattr(gemv4bit_one, "gemv_4bit_one", broken)
    monkeypatch.setattr(gemv4bit_mma, "disable", lambda device, why, kernel, label: off.append((why, kernel)))
    w = quantize(torch.randn(32, 128), "nf4")
    x, r, g = torch.randn(1, 1, 128), torch.randn(1, 1, 32), torch.rand(32)
    y, stream = gemv4bit.gemv_4bit_residual(x, w, r, g)
    assert off == [("RuntimeError: launch failed", gemv4bit_one.NAME)]
    assert stream.squares.numel() == gemv4bit._row_blocks([32], gemv4bit.config_for(w), gemv4bit._paired(False))
    assert torch.allclose(y, r + x @ w.dequantize(torch.float32).T, atol=1e-4)
    assert torch.allclose(stream.squares.sum(), y.pow(2).sum()) and torch.allclose(stream.scaled, y * g)


def test_a_launch_leaves_sms_to_a_few_programs_after_it_only_with_programmatic_dependent_launch(monkeypatch):
    # the decode attention's programs after q/k/v: an SM each, up to LEAVE_SMS_MAX, and only where the launch is a
    # programmatic dependent one (launched plainly, the next kernel starts once this one ends anyway)
    device = torch.device("cuda", 0)
    limit = gemv4bit_one.LEAVE_SMS_MAX
    monkeypatch.setattr(gemv4bit_one, "_dependent", lambda d: False)
    assert gemv4bit_one.sms_left(device, 4) == 0
    monkeypatch.setattr(gemv4bit_one, "_dependent", lambda d: True)
    assert [gemv4bit_one.sms_left(device, n) for n in (0, 4, limit, limit + 1)] == [0, 4, limit, 0]
    # (a stand-in for the GPU's properties: 132 SMs, as an H100/H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    assert [gemv4bit_one._programs(device, t, 4) for t in (288, 100, 1)] == [128, 100, 1]
    assert gemv4bit_one._programs(device, 288) == 132


def test_the_sms_left_reach_the_launch_grid(monkeypatch):
    # gemv_4bit_normed(..., leave_sms=) -> _launch -> gemv_4bit_one -> one CTA fewer an SM left (a 46-SM card stood
    # in for, as above), where the launch is a programmatic dependent one; none where PDL was refused on the GPU
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append(a))
    card = SimpleNamespace(multi_processor_count=46, shared_memory_per_block_optin=227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    monkeypatch.setattr(gemv4bit_one, "_dependent", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # (the stand-in card is GPU 0)
    w = quantize(torch.randn(1024, 128), "nf4")  # 64 tiles: more than the card's SMs
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    for leave in (0, 4, gemv4bit_one.LEAVE_SMS_MAX + 1):
        gemv4bit_one.gemv_4bit_one(x, (w,), None, False, leave_sms=leave)
    monkeypatch.setattr(gemv4bit_mma, "_PLAIN_ONLY", {0})
    gemv4bit_one.gemv_4bit_one(x, (w,), None, False, leave_sms=4)
    assert [grid for _, _, grid, *_ in launches] == [(46, 1, 1), (42, 1, 1), (46, 1, 1), (46, 1, 1)]


@pytest.mark.parametrize("fold", ["norm", "residual"])
def test_the_tuner_keeps_a_shape_only_where_it_is_right_and_beats_the_default_by_the_margin(monkeypatch, fold):
    """``glmkit tune``'s batch-1 CUDA kernel step (``tune_one_projection``) with the kernel stood in for (it runs on a
    GPU only: here a float32 product that stands for each shape, and a timer that reads each shape's time): every
    candidate is launched in the fold the fused step uses and checked against float64, also on a token whose last
    value is the largest; a shape that gets that token wrong is never kept however fast; a faster shape replaces the
    default only by more than ``MARGIN``."""
    from glmkit import gemv_tuning

    launched = []

    def stand_in(x, ws, bias, swiglu, squares=None, eps=1e-5, residual=None, norm_weight=None, scaled=None,
                 partials=None, shape=None, leave_sms=0):
        launched.append((shape, squares is not None, residual is not None))
        w = torch.cat([v.dequantize(torch.float32) for v in ws])
        xf = x.float()
        if shape.warps == 8 and xf[..., -1].abs() == xf.abs().max():  # this "shape" gets a token wrong whose largest
            xf = xf.clone()                                            # value is its last (a max that missed the tail)
            xf[..., -1] = 0.0
        y = xf @ w.T
        if squares is not None:
            y = y * torch.rsqrt(squares.sum() / x.shape[-1] + eps)
        if bias is not None:
            y = y + bias.float()
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = up * torch.nn.functional.silu(gate)
        if residual is not None:
            y = y + residual.float()
        return y.to(x.dtype)

    default = gemv4bit_one.shape_for(False, 256)

    def timer_with(times):
        def timer(fn, copies):
            fn(0)
            shape = launched[-1][0]
            return times.get((shape.groups, shape.warps, shape.depth, shape.wide), 1.0)
        return timer

    monkeypatch.setattr(gemv4bit_one, "gemv_4bit_one", stand_in)
    monkeypatch.setattr(gemv4bit_one, "smem_limit", lambda device: gemv4bit_one.SMEM_H200)
    key = (default.groups, default.warps, default.depth, default.wide)
    slightly, much, wrong = (2, 4, 2, True), (4, 2, 3, False), (2, 8, 2, True)  # 1%, 10%, 20% faster than the default
    for times, kept in (({key: 1.0, slightly: 0.99}, key), ({key: 1.0, slightly: 0.99, much: 0.9}, much),
                        ({key: 1.0, wrong: 0.8}, key)):
        launched.clear()
        row = gemv_tuning.tune_one_projection("o_proj", (64,), 256, False, False, fold, device="cpu",
                                              timer=timer_with({**{k: 1.05 for k in (slightly, much, wrong)}, **times}))
        assert (row["best"]["groups"], row["best"]["warps"], row["best"]["depth"], row["best"]["wide"]) == kept
        assert row["default"]["groups"] == default.groups and row["default"]["us"] == 1e6  # timed first
        wrongs = [t for t in row["tried"] if t["warps"] == 8]
        assert wrongs and all(t["rel_err"] > 2e-2 for t in wrongs)  # caught by the token whose last value is largest
        assert all(t["rel_err"] < 2e-2 for t in row["tried"] if t["warps"] != 8)
        assert {(squares, residual) for _, squares, residual in launched} == {(fold == "norm", fold == "residual")}
