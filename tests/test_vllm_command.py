"""`glmkit plan ... --for vllm`: the printed `vllm serve` line parses with vLLM's own flags (a fixture from its source)."""

import argparse
import json
import shlex
from pathlib import Path

import pytest

from glmkit import cli
from glmkit.models import glm4_9b_chat_config
from glmkit.planning import plan_memory
from glmkit.vllm_command import gpu_memory_utilization, parallel_flags, vllm_serve_command

FLAGS = json.loads((Path(__file__).parent / "fixtures" / "vllm_serve_flags.json").read_text())


def vllm_parser() -> argparse.ArgumentParser:
    """An argparse parser with the flags the fixture copied from vLLM (unknown flags or bad values fail)."""
    parser = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    for name in FLAGS["positional"]:
        parser.add_argument(name)
    for flag, spec in FLAGS["flags"].items():
        kw = {"choices": spec.get("choices"), "nargs": spec.get("nargs")}
        if spec.get("action") == "StoreBoolean":  # vLLM's: an optional "true"/"false" after the flag
            kw.update(const="True", default=None)
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[spec["type"]]
        parser.add_argument(*spec.get("aliases", []), flag, **{k: v for k, v in kw.items() if v is not None})
    return parser


def parse(argv):
    assert argv[:2] == ["vllm", "serve"]
    return vllm_parser().parse_args(argv[2:])


def test_two_cards_give_tensor_parallel_with_the_plan_numbers():
    plan = plan_memory(glm4_9b_chat_config(), ["24GiB", "24GiB"], context_len=8192, batch_size=8, prefill_chunk=2048)
    args = parse(vllm_serve_command(plan))
    assert args.model_tag == "zai-org/glm-4-9b-chat-hf" and args.served_model_name == ["glm-4", "glm-4-9b-chat"]
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, None)
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (8192, 8, 8 * 2048)
    assert args.gpu_memory_utilization == 0.9 and args.dtype == "bfloat16" and args.quantization is None


def test_quantized_partial_budget_on_one_card():
    plan = plan_memory(glm4_9b_chat_config(), ["12GiB"], context_len=4096, quantization="nf4")
    argv = vllm_serve_command(plan, model="/models/glm-4-9b-chat-hf", gpu_memory="24GiB")
    args = parse(argv)
    assert args.quantization == "bitsandbytes" and args.load_format == "bitsandbytes"
    assert args.gpu_memory_utilization == 0.5 and args.tensor_parallel_size is None
    assert args.model_tag == "/models/glm-4-9b-chat-hf" and args.max_num_batched_tokens is None
    assert parse(vllm_serve_command(plan_memory(glm4_9b_chat_config(), ["24GiB"], quantization="int8"))).quantization \
        == "fp8"


def test_parallel_choice_and_utilization_rules():
    assert parallel_flags(4, 32, 2) == ["--tensor-parallel-size", "4"]
    assert parallel_flags(3, 32, 2) == ["--pipeline-parallel-size", "3"]  # 32 heads do not split 3 ways
    assert gpu_memory_utilization(plan_memory(glm4_9b_chat_config(), ["23GiB"]), "24GiB") == 0.9  # capped
    assert gpu_memory_utilization(plan_memory(glm4_9b_chat_config(), ["30GiB"]), "80GiB") == 0.37  # rounded down


def test_a_plan_that_does_not_fit_or_cannot_run_on_vllm_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        vllm_serve_command(plan_memory(glm4_9b_chat_config(), ["8GiB"]))
    with pytest.raises(ValueError, match="no in-flight fp4"):
        vllm_serve_command(plan_memory(glm4_9b_chat_config(), ["24GiB"], quantization="fp4"))


def test_glmkit_plan_for_vllm_prints_a_line_vllm_parses(capsys):
    assert cli.main(["plan", "--devices", "24GiB", "24GiB", "--context", "8192", "--batch", "4",
                     "--prefill-chunk", "2048", "--for", "vllm"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    args = parse(shlex.split(line))
    assert args.tensor_parallel_size == 2 and args.max_model_len == 8192 and args.max_num_seqs == 4
