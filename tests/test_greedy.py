"""The greedy pick inside the decode step (``glmkit.greedy``, ``FastDecoder.decode_greedy``): the Triton kernel
against ``torch.argmax`` (in Triton's CPU interpreter here, see the root conftest.py), and the decoders' greedy
tokens against ``generate()``."""

import pytest
import torch

from glmkit.fast_decode import FastDecoder
from glmkit.gemv import triton_available
from glmkit.greedy import BLOCK, greedy_next
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR


def logits_with_traps(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits; row 0's largest value twice, in two programs' blocks (the first must win), row 1 with +inf
    before two NaNs (torch.argmax: the first NaN's index), row 2 all -inf (index 0)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    logits[0, 5] = logits[0, min(BLOCK + 3, vocab - 1)] = logits[0].max() + 1
    if rows > 1:
        logits[1, 1] = float("inf")
        logits[1, vocab // 2] = logits[1, vocab - 1] = float("nan")
    if rows > 2:
        logits[2] = float("-inf")
    return logits


@pytest.mark.skipif(not triton_available(), reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("rows, vocab", [(1, 151552), (3, 3 * BLOCK + 17), (2, 100)])
def test_the_kernel_picks_what_torch_argmax_picks_and_moves_the_position_on(rows, vocab):
    logits = logits_with_traps(rows, vocab, seed=vocab)
    control = torch.tensor([[9] * 4, [30, 31, 32, 33], [rows] * 4])  # 4 columns: the rows past `rows` keep theirs
    tickets = torch.zeros(4, dtype=torch.int32)
    greedy_next(logits, control, tickets)
    want = torch.tensor([[9] * 4, [30, 31, 32, 33], [rows] * 4])
    want[0, :rows], want[1, :rows] = logits.argmax(-1), want[1, :rows] + 1
    assert control.tolist() == want.tolist()
    assert control[0, 0] == 5  # the first of two equal largest values
    if rows > 1:
        assert control[0, 1] == vocab // 2  # the first NaN, not the +inf before it
    assert tickets.tolist() == [0, 0, 0, 0]  # left as found, for the next step
    torch_control = torch.tensor([[9] * 4, [30, 31, 32, 33], [rows] * 4])
    greedy_next(logits, torch_control, tickets, kernel=False)
    assert torch.equal(torch_control, control)


def test_bad_buffers_are_explained():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match=r"control must be int64 \[3, >= 2\]"):
        greedy_next(logits, torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows contiguous"):  # a column-major control: the kernel reads rows
        greedy_next(logits, torch.zeros(2, 3, dtype=torch.long).T, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="tickets must be contiguous int32 zeros, at least 2"):
        greedy_next(logits, torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.int64))


@pytest.fixture(scope="module")
def trained():
    return load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")


def generate_new(model, ids, n):
    """generate()'s n new greedy tokens (prompts that say no end token within them: checked)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[:, ids.shape[1]:]
    assert new.shape[1] == n and not torch.isin(new, torch.tensor(model.generation_config.eos_token_id)).any()
    return new


@pytest.mark.parametrize("gemv, rows, batch_size", [(False, 3, 4), ("triton", 1, 1)])
def test_decode_greedy_continues_decode_step_as_generate_does(trained, gemv, rows, batch_size):
    if gemv and not triton_available():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1)")
    ids = torch.randint(0, 800, (rows, 7), generator=torch.Generator().manual_seed(7))
    # cuBLAS: three rows in a step of four (a dummy row; the pick writes every row of the step, the live ones are
    # read); glmkit's Triton kernels (one row): the pick is the Triton kernel too
    decoder = FastDecoder(trained, max_len=32, batch_size=batch_size, graph_batch_sizes=[batch_size], gemv=gemv)
    assert decoder.bucket(rows) == batch_size and decoder.gemv == gemv
    first = torch.cat([decoder.prefill(ids[i:i + 1], slot=i).argmax(-1) for i in range(rows)])
    new = [first, decoder.decode_step(first, 7).argmax(-1)]
    new += [decoder.decode_greedy() for _ in range(6)]
    assert torch.equal(torch.stack(new, dim=1), generate_new(trained, ids, 8))
    assert decoder.stages[0].control[1, :rows].tolist() == [14] * rows  # the position the next step decodes


def test_decode_greedy_refuses_what_it_cannot_continue(trained):
    decoder = FastDecoder(trained, max_len=10)
    with pytest.raises(RuntimeError, match=r"call decode_step\(tokens, pos\)"):
        decoder.decode_greedy()
    ids = torch.tensor([[1, 2, 3]])
    decoder.prefill(ids)
    decoder.decode_step(torch.tensor([4]), torch.tensor([3]))  # a position per row: not continued
    with pytest.raises(RuntimeError, match="one position for all rows"):
        decoder.decode_greedy()
    decoder.prefill(ids)
    decoder.decode_step(torch.tensor([4]), 3)
    for _ in range(6):  # positions 4 .. 9
        decoder.decode_greedy()
    with pytest.raises(ValueError, match="position 10, past max_len=10"):
        decoder.decode_greedy()
    decoder.prefill(ids)  # a prefill starts anew
    with pytest.raises(RuntimeError, match="after each prefill"):
        decoder.decode_greedy()


def test_a_stream_yields_its_end_token_and_nothing_after_though_it_queues_a_step_ahead(trained):
    decoder = FastDecoder(trained, max_len=64)
    ids = torch.randint(0, 800, (1, 5), generator=torch.Generator().manual_seed(5))
    want = generate_new(trained, ids, 6)[0].tolist()
    stop = want[2]  # an "end token" the third new token is: the stream yields it, then stops
    assert [int(t) for t in decoder.stream(ids, 6, eos_token_ids=[stop])] == want[:want.index(stop) + 1]
    assert [int(t) for t in decoder.stream(ids, 1)] == want[:1]  # one token: no step queued after it


def test_the_warm_up_leaves_no_position_past_the_first(trained):
    # the warm-up steps decode token 0 at position 0 (where a prefill writes first), however many steps it runs: a
    # greedy pick that moved their position on would write past a cache of two positions
    decoder = FastDecoder(trained, max_len=2, batch_size=4, attention="sdpa")
    first = decoder.prefill(torch.tensor([[1], [2], [3], [4]])).argmax(-1)
    logits = decoder.decode_step(first, 1)
    want = trained.generate(torch.tensor([[1], [2], [3], [4]]), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert torch.equal(torch.stack([first, logits.argmax(-1)], dim=1), want[:, 1:])
