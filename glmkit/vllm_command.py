"""The ``vllm serve`` command line a glmkit memory plan implies: ``glmkit plan ... --for vllm``.

When a team outgrows ``glmkit serve`` (many concurrent users, paged KV cache, guided JSON decoding), vLLM serves
the same model behind the same OpenAI API. This turns a ``MemoryPlan`` into its flags: ``--tensor-parallel-size``
(one rank per planned GPU; ``--pipeline-parallel-size`` when the heads do not split that many ways),
``--max-model-len`` (the plan's context), ``--max-num-seqs`` (its batch), ``--max-num-batched-tokens`` (its
prefill chunk times the batch: vLLM prefills in chunks, so plan with ``--prefill-chunk``), ``--gpu-memory-utilization`` (the
budget's share of each card), ``--dtype``, quantization, and ``--served-model-name`` with the names ``glmkit serve``
answers to, so clients change only the URL. vLLM is not installed beside glmkit's CPU torch pin; the flag names
come from vLLM's argument parser, recorded in ``tests/fixtures/vllm_serve_flags.json`` that the tests check against.
Introduced in ``notebooks/07_openai_server.ipynb``.

>>> from glmkit.models import glm4_9b_chat_config
>>> from glmkit.planning import plan_memory
>>> plan = plan_memory(glm4_9b_chat_config(), ["24GiB", "24GiB"], context_len=8192, batch_size=8, prefill_chunk=2048)
>>> print(vllm_serve_line(plan))
vllm serve zai-org/glm-4-9b-chat-hf --served-model-name glm-4 glm-4-9b-chat --tensor-parallel-size 2 \
--max-model-len 8192 --max-num-seqs 8 --gpu-memory-utilization 0.9 --dtype bfloat16 --enable-chunked-prefill \
--max-num-batched-tokens 16384
"""

from __future__ import annotations

import math
import shlex
from typing import Any

from glmkit.planning import MemoryPlan, parse_size

VLLM_MODEL = "zai-org/glm-4-9b-chat-hf"  # the transformers-native checkpoint vLLM loads without remote code
DEFAULT_UTILIZATION = 0.90  # vLLM's own default: room for the CUDA context and other processes
# glmkit's bitsandbytes modes -> vLLM flags. vLLM quantizes in flight to 4-bit NF4 with bitsandbytes; its 8-bit
# in-flight mode is fp8 (Ada/Hopper GPUs), the same weight bytes as int8.
QUANTIZATION_FLAGS = {
    None: [],
    "nf4": ["--quantization", "bitsandbytes", "--load-format", "bitsandbytes"],
    "nf4-dq": ["--quantization", "bitsandbytes", "--load-format", "bitsandbytes"],
    "int8": ["--quantization", "fp8"],
}


def parallel_flags(gpus: int, attention_heads: int, kv_heads: int) -> list[str]:
    """Tensor parallel over ``gpus`` when the heads split that many ways (vLLM replicates KV heads when there are
    fewer than ranks), else pipeline parallel (layers split, like glmkit's device maps).

    >>> parallel_flags(2, 32, 2), parallel_flags(3, 32, 2), parallel_flags(1, 32, 2)
    (['--tensor-parallel-size', '2'], ['--pipeline-parallel-size', '3'], [])
    """
    if gpus <= 1:
        return []
    if attention_heads % gpus == 0 and (gpus % kv_heads == 0 or kv_heads % gpus == 0):
        return ["--tensor-parallel-size", str(gpus)]
    return ["--pipeline-parallel-size", str(gpus)]


def gpu_memory_utilization(plan: MemoryPlan, gpu_memory: int | str | None = None) -> float:
    """The budget's share of each card (the smallest share: vLLM gives every rank the same fraction), at most 0.90.

    >>> from glmkit.models import glm4_9b_chat_config
    >>> from glmkit.planning import plan_memory
    >>> gpu_memory_utilization(plan_memory(glm4_9b_chat_config(), ["20GiB"]), gpu_memory="80GiB")
    0.25
    """
    gpus = [d for d in plan.devices if isinstance(d.device, int)]
    if gpu_memory is None:  # the budgets are the cards
        return DEFAULT_UTILIZATION
    card = parse_size(gpu_memory)
    share = min(d.budget for d in gpus) / card
    return min(DEFAULT_UTILIZATION, math.floor(share * 100) / 100)


def vllm_serve_command(plan: MemoryPlan, model: str = VLLM_MODEL, gpu_memory: int | str | None = None,
                       served_names: tuple[str, ...] = ("glm-4", "glm-4-9b-chat")) -> list[str]:
    """``vllm serve`` arguments for the workload ``plan`` describes (run ``shlex.join`` on them to print).

    Args:
        plan: a ``plan_memory`` result that fits; its GPUs, context, batch, dtype and quantization set the flags.
        model: the checkpoint vLLM loads (a Hub id or a folder).
        gpu_memory: each card's whole memory, when the plan's budgets are only part of it.
        served_names: the names clients ask for (``glmkit serve``'s defaults, so clients keep theirs).
    """
    if not plan.fits:
        raise ValueError(f"the plan does not fit ({plan.title()}); vLLM would fail to start the same way. "
                         "Fix the plan first (vLLM prefills in chunks: try --prefill-chunk 2048): " + plan.advice())
    if plan.quantization not in QUANTIZATION_FLAGS:
        raise ValueError(f"vLLM has no in-flight {plan.quantization} quantization: plan with --quantization nf4 "
                         "(vLLM's bitsandbytes 4-bit) or int8 (vLLM's fp8) instead.")
    config: Any = getattr(plan.request.model, "config", None) if plan.request else None
    heads = int(getattr(config, "num_attention_heads", 32))
    kv_heads = int(getattr(config, "num_key_value_heads", 2))
    gpus = sum(isinstance(d.device, int) for d in plan.devices)
    if any(not isinstance(d.device, int) for d in plan.devices if d.layers):
        raise ValueError("the plan puts layers on the CPU or disk; vLLM runs them on GPUs only "
                         "(its --cpu-offload-gb is slow): plan with GPU budgets only.")
    chunk = plan.request.workload.prefill_chunk if plan.request else None
    chunk_flags = ["--enable-chunked-prefill", "--max-num-batched-tokens", str(chunk * plan.batch_size)] if chunk else []
    return ["vllm", "serve", model, "--served-model-name", *served_names,
            *parallel_flags(gpus, heads, kv_heads),
            "--max-model-len", str(plan.context_len), "--max-num-seqs", str(plan.batch_size),
            "--gpu-memory-utilization", f"{gpu_memory_utilization(plan, gpu_memory):g}",
            "--dtype", plan.dtype, *chunk_flags, *QUANTIZATION_FLAGS[plan.quantization]]


def vllm_serve_line(plan: MemoryPlan, **kwargs: Any) -> str:
    """``vllm_serve_command`` as one shell line, quoted (what ``glmkit plan ... --for vllm`` prints)."""
    return shlex.join(vllm_serve_command(plan, **kwargs))


__all__ = ["QUANTIZATION_FLAGS", "VLLM_MODEL", "gpu_memory_utilization", "parallel_flags", "vllm_serve_command",
           "vllm_serve_line"]
