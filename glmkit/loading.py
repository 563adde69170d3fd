"""Load a GLM-4 checkpoint and its tokenizer, with the options named as transformers names them.

``load_model(path, dtype=..., device_map=..., max_memory=..., offload_folder=...,
quantization_config=...)`` checks the things users get wrong *before* transformers starts
(missing folder, not a GLM checkpoint, the original remote-code ``glm-4-9b-chat`` format, a GPU
device map on a machine without GPUs) and raises an error whose message names the fix.
Introduced in ``notebooks/00_setup.ipynb``.

>>> model = load_model()            # $GLMKIT_MODEL, else the tiny checkpoint
>>> type(model).__name__, model.config.model_type
('GlmForCausalLM', 'glm')
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from glmkit.device_map import check_device_map
from glmkit.env import use_expandable_segments
from glmkit.models import TOKENIZER_DIR, default_model_path
from glmkit.vocabulary import QUANTIZATION_CHOICES, STRATEGIES, gpu_index, quantization_name

# model_type values of checkpoints transformers loads natively as GLM-4 (GlmForCausalLM / Glm4ForCausalLM).
NATIVE_GLM_TYPES = ("glm", "glm4")
HF_REPO_HINT = (
    "download the transformers-native checkpoint instead, e.g. "
    "`hf download zai-org/glm-4-9b-chat-hf --local-dir glm-4-9b-chat-hf` "
    "(formerly THUDM/glm-4-9b-chat-hf), and point GLMKIT_MODEL at that folder"
)




class QuietKernelsHint(logging.Filter):
    """Drops bitsandbytes' "pip install kernels" warning: on CPUs with AVX512-BF16 it logs it when it is imported and
    the optional ``kernels`` package (a Hub download) is missing, then runs its own CPU code. Nothing for a user to do.

    >>> QuietKernelsHint().filter(logging.makeLogRecord({"msg": "Please `pip install kernels` and ..."}))
    False
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "pip install kernels" not in record.getMessage()


def quiet_bitsandbytes_kernels_hint() -> None:
    """Install ``QuietKernelsHint`` on the bitsandbytes logger that emits it (before bitsandbytes is imported)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, QuietKernelsHint) for f in logger.filters):
        logger.addFilter(QuietKernelsHint())


quiet_bitsandbytes_kernels_hint()  # transformers imports bitsandbytes when glmkit first loads a model


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist."""


class NotAGlmCheckpointError(ValueError):
    """The folder exists but holds no GLM-4 checkpoint in transformers' format."""


class RemoteCodeCheckpointError(ValueError):
    """The folder is the original ``THUDM/glm-4-9b-chat`` (``trust_remote_code``) format."""


class NoGpuError(RuntimeError):
    """The device map names GPUs that this machine does not have."""


def resolve_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """Return the checkpoint folder to use: ``path``, else ``$GLMKIT_MODEL``, else the tiny one.

    Raises ``CheckpointNotFoundError`` if the folder is missing.
    """
    folder = Path(path).expanduser() if path is not None else default_model_path()
    if not folder.exists():
        raise CheckpointNotFoundError(
            f"No checkpoint at '{folder}'. Pass the folder of a local GLM-4-9B-Chat checkpoint "
            "(the '-hf' format), set GLMKIT_MODEL to it, or build the tiny test model with "
            f"`glmkit make-tiny {folder}`."
        )
    return folder


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` and make sure the folder is a loadable native GLM-4 checkpoint.

    Returns the config as a dict. Raises ``NotAGlmCheckpointError`` or
    ``RemoteCodeCheckpointError`` with the fix in the message.
    """
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.exists():
        raise NotAGlmCheckpointError(
            f"'{folder}' is not a model checkpoint: it has no config.json. Point at the folder "
            "that holds config.json and *.safetensors of GLM-4-9B-Chat (the '-hf' format)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise NotAGlmCheckpointError(f"'{config_file}' is not valid JSON ({exc}).") from None
    model_type = config.get("model_type", "")
    if model_type == "chatglm" or "auto_map" in config:
        raise RemoteCodeCheckpointError(
            f"'{folder}' is the original remote-code GLM-4 checkpoint (model_type "
            f"'{model_type}', modules transformer.encoder.layers.N, needs trust_remote_code). "
            f"glmkit loads the transformers-native format (model_type 'glm'): {HF_REPO_HINT}."
        )
    if model_type not in NATIVE_GLM_TYPES:
        raise NotAGlmCheckpointError(
            f"'{folder}' holds a '{model_type or 'unknown'}' model, not GLM-4 "
            f"(expected model_type {' or '.join(map(repr, NATIVE_GLM_TYPES))}). "
            "Point at a GLM-4-9B-Chat '-hf' checkpoint."
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise NotAGlmCheckpointError(
            f"'{folder}' has a GLM config but no weights (*.safetensors). The download is "
            "incomplete: fetch the model-*.safetensors files too."
        )
    return config


def gpu_indices(device_map: Any) -> set[int]:
    """GPU indices a ``device_map`` value names (``0``, ``"cuda:1"``, ``torch.device``...).

    >>> sorted(gpu_indices({"model.embed_tokens": 0, "model.layers.0": "cuda:1", "lm_head": "cpu"}))
    [0, 1]
    >>> gpu_indices("auto")
    set()
    """
    if isinstance(device_map, dict):
        values = list(device_map.values())
    elif device_map is None or device_map in STRATEGIES:
        return set()
    else:
        values = [device_map]
    return {i for i in map(gpu_index, values) if i is not None}


def check_gpus_exist(device_map: Any) -> None:
    """Raise ``NoGpuError`` if ``device_map`` names a GPU this machine does not have."""
    wanted = gpu_indices(device_map)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = sorted(i for i in wanted if i >= have)
    if missing:
        raise NoGpuError(
            f"The device map puts modules on GPU {', '.join(map(str, missing))}, but this machine "
            f"has {have} GPU{'s' if have != 1 else ''}. Load with device_map='cpu' here, or plan "
            "the GPU layout without loading: glmkit.planning.plan_memory(config, devices=...)."
        )


def default_device_map() -> str:
    """The whole model on the first GPU when there is one, else on the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def bnb_config(
    quantization: str,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = False,
) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``"int8"``, ``"nf4"`` or ``"fp4"``.

    ``lm_head`` stays in 16 bit (transformers keeps the output layer unquantized by default;
    quantizing GLM-4's 151552-row output layer costs quality for 1 GiB).

    >>> bnb_config("nf4", double_quant=True).bnb_4bit_quant_type
    'nf4'
    """
    kind = quantization_name(quantization)  # raises for names glmkit does not know
    if kind is None:
        raise ValueError(f"'{quantization}' keeps the weights in 16 bit: load without a quantization config, or "
                         f"use one of {', '.join(QUANTIZATION_CHOICES)}.")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind.removesuffix("-dq"),  # "nf4-dq": nf4 with double quantization
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant or kind.endswith("-dq"),
    )


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    max_memory: dict[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantization_config: Any = None,
    quantization: str | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a GLM-4 checkpoint as ``GlmForCausalLM`` in eval mode (transformers shows a progress bar).

    Args:
        path: checkpoint folder; ``None`` uses ``$GLMKIT_MODEL``, else the tiny checkpoint.
        dtype: ``"auto"`` (the checkpoint's dtype), ``torch.bfloat16``, ``"float16"``...
        device_map: as in transformers; ``None`` puts the whole model on GPU 0 if there is one,
            else on the CPU. A dict is checked against the model first (names, coverage).
        max_memory: per-device budgets for ``"auto"``-style maps, e.g. ``{0: "11GiB", "cpu": "30GiB"}``.
        offload_folder: where weights offloaded to ``"disk"`` go.
        quantization_config: a transformers ``BitsAndBytesConfig`` (or any quantization config).
        quantization: shorthand for it: ``"int8"``, ``"nf4"``, ``"fp4"``, or ``"nf4-dq"``/``"fp4-dq"``
            (4-bit with double quantization).
        **kwargs: passed on to ``from_pretrained`` (e.g. ``attn_implementation="sdpa"``).

    >>> m = load_model(dtype=torch.float32, device_map="cpu")
    >>> m.training, next(m.parameters()).dtype
    (False, torch.float32)
    """
    use_expandable_segments()  # before CUDA starts, as in every process glmkit starts: what the planner assumes
    folder = resolve_checkpoint(path)
    check_checkpoint(folder)
    if device_map is None:
        device_map = default_device_map()
    check_gpus_exist(device_map)
    if isinstance(device_map, dict):
        check_device_map(folder, device_map)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if quantization is not None:
        if quantization_config is not None:
            raise ValueError("Pass either quantization or quantization_config, not both.")
        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        quantization_config = bnb_config(quantization, compute_dtype=compute)
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, **kwargs)
    return model.eval()


def load_tokenizer(path: str | os.PathLike | None = None) -> Any:
    """Load the tokenizer of a checkpoint (``None``: ``$GLMKIT_MODEL``, else the shipped tiny one).

    >>> tok = load_tokenizer()
    >>> tok.convert_tokens_to_ids("[gMASK]") == tok("[gMASK]", add_special_tokens=False).input_ids[0]
    True
    """
    if path is None and not os.environ.get("GLMKIT_MODEL"):
        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    folder = resolve_checkpoint(path)
    check_checkpoint(folder)
    return AutoTokenizer.from_pretrained(folder)
