"""Tensor parallelism through the glmkit entry point: 2 processes (gloo on CPU) give the single-process tokens."""

import pytest

from glmkit.models import TRAINED_TINY_DIR, glm4_9b_chat_config, tiny_glm_config
from glmkit.parallel import run_generate, tp_problem


def test_two_process_tensor_parallel_matches_one_process():
    one = run_generate(TRAINED_TINY_DIR, tp=1)
    two = run_generate(TRAINED_TINY_DIR, tp=2)  # raises unless exactly one process (rank 0) printed
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["tokens"] == two["tokens"] and 0 < len(one["tokens"]) <= 16  # the end token is not a token of the reply
    assert "40" in one["text"]


def test_tp_degree_must_divide_the_kv_heads():
    assert tp_problem(glm4_9b_chat_config(), 2) is None
    assert "2 KV heads" in tp_problem(glm4_9b_chat_config(), 4)
    assert "0.25 of a KV head" in tp_problem(glm4_9b_chat_config(), 8)
    assert tp_problem(tiny_glm_config(), 3) is not None
    with pytest.raises(RuntimeError, match="exit 2.*KV heads"):
        run_generate(TRAINED_TINY_DIR, tp=4)
