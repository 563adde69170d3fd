"""glmkit's decode-attention kernel (rope + KV-cache write + attention in one launch) against rope + index_put + SDPA,
run in Triton's CPU interpreter here (see the root conftest.py) and on a GPU there."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, greedy_rows, rand

import glmkit.attention
from glmkit.attention import BLOCK_N, decode_attention, split_length
from glmkit.fast_decode import FastDecoder, rope
from glmkit.gemv import triton_available
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (pip install triton)")


def inputs(b, heads, kv, hd, rotary, max_len, dtype, rows=None, seed=0):
    """q, k, v of one new token per sequence, caches of ``rows`` rows filled with noise, per-row cos/sin (GLM's
    layout: each frequency repeated for its pair of dims) at random angles."""
    rows = rows or b
    q, k, v = rand(b, heads, hd, seed=seed), rand(b, kv, hd, seed=seed + 1), rand(b, kv, hd, seed=seed + 2)
    k_cache, v_cache = rand(rows, kv, max_len, hd, seed=seed + 3), rand(rows, kv, max_len, hd, seed=seed + 4)
    angle = torch.rand(b, rotary // 2, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 6
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    return [t.to(dtype) for t in (q, k, v, k_cache, v_cache, cos, sin)]


def reference(q, k, v, k_cache, v_cache, pos, batch_index, cos, sin):
    """What the decoder computed before: rope in fp32 (as the compiled layer does), the K/V written at pos with
    index_put, SDPA over the rows' caches with the additive mask (0 up to pos, -inf after); caches updated in place."""
    b, max_len, dtype = q.shape[0], k_cache.shape[2], q.dtype
    c, s = cos.float()[:, None, None], sin.float()[:, None, None]
    q = rope(q.float()[:, :, None], c, s).to(dtype)
    k = rope(k.float()[:, :, None], c, s).to(dtype)
    k_cache[batch_index, :, pos] = k[:, :, 0]
    v_cache[batch_index, :, pos] = v
    mask = torch.zeros(b, 1, 1, max_len, dtype=dtype, device=q.device)
    mask = mask.masked_fill(torch.arange(max_len, device=q.device) > pos[:, None, None, None], float("-inf"))
    return F.scaled_dot_product_attention(q, k_cache[batch_index], v_cache[batch_index], attn_mask=mask,
                                          enable_gqa=True)


CASES = {  # b, heads, kv heads, head_dim, rotary dims, max_len, positions, cache rows, split
    "b1-one-split": (1, 4, 2, 64, 32, 40, [17], [0], None),
    "b3-rows-apart-4-splits": (3, 8, 2, 64, 32, 250, [0, 249, 130], [2, 0, 3], 64),
    "glm4-9b-heads-2-splits": (1, 32, 2, 128, 64, 128, [100], [0], 64),
    # pos the first position of its split (of a tile, one split): nothing before it there but the new k, v
    "b2-pos-at-split-starts": (2, 8, 2, 64, 32, 200, [128, 64], [0, 1], 64),
    "b1-pos-at-tile-start": (1, 4, 2, 64, 32, 300, [128], [0], None),
    "b1-three-tiles": (1, 4, 2, 64, 32, 300, [260], [0], None),
    # a split that is no power of two: tiles of 128, two a split (the second half past it)
    "b1-split-192": (1, 4, 2, 64, 32, 400, [300], [0], 192),
    # 9 splits in use of 10: the last program combines them TICKET_COMBINE_STEP a step, the last step partly empty
    "b1-nine-splits-combined": (1, 4, 2, 64, 32, 640, [550], [0], 64),
}


@pytest.mark.parametrize("case, dtype", [(c, d) for c in CASES for d in (torch.float32, torch.bfloat16, torch.float16)
                                         if d == torch.float32 or c != "b1-one-split"], ids=str)
def test_kernel_equals_rope_index_put_and_sdpa(case, dtype):
    b, heads, kv, hd, rotary, max_len, pos, rows, split = CASES[case]
    q, k, v, k_cache, v_cache, cos, sin = inputs(b, heads, kv, hd, rotary, max_len, dtype, rows=max(rows) + 1)
    pos, rows = torch.tensor(pos, device=DEVICE), torch.tensor(rows, device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference(q, k, v, want_k, want_v, pos, rows, cos, sin)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    # without tickets a split cache is combined by a second kernel; with them (the decoders' way), by the last
    # program of each KV head to finish, and a short cache at batch 1 is split into tiles side by side
    # (early: the kernel before left SMs to this one's programs, which then read tiles of EARLY_TILE positions)
    tix = torch.zeros(b * kv + 1, dtype=torch.int32, device=DEVICE)
    for tickets, early in ((None, False), (tix, False), (tix, True)):
        caches = k_cache.clone(), v_cache.clone()
        got = decode_attention(q, k, v, *caches, pos, rows, cos, sin, split=split, tickets=tickets, early=early)
        assert got.shape == (b, heads, 1, hd) and got.dtype == dtype
        # the output is a view of what o_proj reads, [b, 1, heads * head_dim], contiguous: no copy before it
        assert got.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(caches[0], want_k, rtol=tol, atol=tol)  # one rounding of rope: within an ulp
        assert torch.equal(caches[1], want_v)  # v goes in as it is; nothing else in the caches changed
        if tickets is not None:  # left as found, for the next call
            assert not tickets.any()


def test_positions_after_pos_are_never_read():
    # a chunked prefill or an earlier request leaves K/V after a row's position: whatever is there (NaN here)
    # must not change its output, in the split that holds pos and in the splits after it
    q, k, v, k_cache, v_cache, cos, sin = inputs(2, 4, 2, 64, 32, 256, torch.float32)
    pos, rows = torch.tensor([70, 3], device=DEVICE), torch.arange(2, device=DEVICE)
    clean = decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), pos, rows, cos, sin, split=64)
    for cache in (k_cache, v_cache):
        cache[0, :, 71:] = float("nan")
        cache[1, :, 4:] = float("nan")
    stale = decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin, split=64)
    assert torch.equal(stale, clean)


def test_the_combine_reads_only_the_splits_a_row_wrote(monkeypatch):
    # the partial maxima, sums and outputs of splits past a row's position are never written: buffers full of NaN
    # (what a CUDA graph's reused memory may hold) must not reach the output
    q, k, v, k_cache, v_cache, cos, sin = inputs(2, 4, 2, 64, 32, 256, torch.float32)
    pos, rows = torch.tensor([200, 5], device=DEVICE), torch.arange(2, device=DEVICE)
    clean = decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), pos, rows, cos, sin, split=64)
    empty = torch.empty
    def stale(*args, **kwargs):  # float buffers full of NaN
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(glmkit.attention.torch, "empty", stale)
    assert torch.equal(decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin, split=64), clean)


def test_rotary_tables_read_at_each_rows_position_equal_rows_given():
    # cos_table: the kernel reads row pos[i] of tables over all cache positions (the decoders' way, no gather kernel)
    q, k, v, k_cache, v_cache, cos, sin = inputs(3, 8, 2, 64, 32, 100, torch.float32)
    pos, rows = torch.tensor([7, 99, 42], device=DEVICE), torch.arange(3, device=DEVICE)
    cos_table, sin_table = rand(100, 32, seed=9), rand(100, 32, seed=10)
    cos_table[pos], sin_table[pos] = cos, sin
    want = decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), pos, rows, cos, sin)
    got = decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos_table, sin_table, cos_table=True)
    assert torch.equal(got, want)
    # a position past the cache (nothing written, the whole cache attended) reads the table's last row, not past it
    past = torch.tensor([100, 5, 6], device=DEVICE)
    torch.testing.assert_close(
        decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), past, rows, cos_table, sin_table, cos_table=True),
        decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), past, rows, cos_table[[99, 5, 6]],
                         sin_table[[99, 5, 6]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cos/sin \\[100 or more cache positions"):
        decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos_table[:99], sin_table[:99], cos_table=True)


def test_the_grid_reads_a_short_cache_in_early_tiles_only_where_the_kernel_before_left_it_sms():
    # batch 1 with tickets: tiles of TICKET_TILE side by side, or of EARLY_TILE when its programs start early (one
    # tile, no combine, up to EARLY_TILE[0] positions); a batch, or a long cache, splits as before either way
    grid = glmkit.attention.Grid.of
    tile, early_tile = glmkit.attention.TICKET_TILE[0], glmkit.attention.EARLY_TILE[0]
    assert (grid(1, 2, 200, True).tile, grid(1, 2, 200, True).splits) == (tile, -(-200 // tile))
    assert (grid(1, 2, 200, True, early=True).tile, grid(1, 2, 200, True, early=True).splits) == (early_tile, 1)
    assert grid(1, 2, 300, True, early=True).programs == 2 * -(-300 // early_tile)
    assert grid(1, 2, 200, False, early=True).tile == early_tile  # one program walking the cache: the same tile
    # a split given below the tile: tiles of a power of two within it (Triton's ranges), for either tile
    assert [grid(1, 2, 400, True, split, early).tile for split in (64, 192) for early in (False, True)] == \
        [64, 64, 128, 128]
    for b, max_len in ((4, 200), (1, 4096)):
        assert grid(b, 2, max_len, True, early=True) == grid(b, 2, max_len, True)
    assert grid(3, 2, 200, True).programs == 3 * 2 * grid(3, 2, 200, True).splits


def test_split_length_fills_the_gpu_on_long_caches_only():
    assert split_length(1, 2, 64) == BLOCK_N  # a short cache: one program per KV head
    assert split_length(1, 2, 288) == 320 and split_length(16, 2, 500) == 512  # whole, up to ONE_SPLIT_MAX
    assert 32768 // split_length(1, 2, 32768) == 128  # 32K at batch 1: 128 splits x 2 KV heads = 256 programs
    assert split_length(16, 2, 32768) == 4096  # batch 16 fills the GPU with rows: 8 splits
    assert all(split_length(b, 2, n) % BLOCK_N == 0 for b in (1, 3, 16) for n in (40, 1000, 5000))


def test_bad_inputs_name_the_problem():
    q, k, v, k_cache, v_cache, cos, sin = inputs(1, 4, 2, 64, 32, 64, torch.float32)
    pos, rows = torch.tensor([3], device=DEVICE), torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="q \\[b, heads, head_dim\\], k and v \\[b, kv_heads"):
        decode_attention(q, k[:, :1], v, k_cache, v_cache, pos, rows, cos, sin)
    with pytest.raises(ValueError, match="one position and one cache row per sequence"):
        decode_attention(q, k, v, k_cache, v_cache, torch.tensor([3, 4], device=DEVICE), rows, cos, sin)
    with pytest.raises(ValueError, match="multiple of 64"):
        decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin, split=100)
    with pytest.raises(ValueError, match="int64 cache rows"):
        decode_attention(q, k, v, k_cache, v_cache, pos, rows.int(), cos, sin)
    with pytest.raises(ValueError, match="integer positions"):
        decode_attention(q, k, v, k_cache, v_cache, pos.float(), rows, cos, sin)
    with pytest.raises(ValueError, match="q \\[b, heads, head_dim\\] and caches"):
        decode_attention(q[None], k, v, k_cache, v_cache, pos, rows, cos, sin)
    with pytest.raises(ValueError, match="tickets must be contiguous int32 zeros .* at least 2"):
        decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin, tickets=torch.zeros(2, device=DEVICE))


@pytest.fixture(scope="module")
def trained():
    return load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map=DEVICE)


def test_fast_decoder_with_triton_attention_and_gemv_gives_generates_tokens(trained):
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fast = FastDecoder(trained, max_len=16, attention="triton", gemv="triton", compile=False, cuda_graph=False)
    want = trained.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)
    assert fast.attention == "triton"
    assert torch.equal(fast.generate(ids, max_new_tokens=5, ignore_eos=True), want)


def test_rows_at_different_positions_over_several_splits_decode_like_generate(trained, monkeypatch):
    # two slots of a batch at their own positions (row 1 in the cache's second split of three): the engine's use
    monkeypatch.setattr(glmkit.attention, "ONE_SPLIT_MAX", 0)  # 160 positions in splits of 64, as a long cache
    assert split_length(2, 2, 160) == 64
    prompts = [torch.randint(0, 800, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in (5, 66)]
    dec = FastDecoder(trained, max_len=160, batch_size=2, attention="triton", compile=False, cuda_graph=False)
    logits = torch.cat([dec.prefill(p, slot=i) for i, p in enumerate(prompts)])
    got = greedy_rows(dec, logits, torch.tensor([5, 66], device=DEVICE), 4)
    for p, row in zip(prompts, got):
        want = trained.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=4, min_new_tokens=4,
                                do_sample=False)
        assert row == want[0, p.shape[1]:].tolist()


def test_a_short_cache_split_into_tiles_side_by_side_decodes_like_generate(trained, monkeypatch):
    # batch 1 with the decoder's tickets: tiles of 64 positions (TICKET_TILE), one program each, the last to finish
    # combining them; the prompt's 60 tokens and 8 new ones cross from the first tile into the second
    monkeypatch.setattr(glmkit.attention, "TICKET_TILE", (64, 4))
    ids = torch.randint(0, 800, (1, 60), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dec = FastDecoder(trained, max_len=160, attention="triton", compile=False, cuda_graph=False)
    want = trained.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                            do_sample=False)
    assert torch.equal(dec.generate(ids, max_new_tokens=8, ignore_eos=True), want)
    assert not dec.stages[0].tickets.any()  # left as found, for the next step


def broken(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.mark.parametrize("fails", [("attention",), ("gemv",), ("attention", "gemv")])
def test_auto_falls_back_from_the_kernel_that_failed_and_names_it(trained, monkeypatch, fails):
    # attention and GEMVs both chosen by "auto"; the one that fails (or both) gives way, the other stays glmkit's
    import glmkit.fast_decode

    monkeypatch.setattr(glmkit.fast_decode, "auto_attention", lambda device, dtype: "triton")
    monkeypatch.setattr(glmkit.fast_decode, "auto_gemv", lambda device, batch_size, dtype, four_bit=False: "triton")
    if "attention" in fails:
        monkeypatch.setattr(glmkit.attention, "decode_attention", broken)
    if "gemv" in fails:
        monkeypatch.setattr(glmkit.fast_decode, "triton_gemv", broken)
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = trained.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                            do_sample=False)
    auto = FastDecoder(trained, max_len=16, compile=False, cuda_graph=False)
    assert (auto.attention, auto.gemv) == ("triton", "triton")
    with pytest.warns(RuntimeWarning, match="failed here") as warned:
        got = auto.generate(ids, max_new_tokens=3, ignore_eos=True)
    named = {"attention": "glmkit's Triton decode attention", "gemv": "glmkit's Triton GEMV kernels"}
    instead = {"attention": "attention='sdpa'", "gemv": "cuBLAS (gemv=False)"}
    message = " and ".join(named[k] for k in fails) + " failed here (RuntimeError: no kernel image is available "
    message += "for execution on the device); FastDecoder uses " + " and ".join(instead[k] for k in fails) + " instead."
    assert [str(w.message) for w in warned if "failed here" in str(w.message)] == [message]
    assert auto.attention == ("sdpa" if "attention" in fails else "triton")
    assert auto.gemv == (False if "gemv" in fails else "triton")
    assert torch.equal(got, want)


def test_a_failure_of_no_fallbacks_kernel_is_raised_and_nothing_is_switched(trained, monkeypatch):
    import glmkit.fast_decode

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(glmkit.fast_decode, "auto_attention", lambda device, dtype: "triton")
    monkeypatch.setattr(glmkit.fast_decode, "residual_linear", out_of_memory)
    auto = FastDecoder(trained, max_len=16, gemv=False, compile=False, cuda_graph=False)
    with pytest.raises(RuntimeError, match="out of memory"):
        auto.generate(torch.tensor([[1, 2, 3]], device=DEVICE), max_new_tokens=2)
    assert auto.attention == "triton" and not auto.ready
    with pytest.raises(ValueError, match="attention must be 'auto', 'triton', 'sdpa' or 'reduction'"):
        FastDecoder(trained, attention="flash")


def test_a_tensor_parallel_rank_decodes_with_the_kernel_as_with_sdpa(trained):
    from glmkit.tp_decode import TPDecoder

    ids = torch.randint(0, 800, (2, 5), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    want = TPDecoder(trained, max_len=16, batch_size=2, attention="sdpa", compile=False, cuda_graph=False)
    got = TPDecoder(trained, max_len=16, batch_size=2, attention="triton", compile=False, cuda_graph=False)
    assert got.attention == "triton"
    # prefill in pieces of 2, 2, 1: the last one-token piece goes through the kernel too (positions expanded per row)
    assert torch.equal(got.generate(ids, 4, ignore_eos=True, prefill_chunk=2), want.generate(ids, 4, ignore_eos=True))


def test_cache_spans_decode_as_the_whole_cache_does_across_span_boundaries(trained, monkeypatch):
    # cache_spans: the batch-1 step attends over the shortest span that holds its position (here 8, 16 and the
    # whole 24-position cache), so the generation crosses two span boundaries; the attention reads the same
    # positions either way, so tokens and every step's logits are the decoder without spans', bit for bit
    import glmkit.fast_decode

    monkeypatch.setattr(glmkit.fast_decode, "ONE_SPLIT_MAX", 8)
    monkeypatch.setattr(glmkit.fast_decode, "SPAN_STEP", 2)
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    options = {"max_len": 24, "attention": "triton", "gemv": "triton", "compile": False, "cuda_graph": False}
    spans, whole = FastDecoder(trained, **options), FastDecoder(trained, cache_spans=False, **options)
    assert spans.spans(1) == [8, 16, 24] and whole.spans(1) == [24]  # on by default; off: the whole cache
    assert [spans.span_for(1, p) for p in (7, 8, 15, 16, 23)] == [8, 16, 16, 24, 24]
    used = []
    run_stages = spans._run_stages
    monkeypatch.setattr(spans, "_run_stages", lambda b, span: (used.append(span), run_stages(b, span))[1])
    assert torch.equal(spans.generate(ids, max_new_tokens=12, ignore_eos=True),
                       whole.generate(ids, max_new_tokens=12, ignore_eos=True))  # greedy: decode_greedy's spans
    assert sorted(set(used)) == [8, 16, 24]  # positions 6..17: each span in turn
    for d in (spans, whole):
        d.prefill(ids)
    token = ids[0, -1:]
    for p in range(6, 10):  # decode_step's spans (a position given: 8, then 16), logits bit for bit
        got, want = spans.decode_step(token, p).clone(), whole.decode_step(token, p).clone()
        assert torch.equal(got, want), p
        token = want.argmax(-1)


def test_the_engine_runs_a_lone_request_on_the_cache_span_that_holds_it(trained, monkeypatch):
    # the server's runner gives the decoder the highest position of the step (reach), so one request's steps replay
    # the spans 8, 16, 24 as its tokens go past them, and its tokens are a whole-cache decoder's
    import glmkit.fast_decode
    from glmkit.engine import Engine
    from glmkit.loading import load_tokenizer

    monkeypatch.setattr(glmkit.fast_decode, "ONE_SPLIT_MAX", 8)
    monkeypatch.setattr(glmkit.fast_decode, "SPAN_STEP", 2)
    options = {"max_len": 24, "attention": "triton", "gemv": "triton", "compile": False, "cuda_graph": False}
    decoder, whole = FastDecoder(trained, **options), FastDecoder(trained, cache_spans=False, **options)
    used = []
    run_stages = decoder._run_stages
    monkeypatch.setattr(decoder, "_run_stages", lambda b, span: (used.append(span), run_stages(b, span))[1])
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(5))
    want = whole.generate(ids.to(DEVICE), 12, ignore_eos=True)[0, 6:].tolist()
    engine = Engine(trained, load_tokenizer(TRAINED_TINY_DIR), max_batch_size=1, max_context=23, decoder=decoder)
    try:
        got = engine.submit(ids[0].tolist(), max_tokens=12).wait(120)
    finally:
        engine.close()
    assert got.finish_reason == "length" and got.tokens == want  # (this prompt's 12 greedy tokens hold no end token)
    assert sorted(set(used)) == [8, 16, 24]  # positions 6..17: each span in turn, not the whole cache each step


def test_a_layer_split_decodes_on_cache_spans_as_on_the_whole_cache(monkeypatch):
    # two segments (a split over two cards, here both on one device): every stage replays the step's span, and the
    # tokens are a whole-cache decoder's
    from accelerate import dispatch_model

    import glmkit.fast_decode
    from glmkit.device_map import split_layers

    monkeypatch.setattr(glmkit.fast_decode, "ONE_SPLIT_MAX", 8)
    monkeypatch.setattr(glmkit.fast_decode, "SPAN_STEP", 2)
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map=DEVICE)
    split = dispatch_model(model, split_layers(model, [3, 3], devices=[DEVICE, torch.device(DEVICE)]), main_device=DEVICE)
    options = {"max_len": 24, "attention": "triton", "gemv": "triton", "compile": False, "cuda_graph": False}
    spans, whole = FastDecoder(split, **options), FastDecoder(split, cache_spans=False, **options)
    assert len(spans.stages) == 2 and spans.spans(1) == [8, 16, 24]
    used, run_eager = [], spans._run_eager
    monkeypatch.setattr(spans, "_run_eager", lambda st, b, span=None: (used.append((st.segment.head, span)),
                                                                       run_eager(st, b, span))[1])
    ids = torch.randint(0, 800, (1, 6), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    spans.prefill(ids)  # the warm-up runs each stage on every span once
    used.clear()
    assert torch.equal(spans.generate(ids, max_new_tokens=12, ignore_eos=True),
                       whole.generate(ids, max_new_tokens=12, ignore_eos=True))
    assert set(used) == {(head, span) for head in (False, True) for span in (8, 16, 24)}  # each stage on each span
