"""glmkit.gemv4bit_mma on a CPU: the kernel compiled for an H100/H200 (sm_90) by NVRTC, read back with cuobjdump, and
the launch the Python side builds held against the kernel's own parameter list. The kernel itself runs on a GPU
only: ``benchmarks/gpu_smoke_4bit.py`` and ``benchmarks/nf4_mma.py`` check its products there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import named_launch_args

from glmkit import gemv4bit, gemv4bit_mma
from glmkit.gemv4bit import quantize

pytest.importorskip("bitsandbytes")  # as tests/test_gemv4bit.py: the weights are bitsandbytes' own
pytest.importorskip("triton")  # its wheel carries cuobjdump; the dev extra installs it and NVRTC on Linux x86-64


def _cuobjdump(cubin: bytes, flag: str, tmp_path: Path) -> str:
    import triton  # its wheel carries NVIDIA's cuobjdump

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("bf16, nested, swiglu, bias, segments", [
    (True, False, False, True, 3),  # GLM's q/k/v: three weights, one bias
    (True, False, False, False, 1),  # o_proj, down_proj
    (True, False, True, False, 1),  # gate/up with SwiGLU
    (True, True, True, False, 1),  # double quantization
    (False, True, False, True, 3),  # fp16
])
def test_compiles_for_sm90_without_spills(bf16, nested, swiglu, bias, segments, tmp_path):
    """The build a GPU without a CUDA toolkit gets (``compile_cubin``, the kernel's own NVRTC path): it compiles,
    keeps everything in registers at the programs an SM is to hold, and does what the design says."""
    cubin = gemv4bit_mma.compile_cubin(gemv4bit_mma._options(bf16, nested, swiglu, bias, segments, 256), "sm_90")
    usage = _cuobjdump(cubin, "-res-usage", tmp_path)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage  # nothing spilled to memory
    sass = _cuobjdump(cubin, "-sass", tmp_path)
    # the products on the tensor cores in x's type, the lookups from shared memory after a byte permute
    assert re.search(r"HMMA\.16816\.F32" + (r"\.BF16" if bf16 else r"\s"), sass)  # fp16 operands: no suffix
    assert sass.count(" PRMT ") >= 64 and len(re.findall(r"\bLDS\b", sass)) >= 64


@pytest.mark.parametrize("swiglu, heights", [(False, (40, 16, 24)), (True, (2 * 40,)), (False, (100,))])
def test_launch_matches_the_kernels_parameters(swiglu, heights, monkeypatch):
    """What ``gemv_4bit_mma`` hands the kernel: a tensor for every pointer, an int for every int, in order; one
    program per 16 output rows of each weight; the shared memory the program uses."""
    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append(a))
    ws = tuple(quantize(torch.randn(h, 128), "nf4", double_quant=True) for h in heights)
    x = torch.randn(3, 1, 128, dtype=torch.bfloat16)
    bias = None if swiglu else torch.zeros(sum(heights))  # fp32: read in x's type
    y = gemv4bit_mma.gemv_4bit_mma(x, ws, bias, swiglu)
    assert y.shape == (3, 1, heights[0] // 2 if swiglu else sum(heights)) and y.dtype == x.dtype
    device, options, grid, block, args, shared = launches[0]
    named = named_launch_args(gemv4bit_mma.source(), gemv4bit_mma.NAME, args)
    tiles = sum(-(-(h // 2 if swiglu else h) // gemv4bit_mma.ROWS) for h in heights)
    assert grid == (tiles, 1, 1) and block == (32 * gemv4bit_mma.WARPS, 1, 1)
    assert shared == gemv4bit_mma._shared_bytes(128, swiglu) <= gemv4bit_mma.SHARED_LIMIT and device == x.device
    assert f"-DSWIGLU={int(swiglu)}" in options and f"-DSEGMENTS={len(heights)}" in options
    assert named["x"].data_ptr() % 16 == 0 and named["vectors"] == 3 and named["bytes_per_row"] == 64
    assert named["y"] is y and named["y_row"] == y.shape[-1]
    assert swiglu or (named["bias"].dtype == x.dtype and named["bias"].shape == (sum(heights),))
    assert named["q1"] is ws[min(1, len(ws) - 1)].data  # q, k and v in their slots, unused slots repeat the first


def test_options_and_shared_memory():
    flags = dict(o.removeprefix("-D").split("=") for o in gemv4bit_mma._options(True, True, True, False, 1, 256)
                 if o.startswith("-D"))
    assert flags["SWIGLU"] == "1" and flags["NESTED"] == "1" and flags["BS2"] == "256"
    assert flags["UNROLL"] == str(gemv4bit_mma.UNROLL_SWIGLU)  # gate/up: twice the rows a warp reads
    # GLM-4-9B's rows fit a program's shared memory: 4096 columns with SwiGLU, 13696 for down_proj
    assert gemv4bit_mma._shared_bytes(4096, True) <= gemv4bit_mma.SHARED_LIMIT
    assert gemv4bit_mma._shared_bytes(13696, False) <= gemv4bit_mma.SHARED_LIMIT
    assert gemv4bit_mma._shared_bytes(16384, False) > gemv4bit_mma.SHARED_LIMIT  # the Triton kernels take those


def test_without_a_cuda_toolkit_it_is_built_by_its_own_nvrtc_call(monkeypatch):
    """torch's ``_compile_kernel`` wants a CUDA toolkit's headers (CUDA_HOME), which a pip install lacks and this
    kernel does not include: the kernel is then built by ``compile_cubin`` for the GPU's architecture and loaded by
    torch's loader. (The GPU's own calls are stood in for: this machine has none.)"""
    import torch.cuda._utils

    loaded = []

    def no_toolkit(*args, **kwargs):
        raise OSError("CUDA_HOME environment variable is not set. Please set it to your CUDA install root.")

    monkeypatch.setattr(torch.cuda, "_compile_kernel", no_toolkit)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda._utils, "_cuda_load_module",
                        lambda cubin, names: loaded.append((cubin, names)) or {names[0]: "the kernel"})
    monkeypatch.setattr(gemv4bit_mma, "_KERNELS", {})
    kernel = gemv4bit_mma._kernel(torch.device("cuda", 0), gemv4bit_mma._options(True, False, False, False, 1, 256))
    assert kernel == "the kernel" and loaded[0][1] == [gemv4bit_mma.NAME] and loaded[0][0][1:4] == b"ELF"


def test_compile_errors_carry_nvrtcs_log(monkeypatch):
    monkeypatch.setattr(gemv4bit_mma, "_SOURCE", gemv4bit_mma.source() + "\nthis is not CUDA;\n")
    with pytest.raises(RuntimeError, match=r"(?s)could not compile glmkit's CUDA kernel glmkit_gemv4_mma:.*error: expected a"):
        gemv4bit_mma.compile_cubin(gemv4bit_mma._options(True, False, False, False, 1, 256), "sm_90")


def test_cpu_stays_with_triton(monkeypatch):
    """On a CPU, 2-8 rows go through the Triton kernels (in the interpreter), never the CUDA kernel."""
    g = torch.Generator().manual_seed(0)  # fixed draws: an unlucky one put an output near zero over the bar
    w = quantize(torch.randn(32, 128, generator=g), "nf4")
    x = torch.randn(4, 1, 128, generator=g).to(torch.bfloat16)
    assert not gemv4bit_mma.usable(x, (w,)) and not gemv4bit.check_mma("cpu")
    assert gemv4bit.kernel_for_rows("cpu", 4) == ("Triton, tensor cores" if gemv4bit.INTERPRETER else "per row")
    monkeypatch.setattr(gemv4bit_mma, "gemv_4bit_mma", lambda *a: pytest.fail("the CUDA kernel ran on a CPU"))
    y = gemv4bit.gemv_4bit(x, w)  # the op, with nothing forced: what a decoder calls
    assert torch.allclose(y.float(), x.float() @ w.dequantize(torch.float32).T, atol=5e-2, rtol=2e-2)


def test_loading_a_4bit_weight_leaves_the_cuda_kernels_check_for_later(monkeypatch):
    """``Packed4bit.from_bnb`` (what the decoders call on every 4-bit layer) neither compiles nor checks the CUDA
    kernel: its first-run check (6.7 s on an H200) waits for the first 2-8 tokens, so a model that only decodes one
    sequence never pays for it."""
    import bitsandbytes as bnb

    monkeypatch.setattr(gemv4bit, "check_mma", lambda *a: pytest.fail("check_mma ran at load time"))
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64, bias=False).state_dict())
    packed = gemv4bit.Packed4bit.from_bnb(layer.to(torch.bfloat16).to("cpu").weight)  # quantizes, in bf16
    assert packed.dtype == torch.bfloat16 and packed.shape == (64, 128)


@pytest.mark.parametrize("inside", ["a compiled function", "a CUDA graph capture"])
def test_first_run_checks_wait_outside_compiles_and_captures(inside, monkeypatch):
    """Inside a compiled function or a CUDA graph capture nothing can be checked: the stand-in answer, nothing kept
    and the check not run; the first ask outside runs it once and keeps its answer."""
    if inside == "a compiled function":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    answers, runs = {}, []
    assert gemv4bit._first_run(answers, "gpu", lambda: runs.append(1) or False, True) is True
    assert answers == {} and runs == []
    monkeypatch.undo()
    assert gemv4bit._first_run(answers, "gpu", lambda: runs.append(1) or False, True) is False
    assert gemv4bit._first_run(answers, "gpu", lambda: runs.append(1) or True, True) is False  # kept
    assert answers == {"gpu": False} and runs == [1]


def test_the_dependent_launch_structs_have_the_drivers_layout():
    """``CUlaunchConfig`` and ``CUlaunchAttribute`` as CUDA's ``cuda.h`` lays them out (64-bit): the driver reads
    these bytes, so a field out of place would launch the wrong grid or no dependency."""
    import ctypes

    config, attribute = gemv4bit_mma._LaunchConfig, gemv4bit_mma._LaunchAttribute
    assert [getattr(config, f).offset for f in ("grid", "block", "shared", "stream", "attrs", "count")] == \
        [0, 12, 24, 32, 40, 48] and ctypes.sizeof(config) == 56
    assert attribute.value.offset == 8 and ctypes.sizeof(attribute) == 72  # an id, padding, a 64-byte union
    assert gemv4bit_mma.PROGRAMMATIC_STREAM_SERIALIZATION == 6


def _stand_in_driver(monkeypatch, status: int) -> list:
    """The driver's ``cuLaunchKernelEx`` stood in for (no GPU here): it records what it was handed."""
    import ctypes
    from types import SimpleNamespace

    calls = []

    def launch_kernel_ex(config_ref, func, args, extra):
        config = ctypes.cast(config_ref, ctypes.POINTER(gemv4bit_mma._LaunchConfig)).contents
        attribute = config.attrs[0]
        calls.append(dict(grid=tuple(config.grid), block=tuple(config.block), shared=config.shared,
                          stream=config.stream, count=config.count, id=attribute.id, value=attribute.value[0],
                          func=func, pointer=ctypes.cast(args[0], ctypes.POINTER(ctypes.c_void_p)).contents.value,
                          int=ctypes.cast(args[1], ctypes.POINTER(ctypes.c_int)).contents.value,
                          double=ctypes.cast(args[2], ctypes.POINTER(ctypes.c_double)).contents.value))
        return status

    monkeypatch.setattr(gemv4bit_mma, "_launch_kernel_ex", lambda: launch_kernel_ex)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(_as_parameter_=ctypes.c_void_p(4096)))
    return calls


def test_a_dependent_launch_hands_the_driver_the_grid_the_attribute_and_the_arguments(monkeypatch):
    from types import SimpleNamespace

    calls = _stand_in_driver(monkeypatch, status=0)
    x = torch.zeros(4)
    gemv4bit_mma.launch_dependent(SimpleNamespace(func=7), (132, 1, 1), (512, 1, 1), [x, 5, 0.25], 1000)
    assert calls == [dict(grid=(132, 1, 1), block=(512, 1, 1), shared=1000, stream=4096, count=1, id=6, value=1,
                          func=7, pointer=x.data_ptr(), int=5, double=0.25)]
    with pytest.raises(TypeError, match="tensors, ints and floats"):
        gemv4bit_mma.launch_dependent(SimpleNamespace(func=7), (1, 1, 1), (32, 1, 1), ["x"], 0)


def test_a_failed_dependent_launch_warns_once_and_launches_plainly(monkeypatch):
    """A driver that refuses programmatic dependent launch costs a warning, not the kernel: it launches plainly there
    from then on (its wait is then a no-op)."""
    import contextlib

    calls = _stand_in_driver(monkeypatch, status=801)  # CUDA_ERROR_NOT_SUPPORTED
    plain = []

    class Kernel:
        func = 7

        def __call__(self, grid, block, args, shared_mem):
            plain.append((grid, block, shared_mem))

    monkeypatch.setattr(gemv4bit_mma, "_kernel", lambda *a: Kernel())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(gemv4bit_mma, "_PLAIN_ONLY", set())
    device = torch.device("cuda", 3)
    with pytest.warns(RuntimeWarning, match="programmatic dependent launch failed on cuda:3 .*launch plainly"):
        gemv4bit_mma.launch(device, [], (8, 1, 1), (64, 1, 1), [torch.zeros(1), 1, 0.5], 0, pdl=True)
    gemv4bit_mma.launch(device, [], (8, 1, 1), (64, 1, 1), [torch.zeros(1), 1, 0.5], 0, pdl=True)  # tried once
    assert len(calls) == 1 and plain == [((8, 1, 1), (64, 1, 1), 0)] * 2 and gemv4bit_mma._PLAIN_ONLY == {3}
    # any other error is the kernel's (the caller turns the kernel off, or a capture fails): no quiet fallback
    _stand_in_driver(monkeypatch, status=700)  # CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        gemv4bit_mma.launch(torch.device("cuda", 2), [], (8, 1, 1), (64, 1, 1), [torch.zeros(1), 1, 0.5], 0, pdl=True)


def test_a_launch_takes_the_tuned_shape_for_its_rows_and_columns_else_the_default(monkeypatch):
    """``glmkit tune``'s shape for a launch's (kernel, rows, columns) sets its warps (the block), chunks at a time and
    programs an SM; another launch keeps ``default_shape``."""
    from glmkit import gemv

    launches = []
    monkeypatch.setattr(gemv4bit_mma, "launch", lambda *a, **k: launches.append(a))
    monkeypatch.setattr(gemv, "_ACTIVE_CUDA", {(gemv4bit_mma.TABLE_KERNEL, 96, 128): {"warps": 4, "unroll": 1,
                                                                                        "min_blocks": 3},
                                               (gemv4bit_mma.TABLE_KERNEL, 64, 128): {"warps": 2, "unroll": 1,
                                                                                        "min_blocks": 3}})
    x = torch.randn(3, 1, 128, dtype=torch.bfloat16)
    for rows in (96, 80, 64):  # tuned; not in the table; in it with a shape the kernel cannot build (2 warps)
        gemv4bit_mma.gemv_4bit_mma(x, (quantize(torch.randn(rows, 128), "nf4"),), None, False)
    (_, tuned, _, tuned_block, *_), *defaults = launches
    assert tuned_block == (4 * 32, 1, 1) and {"-DWARPS=4", "-DUNROLL=1", "-DMIN_BLOCKS=3"} <= set(tuned)
    shape = gemv4bit_mma.default_shape(False)
    for _, default, _, default_block, *_ in defaults:
        assert default_block == (32 * shape.warps, 1, 1) and f"-DUNROLL={shape.unroll}" in default


@pytest.mark.skipif(not gemv4bit_mma.nvrtc_found(), reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("swiglu", [False, True])
def test_the_tuners_extreme_shapes_compile_for_sm90_without_spills(swiglu, tmp_path):
    """The candidates ``glmkit tune`` times with the most warps and programs an SM (the fewest registers a thread)
    and with the fewest: each compiles and keeps everything in registers."""
    from glmkit.gemv_tuning import mma_candidates

    shapes = mma_candidates(swiglu)
    for shape in (min(shapes, key=lambda s: s.registers()), max(shapes, key=lambda s: s.registers())):
        cubin = gemv4bit_mma.compile_cubin(gemv4bit_mma._options(True, False, swiglu, False, 1, 256, shape), "sm_90")
        usage = _cuobjdump(cubin, "-res-usage", tmp_path)
        assert "LOCAL:0" in usage and "STACK:0" in usage, (shape, usage)


def test_the_tuner_keeps_a_right_shape_only_where_it_beats_the_default_by_the_margin(monkeypatch):
    """``glmkit tune``'s 2-8-row CUDA kernel step (``tune_mma_projection``) with the kernel stood in for (it runs on a
    GPU only: a float32 product for each shape, a timer that reads each shape's time): each candidate is checked against
    float64 at 8 rows and timed at each of ``MMA_VECTORS``; a wrong shape is never kept, a faster one replaces the
    default only by more than ``MARGIN``."""
    from glmkit import gemv_tuning

    launched = []

    def stand_in(x, ws, bias, swiglu, shape=None):
        launched.append((shape, x.shape[0]))
        y = x.float() @ torch.cat([v.dequantize(torch.float32) for v in ws]).T
        if shape.warps == 16:  # this "shape" is wrong
            y = y * 1.5
        if bias is not None:
            y = y + bias.float()
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = up * torch.nn.functional.silu(gate)
        return y.to(x.dtype)

    def timer_with(times):
        def timer(fn, copies):
            fn(0)
            shape = launched[-1][0]
            return times.get((shape.warps, shape.unroll, shape.min_blocks), 1.0)
        return timer

    monkeypatch.setattr(gemv4bit_mma, "gemv_4bit_mma", stand_in)
    default = gemv4bit_mma.default_shape(True)
    key = (default.warps, default.unroll, default.min_blocks)
    slightly, much, wrong = (4, 1, 1), (4, 2, 2), (16, 1, 1)  # 1%, 10%, 20% faster than the default
    for times, kept in (({slightly: 0.99}, key), ({slightly: 0.99, much: 0.9}, much), ({wrong: 0.8}, key)):
        launched.clear()
        row = gemv_tuning.tune_mma_projection("gate_up", (128,), 256, False, True, device="cpu",
                                              timer=timer_with({**{k: 1.05 for k in (slightly, much, wrong)},
                                                                key: 1.0, **times}))
        assert (row["best"]["warps"], row["best"]["unroll"], row["best"]["min_blocks"]) == kept
        assert row["rows"] == 64 and row["default"]["warps"] == default.warps  # rows of one half; timed first
        assert row["default"]["us"] == {str(v): 1e6 for v in gemv_tuning.MMA_VECTORS}
        assert all((t["rel_err"] > 2e-2) == (t["warps"] == 16) for t in row["tried"])
        assert {rows for _, rows in launched} == {gemv4bit_mma.MAX_VECTORS, *gemv_tuning.MMA_VECTORS}
    assert gemv_tuning.table_configs([row])[0] == {"kernel": "4bit-mma", "rows": 64, "columns": 256,
                                                   "warps": default.warps, "unroll": default.unroll,
                                                   "min_blocks": default.min_blocks}
