"""glmkit's 4-bit Triton GEMV kernels against bitsandbytes' dequantize_4bit + F.linear (Triton's interpreter on a CPU)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rand

from glmkit import costs, gemv4bit
from glmkit.fast_decode import rms_norm
from glmkit.gemv import INTERPRETER, GemvConfig
from glmkit.gemv4bit import (
    LOOKUPS,
    ROW_KERNEL_MAX_VECTORS,
    NormedStream,
    Packed4bit,
    _launch,
    config_for,
    gemv_4bit,
    gemv_4bit_multi,
    gemv_4bit_normed,
    gemv_4bit_residual,
    gemv_4bit_swiglu,
    linear_4bit,
    lookup_for,
    normed_stream,
    quantize,
    reference_linear,
    triton_available,
)

bnb = pytest.importorskip("bitsandbytes")
# every nibble lookup this machine runs: on a CPU, Triton's interpreter runs no PTX, so not the warp shuffle (a GPU
# checks it against table loads: check_lookup, and the tuner against float64)
LOOKUPS_HERE = list(LOOKUPS) if torch.cuda.is_available() else [lk for lk in LOOKUPS if lk != "shuffle"]
pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")


@pytest.mark.parametrize("lookup", LOOKUPS_HERE)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n, k, config", [(100, 320, GemvConfig(16, 128, 4)),  # partial rows and columns
                                          (64, 256, GemvConfig(32, 256, 4)),  # even
                                          (37, 192, GemvConfig(8, 64, 2))])  # odd rows, one block per step
def test_gemv_4bit_equals_dequantize_then_linear(quant_type, double_quant, n, k, config, lookup):
    w = quantize(rand(n, k), quant_type, double_quant)
    assert w.nested == double_quant and w.data.dtype == torch.uint8 and w.data.numel() == n * k // 2
    x, b = rand(1, 1, k, seed=1), rand(n, seed=2)
    y = gemv_4bit(x, w, b, config=config, lookup=lookup)
    assert y.shape == (1, 1, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference_linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [37, 64, 100])
def test_two_tiles_of_rows_a_program_give_the_one_tile_products_exactly(n, monkeypatch):
    # PAIRED_ROWS: a program's second tile (half the rows further on, the last partly past the weight) shares x with
    # its first; each row's sum is the one-tile kernel's, term for term (q/k/v side by side with a bias, two vectors)
    ws = [quantize(rand(m, 256, seed=m), "nf4", double_quant=True) for m in (n, 24)]
    x, b = rand(2, 1, 256, seed=1), rand(n + 24, seed=2)
    got = {}
    for paired in (False, True):
        monkeypatch.setattr(gemv4bit, "PAIRED_ROWS", paired)
        got[paired] = [gemv_4bit_multi(x, ws, b, config=GemvConfig(8, 128, 4), lookup="load"),
                       gemv_4bit_multi(x[:1], ws, b, config=GemvConfig(16, 256, 4), lookup=LOOKUPS_HERE[-1])]
    assert all(torch.equal(a, b) for a, b in zip(got[False], got[True]))
    torch.testing.assert_close(got[True][1], torch.cat([reference_linear(x[:1], w) for w in ws], dim=-1) + b,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, config", [(40, 448, GemvConfig(8, 256, 2)),  # the last step half past the row
                                          (16, 512, GemvConfig(4, 512, 4))])
def test_gemv_4bit_reads_16_bit_x_as_pairs(dtype, n, k, config):
    # a 16-bit x is read as 32-bit (even, odd) pairs: a swapped half or a wrong bit pattern changes every product
    w = quantize(rand(n, k), "nf4", double_quant=True)
    x = rand(1, 1, k, dtype=dtype, seed=1)
    ref = F.linear(x.double(), w.dequantize().double())
    y = gemv_4bit(x, w, config=config)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    shifted = torch.cat([x.new_zeros(1, 1, 1), x], dim=-1)[..., 1:]  # a view that starts mid-pair (odd offset)
    assert torch.equal(gemv_4bit(shifted, w, config=config), y)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_gemv_4bit_multi_equals_the_concatenated_products(double_quant):
    # q, k and v of different heights in one launch, side by side in the output, with the concatenated bias
    ws = [quantize(rand(n, 256, seed=n), "nf4", double_quant) for n in (40, 8, 24)]
    x, b = rand(1, 1, 256, seed=1), rand(72, seed=2)
    want = torch.cat([reference_linear(x, w) for w in ws], dim=-1) + b
    for config, lookup in zip((GemvConfig(16, 128, 4), GemvConfig(8, 256, 2)), LOOKUPS_HERE * 2):
        torch.testing.assert_close(gemv_4bit_multi(x, ws, b, config=config, lookup=lookup), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv_4bit_multi(x, ws[:2]), want[..., :48] - b[:48], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one format"):
        gemv_4bit_multi(x, [ws[0], quantize(rand(8, 256), "fp4", double_quant)])


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_ops_give_what_the_kernel_gives_launched_directly(quant_type, double_quant):
    # the public functions go through torch.ops.glmkit.*: a Packed4bit unpacked into tensors and numbers and packed
    # again must launch the same kernel on the same tensors (odd rows, a partial last step, a bias, three weights)
    ws = [quantize(rand(n, 192, seed=n), quant_type, double_quant) for n in (37, 8, 24)]
    x, b = rand(1, 1, 192, seed=1), rand(69, seed=2)
    config = GemvConfig(8, 128, 2)
    for got, want in [(gemv_4bit(x, ws[0], b[:37], config), _launch(x, ws[:1], b[:37], False, config)),
                      (torch.ops.glmkit.gemv_4bit_multi(x, [w.data for w in ws], [w.absmax for w in ws], ws[0].code,
                                                        *([[getattr(w, f) for w in ws] for f in ("absmax2", "code2",
                                                                                                  "offset")]
                                                          if double_quant else [[], [], []]),
                                                        [37, 8, 24], 192, 64, 256, quant_type, b, 8, 128, 2, ""),
                       _launch(x, tuple(ws), b, False, config)),
                      (gemv_4bit_swiglu(x, ws[2], config), _launch(x, ws[2:], None, True, config))]:
        assert got.shape == want.shape and torch.equal(got, want)


def test_the_ops_pass_torch_library_opcheck():
    # PyTorch's own check of a custom op: its schema, no autograd surprise, the fake output against the real one,
    # and AOT tracing with dynamic shapes
    from glmkit.gemv4bit import _gemv_4bit_multi_op, _gemv_4bit_op, _gemv_4bit_swiglu_op, _launch_args, _weight_args

    ws = [quantize(rand(n, 128, seed=n), "nf4", double_quant=True) for n in (24, 8)]
    x, b = rand(1, 1, 128, seed=1), rand(32, seed=2)
    launch = _launch_args(GemvConfig(8, 128, 2), LOOKUPS_HERE[-1])
    multi = (x, [w.data for w in ws], [w.absmax for w in ws], ws[0].code, [w.absmax2 for w in ws],
             [w.code2 for w in ws], [w.offset for w in ws], [24, 8], 128, 64, 256, "nf4", b, *launch)
    for op, args in ((_gemv_4bit_op, (x, *_weight_args(ws[0]), b[:24], *launch)),
                     (_gemv_4bit_swiglu_op, (x, *_weight_args(ws[0]), *launch)), (_gemv_4bit_multi_op, multi)):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_calls_the_ops_and_does_not_trace_the_kernel():
    # what FastDecoder compiles: a norm around the three ops, fullgraph. The graph dynamo hands the backend must hold
    # the ops themselves (no Triton kernel traced into it), and weights of another layer reuse the compiled graph.
    from torch._dynamo import lookup_backend

    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return lookup_backend("aot_eager")(gm, example_inputs)  # AOT tracing too: the ops' fake outputs

    def layer(x, qkv, gate_up, bias):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = gemv_4bit_multi(h, qkv, bias)
        return gemv_4bit_swiglu(y[..., :128] * 0.1, gate_up), gemv_4bit(h, qkv[0])

    def weights(seed):
        qkv = [quantize(rand(n, 256, seed=seed + n), "nf4", double_quant=True) for n in (128, 32, 32)]
        return qkv, quantize(rand(96, 128, seed=seed), "nf4", double_quant=True)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
    x, bias = rand(1, 1, 256, seed=1), rand(192, seed=2)
    for seed in (0, 100):  # two layers' weights
        qkv, gate_up = weights(seed)
        for got, want in zip(compiled(x, qkv, gate_up, bias), layer(x, qkv, gate_up, bias)):
            torch.testing.assert_close(got, want)
    assert len(graphs) == 1 and {"glmkit.gemv_4bit.default", "glmkit.gemv_4bit_multi.default",
                                 "glmkit.gemv_4bit_swiglu.default"} <= graphs[0]
    assert not any("triton" in target for target in graphs[0])


def test_nibble_order_and_block_scales_are_read_as_bitsandbytes_writes_them():
    # one row whose columns are all different: a swapped nibble or a misplaced scale changes single products
    w = quantize(torch.linspace(-3, 5, 256, device=DEVICE).reshape(1, 256) * torch.arange(1, 5, device=DEVICE)
                 .repeat_interleave(64)[None], "nf4")
    for col in (0, 1, 63, 64, 255):
        x = torch.zeros(1, 1, 256, device=DEVICE)
        x[..., col] = 1.0
        assert gemv_4bit(x, w).item() == pytest.approx(w.dequantize()[0, col].item(), rel=1e-6)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_gemv_4bit_swiglu_equals_the_unfused_path(double_quant):
    w = quantize(rand(2 * 72, 320), "nf4", double_quant)
    x = rand(1, 1, 320, seed=1)
    gate, up = reference_linear(x, w).chunk(2, dim=-1)
    for lookup in LOOKUPS_HERE:
        torch.testing.assert_close(gemv_4bit_swiglu(x, w, config=GemvConfig(16, 128, 4), lookup=lookup),
                                   up * F.silu(gate), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_normed_stream_is_x_times_g_rounded_once_and_the_sum_of_x_squared(dtype):
    # one kernel where Triton runs (here its interpreter), PyTorch's five otherwise: the same x * g, bit for bit,
    # and the same sum of squares to fp32's rounding (added in another order); k not a power of two
    x, g = rand(1, 1, 4000, seed=5).to(dtype), rand(4000, seed=6).to(dtype)
    stream = normed_stream(x, g)
    assert stream.scaled.dtype == dtype and stream.squares.shape == (1,) and stream.squares.dtype == torch.float32
    want = (x.float() * g.float()).to(dtype)
    if dtype == torch.bfloat16 and INTERPRETER:  # the interpreter rounds fp32 to bf16 toward zero: one ulp at most
        assert (stream.scaled.view(torch.int16).int() - want.view(torch.int16).int()).abs().max() <= 1
    else:  # as a GPU rounds it (to nearest)
        assert torch.equal(stream.scaled, want)
    torch.testing.assert_close(stream.squares, x.float().pow(2).sum().reshape(1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="one token"):
        normed_stream(rand(2, 1, 64), rand(64))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_normed_stream_folds_the_rmsnorm_into_the_4bit_products(quant_type, double_quant):
    # W @ rms_norm(x, g) from x * g and sums of x^2 (whole, or in parts as a residual product writes them): q/k/v
    # side by side with a bias (q's 300 rows: a program's second tile partly past them), and SwiGLU
    k = 320
    x, g = rand(1, 1, k, seed=1), rand(k, seed=2).abs()
    normed = rms_norm(x, g, 1e-5)
    ws = [quantize(rand(n, k, seed=n), quant_type, double_quant) for n in (300, 8, 24)]
    b = rand(332, seed=3)
    stream = normed_stream(x, g)
    parts = NormedStream(stream.scaled, x.reshape(5, -1).pow(2).sum(-1))  # the same total, in five parts
    want = torch.cat([reference_linear(normed, w) for w in ws], dim=-1) + b
    for s in (stream, parts):
        torch.testing.assert_close(gemv_4bit_normed(s, ws, b), want, rtol=1e-4, atol=1e-4)
    gate_up = quantize(rand(2 * 72, k, seed=4), quant_type, double_quant)
    gate, up = reference_linear(normed, gate_up).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_4bit_normed(parts, gate_up, swiglu=True), up * F.silu(gate), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one token"):
        gemv_4bit_normed(NormedStream(rand(2, 1, k), stream.squares), ws)
    with pytest.raises(ValueError, match="takes none"):  # GLM's gate/up has no bias
        gemv_4bit_normed(parts, gate_up, rand(144, seed=5), swiglu=True)
    with pytest.raises(ValueError, match="332 values"):
        gemv_4bit_normed(parts, ws, b[:3])


def test_4bit_table_shapes_name_their_tiles_and_one_timed_with_other_tiles_is_passed_over(monkeypatch):
    from glmkit.gemv_tuning import table_configs

    rows = [{"projection": p, "kernel": "nf4", "rows": 16, "columns": 256,
             "best": {"block_n": 8, "block_k": 256, "num_warps": 2}} for p in ("o_proj", "gate_up")]
    for paired, tiles in ((True, [2, 2]), (False, [1, 2])):  # SwiGLU: its gate and up tiles, always
        monkeypatch.setattr(gemv4bit, "PAIRED_ROWS", paired)
        assert [c["tiles"] for c in table_configs(rows)] == tiles
    monkeypatch.setattr(gemv4bit, "PAIRED_ROWS", True)
    untuned = gemv4bit.pick_config_4bit(64, 256)
    for tiles, swiglu, used in ((2, False, True), (1, False, False), (None, False, False), (None, True, True)):
        tuned = GemvConfig(2, 64, 1, tiles)  # this card's table, as gemv.lookup_config reads it
        monkeypatch.setattr(gemv4bit, "lookup_config", lambda kernel, n, k, tuned=tuned: tuned)
        assert (gemv4bit.pick_config_4bit(64, 256, swiglu=swiglu) == tuned) == used, (tiles, swiglu)
    assert untuned != GemvConfig(2, 64, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_4bit_product_added_to_the_residual_stream_writes_the_next_norm_s_stream(dtype):
    # o_proj and down_proj of the fused step: r + W @ x, rounded as PyTorch rounds it, and the NormedStream of the
    # sum for the norm after it: y * g, and one sum of y^2 per program (600 rows: several, the last partly past them)
    n, k = 600, 256
    w = quantize(rand(n, k), "nf4", double_quant=True)
    x, r, g = rand(1, 1, k, dtype=dtype, seed=1), rand(1, 1, n, dtype=dtype, seed=2), rand(n, dtype=dtype, seed=3)
    y, stream = gemv_4bit_residual(x, w, r, g)
    # (Triton's CPU interpreter truncates fp32 to bf16 where a GPU rounds to nearest: one bf16 step apart there)
    step = 2**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.0
    torch.testing.assert_close(y, r + gemv_4bit(x, w), rtol=step, atol=0.0)
    assert stream.squares.numel() > 1  # one sum per program
    torch.testing.assert_close(stream.squares.sum(), y.float().pow(2).sum())
    torch.testing.assert_close(stream.scaled, (y.float() * g.float()).to(dtype), rtol=step, atol=0.0)
    with pytest.raises(ValueError, match="one token"):
        gemv_4bit_residual(rand(2, 1, k, dtype=dtype), w, r, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_batch_of_vectors_gives_each_vector_s_product(dtype):
    # up to ROW_KERNEL_MAX_VECTORS vectors, a program per vector and row block: each row of y is its own vector's
    # product (plain with a bias, q/k/v in one launch, SwiGLU), the same as that vector alone, and the grid's two
    # orders agree
    ws = [quantize(rand(n, 192, seed=n), "nf4", double_quant=True) for n in (40, 8, 24)]
    v = ROW_KERNEL_MAX_VECTORS
    x, b = rand(v, 1, 192, dtype=dtype, seed=1), rand(72, dtype=dtype, seed=2)
    config = GemvConfig(8, 64, 2)
    for lookup in LOOKUPS_HERE:
        for weights, bias, swiglu in [(ws[:1], b[:40], False), (ws, b, False), (ws[:1], None, True)]:
            y = _launch(x, tuple(weights), bias, swiglu, config, lookup)
            rows = [_launch(x[i:i + 1], tuple(weights), bias, swiglu, config, lookup) for i in range(v)]
            assert y.shape == (v, 1, 20 if swiglu else sum(w.shape[0] for w in weights))
            torch.testing.assert_close(y, torch.cat(rows), rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(gemv_4bit(x, ws[0], b[:40]), reference_linear(x, ws[0], b[:40]), rtol=1e-4, atol=1e-4)
    # the other order, for weights of more than 65535 row blocks: the vectors on the grid's second axis
    for weights, bias, swiglu in [(ws, b, False), (ws[:1], None, True)]:
        y = _launch(x, tuple(weights), bias, swiglu, config, LOOKUPS_HERE[0], batch_axis=1)
        torch.testing.assert_close(y, _launch(x, tuple(weights), bias, swiglu, config, LOOKUPS_HERE[0]), rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("programs", [gemv4bit.TC_TARGET_PROGRAMS, 1], ids=["columns-split", "one-split"])
@pytest.mark.parametrize("k", [320, 384], ids=["odd-blocks", "two-blocks-a-step"])
def test_more_vectors_than_the_row_kernel_takes_share_each_lookup(dtype, programs, k, monkeypatch):
    # more than ROW_KERNEL_MAX_VECTORS vectors: each weight looked up once for all of them and multiplied on the
    # tensor cores (in x's type), the columns split over programs whose partial sums a second kernel adds (plain
    # with a bias, q/k/v in one launch, SwiGLU; double quantization, fp4; an odd number of blocks, one a step, and
    # an even one, two a step): fp32 gives the reference's products; 16-bit x within the rounding of each looked-up
    # value to x's type
    monkeypatch.setattr(gemv4bit, "TC_TARGET_PROGRAMS", programs)
    calls = []
    tensor_cores = gemv4bit._launch_tensor_cores
    monkeypatch.setattr(gemv4bit, "_launch_tensor_cores", lambda x, *a: calls.append(x.shape) or tensor_cores(x, *a))
    ws = [quantize(rand(n, k, seed=n), "nf4", double_quant=True) for n in (40, 8, 100)]
    fp4 = quantize(rand(24, k, seed=3), "fp4")
    vectors = ROW_KERNEL_MAX_VECTORS + 3
    x, b = rand(vectors, 1, k, dtype=dtype, seed=1), rand(148, dtype=dtype, seed=2)
    for weights, bias, swiglu in [(ws[:1], b[:40], False), (ws, b, False), (ws[2:], None, True), ([fp4], None, False)]:
        y = _launch(x, tuple(weights), bias, swiglu, None, "load")
        w64 = torch.cat([w.dequantize(torch.float32) for w in weights]).double()
        ref = F.linear(x.double(), w64, None if bias is None else bias.double())
        if swiglu:
            gate, up = ref.chunk(2, dim=-1)
            ref = up * F.silu(gate)
        assert y.shape == ref.shape and y.dtype == dtype
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < (1e-6 if dtype == torch.float32 else 2e-2 if swiglu else 1e-2), (len(weights), swiglu, err)
    assert len(calls) == 4 and all(shape[0] == vectors for shape in calls)
    with pytest.raises(ValueError, match="tensor-core kernel: leave them unset"):
        _launch(x, (ws[0],), None, False, GemvConfig(8, 64, 2), "load")


def test_the_tensor_core_kernel_allocates_the_workspace_the_planner_counts(monkeypatch):
    # every fp32 tensor a launch allocates (its partial sums) against tensor_core_workspace_bytes, which the planner
    # adds to a 4-bit fast decoder's budget: split columns and not, q/k/v in one launch, SwiGLU; none at 2 vectors
    allocated = []
    empty = torch.empty

    def recording_empty(*shape, dtype=None, **kw):
        t = empty(*shape, dtype=dtype, **kw)
        if dtype == torch.float32:
            allocated.append(t.nbytes)
        return t

    monkeypatch.setattr(gemv4bit.torch, "empty", recording_empty)
    ws = [quantize(rand(n, 320, seed=n), "nf4") for n in (40, 8, 8)]
    big = quantize(rand(2 * 200, 640, seed=5), "nf4")
    for weights, swiglu, vectors in [(ws, False, 5), (ws[:1], False, 3), ([big], True, 4), (ws, False, 2)]:
        allocated.clear()
        x = rand(vectors, 1, weights[0].shape[1], dtype=torch.bfloat16, seed=vectors)  # y: bf16, not counted
        _launch(x, tuple(weights), None, swiglu, None, "load")
        expected = costs.tensor_core_workspace_bytes([w.shape for w in weights], vectors)
        assert sum(allocated) == expected and (expected > 0) == (vectors > ROW_KERNEL_MAX_VECTORS)
    # the planner's copy of the launch (it sits below the kernels) is the kernel module's
    assert (costs.ROW_KERNEL_ROWS, costs.FOUR_BIT_KERNEL_ROWS) == (ROW_KERNEL_MAX_VECTORS, gemv4bit.MAX_VECTORS)
    assert (costs.TC_BLOCK_N, costs.TC_TARGET_PROGRAMS, costs.TC_UNROLL) == (
        gemv4bit.TC_BLOCK_N, gemv4bit.TC_TARGET_PROGRAMS, gemv4bit.TC_UNROLL)


def test_gemv_4bit_in_bfloat16_is_as_close_to_float64_as_bitsandbytes():
    w = quantize(rand(128, 512, dtype=torch.bfloat16), "nf4", double_quant=True)
    x = rand(1, 1, 512, dtype=torch.bfloat16, seed=1)
    ref = F.linear(x.double(), w.dequantize().double())
    ours, theirs = gemv_4bit(x, w).double(), linear_4bit(x, w).double()
    assert gemv_4bit(x, w).dtype == torch.bfloat16
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < 4e-3 and err < 2 * ((theirs - ref).norm() / ref.norm()).item() + 1e-3


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_from_bnb_reads_a_linear4bit_module_and_leaves_it_working(double_quant):
    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.load_state_dict(torch.nn.Linear(128, 64).state_dict())
    layer = layer.to(DEVICE)  # quantizes (GPU layout)
    x = rand(1, 1, 128, seed=1)
    packed = Packed4bit.from_bnb(layer.weight)
    want = layer(x)  # on AVX512-BF16 CPUs bitsandbytes repacks the module's weight here
    torch.testing.assert_close(gemv_4bit(x, packed, layer.bias), reference_linear(x, packed, layer.bias))
    torch.testing.assert_close(gemv_4bit(x, packed, layer.bias), want, rtol=2e-2, atol=2e-2)
    again = Packed4bit.from_bnb(layer.weight)  # after the repack: undone into the GPU layout
    assert again.shape == (64, 128)
    torch.testing.assert_close(gemv_4bit(x, again, layer.bias), gemv_4bit(x, packed, layer.bias), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer(x), want)


def test_bad_inputs_name_the_problem():
    w = quantize(rand(64, 128), "nf4")
    with pytest.raises(ValueError, match="vectors of 128 values"):
        gemv_4bit(rand(1, 1, 96), w)
    with pytest.raises(ValueError, match="at most 64 vectors"):
        gemv_4bit(rand(65, 1, 128), w)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv_4bit_swiglu(rand(1, 1, 128), quantize(rand(63, 128), "nf4"))
    with pytest.raises(ValueError, match="multiple of blocksize"):
        gemv_4bit(rand(1, 1, 128), w, config=GemvConfig(8, 32, 4))
    with pytest.raises(ValueError, match="whole quantization blocks"):
        gemv_4bit(rand(1, 1, 96), quantize(rand(64, 96), "nf4"))


@pytest.mark.parametrize("kernel, swiglu", [("nf4", True), ("bf16", False)])
def test_the_tuner_checks_each_shape_and_keeps_the_fastest(kernel, swiglu, tmp_path):
    torch.manual_seed(0)  # the inputs the tuner draws: the same every run (its checks have a bar)
    from glmkit.gemv import load_table
    from glmkit.gemv_tuning import table_configs, tune_projection, write_table

    shapes = [GemvConfig(16, 128, 4), GemvConfig(8, 256, 2), GemvConfig(8, 32, 2)]  # the last: not whole 4-bit blocks
    # a made-up clock by shape and 4-bit lookup (the interpreter's default "load", then "pair" at the fastest
    # shapes); each shape still runs and is checked against float64
    fake_us = {(128, "load"): 3.0, (256, "load"): 2.0, (128, "pair"): 1.5, (256, "pair"): 4.0,
               (128, None): 3.0, (256, None): 2.0, (32, None): 1.0}

    def timer(fn, copies):  # fn: the tuner's product, its shape and lookup bound as defaults (bitsandbytes: none)
        fn(0)
        cfg, lookup = fn.__defaults__ or (None, None)
        return 1e-6 * (5.0 if cfg is None else fake_us[cfg.block_k, lookup])

    row = tune_projection("gate_up" if swiglu else "o_proj", 48, 256, False, swiglu, kernel, shapes=shapes,
                          device=DEVICE, timer=timer)
    tried = {(t["block_k"], t.get("lookup")): t for t in row["tried"]}
    assert all(t["rel_err"] < 2e-2 for key, t in tried.items() if key[0] != 32)  # the tuner's own bar (bf16 rounding)
    if kernel == "nf4":
        assert "multiple of blocksize" in tried[32, "load"]["error"] and (32, "pair") not in tried
        assert (row["best"]["block_k"], row["best"]["lookup"]) == (128, "pair")
        assert row["bnb_matmul_4bit_us"] == pytest.approx(5.0) and row["speedup_vs_bnb_matmul_4bit"] == pytest.approx(5 / 1.5)
        assert table_configs([row])[0]["lookup"] == "pair"
    else:
        assert row["best"]["block_k"] == 32 and row["cublas_us"] == pytest.approx(5.0)
    path = write_table(table_configs([row]), tmp_path / "t.json", device="Card")
    best = GemvConfig(**{key: row["best"][key] for key in ("block_n", "block_k", "num_warps")})
    assert load_table(path)[1][(kernel, 48, 256)] == best


def test_a_shape_glmkit_tune_writes_is_the_one_the_kernels_launch_with(tmp_path, monkeypatch):
    # the tuner's table names 4-bit shapes by format ("nf4", "fp4"); the kernels must look them up by the same names
    from glmkit import gemv as gemv_module
    from glmkit import gemv4bit
    from glmkit.gemv_tuning import table_configs, tune_projection, write_table

    shapes = [GemvConfig(8, 128, 2), GemvConfig(4, 256, 4)]
    # bitsandbytes 5 µs; gate_up: the second shape with the "pair" lookup wins, qkv: the first with "load"
    clock = {48: {(128, "load"): 3.0, (256, "load"): 1.0, (128, "pair"): 4.0, (256, "pair"): 0.5},
             72: {(128, "load"): 1.0, (256, "load"): 3.0, (128, "pair"): 2.0, (256, "pair"): 2.0}}

    def timer(n):
        def time_it(fn, copies):
            fn(0)
            cfg, lookup = fn.__defaults__ or (None, None)
            return 1e-6 * (5.0 if cfg is None else clock[n][cfg.block_k, lookup])
        return time_it

    rows = [tune_projection(name, n, 256, False, name == "gate_up", "nf4", shapes=shapes, device=DEVICE,
                            timer=timer(n)) for name, n in (("gate_up", 48), ("qkv", 72))]
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))
    write_table(table_configs(rows), device="Card")  # the user's table, where `glmkit tune` writes it
    monkeypatch.setattr(gemv_module, "INTERPRETER", False)  # a GPU's lookup (the interpreter ignores tables)
    monkeypatch.setattr(gemv4bit, "INTERPRETER", False)
    monkeypatch.setattr(gemv_module, "_ACTIVE", gemv_module.tables_for("Card"))
    gate_up = quantize(rand(96, 256), "nf4")
    qkv = [quantize(rand(n, 256), "nf4") for n in (40, 16, 16)]
    assert config_for(gate_up, swiglu=True) == GemvConfig(4, 256, 4)
    assert config_for(qkv) == GemvConfig(8, 128, 2)  # one launch for q, k and v: the shape tuned for all 72 rows
    assert config_for(quantize(rand(96, 256), "fp4"), swiglu=True) not in shapes  # fp4: not tuned, its own default
    # and the lookup tuned with each shape (a GPU's default, the warp shuffle, where the table names none)
    monkeypatch.setattr(gemv4bit, "LOOKUP", "shuffle")
    monkeypatch.setattr(gemv4bit, "_TUNED_LOOKUPS", gemv4bit._table_lookups("Card"))
    assert lookup_for(gate_up, swiglu=True) == "pair" and lookup_for(qkv) == "load"
    assert lookup_for(quantize(rand(96, 256), "fp4"), swiglu=True) == "shuffle"
