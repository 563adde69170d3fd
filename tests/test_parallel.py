"""Tensor parallelism through the glmkit entry point: 2 processes (gloo on CPU) give the single-process tokens
(``glmkit generate`` run in this test process: the ``generate_here`` fixture)."""

import pytest

from glmkit.cli import main
from glmkit.models import TRAINED_TINY_DIR, glm4_9b_chat_config, tiny_glm_config
from glmkit.parallel import run_generate, tp_problem


def test_two_process_tensor_parallel_matches_one_process(generate_here):
    one = generate_here()
    two = run_generate(TRAINED_TINY_DIR, tp=2)  # raises unless exactly one process (rank 0) printed
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["tokens"] == two["tokens"] and 0 < len(one["tokens"]) <= 16  # the end token is not a token of the reply
    assert "40" in one["text"]


def test_tp_degree_must_divide_the_kv_heads(capsys):
    assert tp_problem(glm4_9b_chat_config(), 2) is None
    assert "2 KV heads" in tp_problem(glm4_9b_chat_config(), 4)
    assert "0.25 of a KV head" in tp_problem(glm4_9b_chat_config(), 8)
    assert tp_problem(tiny_glm_config(), 3) is not None
    # refused before any process starts (in this process: no interpreter to start for a refusal)
    assert main(["generate", "--model", str(TRAINED_TINY_DIR), "--tp", "4"]) == 2
    assert "4 processes cannot split 2 KV heads" in capsys.readouterr().err


def test_run_generate_raises_with_the_exit_code_and_the_processes_words(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)exit 2.*is not a folder"):
        run_generate(tmp_path / "nothing-here", tp=2)  # (argparse refuses it before torch.distributed starts)
