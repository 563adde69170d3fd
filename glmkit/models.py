"""GLM-4-9B-Chat and tiny GLM presets, and the checkpoint builders (tiny, and full-size with random weights).

The tiny model has GLM-4's exact architecture (``GlmForCausalLM``: grouped KV heads, partial
rotary, fused gate/up MLP, untied ``lm_head``) at toy sizes, so every code path the kit teaches
runs on a laptop and in CI. Every weight dimension is a multiple of 64 so bitsandbytes can
quantize it to 4 bit. Introduced in ``notebooks/00_setup.ipynb``.

>>> glm4_9b_chat_config().num_hidden_layers, glm4_9b_chat_config().num_key_value_heads
(40, 2)
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, GlmConfig, GlmForCausalLM

from glmkit.device_map import as_model

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
# The tiny GLM trained for a few CPU minutes on glmkit.corpus (scripts/train_tiny.py); it answers sensibly.
TRAINED_TINY_DIR = ASSETS / "tiny-glm-trained"

# GLM-4's special-token ids in the *tiny* tokenizer (the real ones are 151329, 151336, 151338).
# They are read from the shipped tokenizer so the two can never disagree.
_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def glm4_9b_chat_config() -> GlmConfig:
    """The exact GLM-4-9B-Chat architecture (``THUDM/glm-4-9b-chat-hf``), from transformers' defaults.

    40 layers, hidden 4096, MLP 13696, 32 query heads, 2 KV heads, head_dim 128, vocab 151552,
    128K context, untied embeddings (``tests/test_models.py`` checks them).

    >>> c = glm4_9b_chat_config()
    >>> (c.hidden_size, c.intermediate_size, c.vocab_size, c.max_position_embeddings)
    (4096, 13696, 151552, 131072)
    """
    return GlmConfig(
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1.5625e-07,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=151329,
        eos_token_id=[151329, 151336, 151338],
    )


@lru_cache(maxsize=1)
def glm4_9b_meta_model() -> torch.nn.Module:
    """GLM-4-9B-Chat on the meta device (names and shapes, no memory), built once per process: the planner's calls
    on it then take milliseconds, and its per-model caches hit. Read it; do not change it."""
    return as_model(glm4_9b_chat_config())


def _tiny_special_ids() -> tuple[int, list[int]]:
    vocab = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    return ids["<|endoftext|>"], [ids[t] for t in _EOS_TOKENS]


def tiny_glm_config(num_hidden_layers: int = 6) -> GlmConfig:
    """A tiny GLM-4 (about 4.6 M parameters) with the same shape *ratios* as the real one.

    2 KV heads for 4 query heads (GQA), head_dim 64, partial rotary 0.5, untied lm_head, and
    every weight dimension a multiple of 64 (bitsandbytes 4-bit needs it).

    >>> c = tiny_glm_config()
    >>> c.hidden_size % 64, c.intermediate_size % 64, c.vocab_size % 64, c.num_key_value_heads
    (0, 0, 0, 2)
    """
    pad_id, eos_ids = _tiny_special_ids()
    return GlmConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, num_hidden_layers: int = 6) -> Path:
    """Write a real, loadable tiny GLM checkpoint (safetensors, config, generation config, tokenizer).

    Weights are random (``torch.manual_seed(seed)``), so the same seed gives the same files and
    the same greedy output. Returns the checkpoint folder.

    Args:
        path: folder to write (created if missing).
        seed: seed of the random initialisation.
        num_hidden_layers: decoder layers (6 by default: enough for two- and three-way splits).

    >>> import tempfile
    >>> p = build_tiny_checkpoint(tempfile.mkdtemp())
    >>> sorted(f.name for f in p.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors',
     'tokenizer.json', 'tokenizer_config.json']
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_glm_config(num_hidden_layers)
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False,
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def random_model(config: GlmConfig | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> GlmForCausalLM:
    """``config`` (default: GLM-4-9B-Chat) with random weights (``torch.manual_seed(seed)``), built straight on
    ``device`` (default: the GPU if there is one) in ``dtype``, in eval mode: the benchmarks' stand-in for the real
    weights (building the 9B model on an H100 takes under a second).

    >>> random_model(tiny_glm_config(2), "cpu", torch.float32).model.layers[0].mlp.down_proj.weight.dtype
    torch.float32
    """
    config = config or glm4_9b_chat_config()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            return GlmForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)


def build_random_checkpoint(path: str | os.PathLike, config: GlmConfig | None = None,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a checkpoint of ``config`` (default: GLM-4-9B-Chat) with random weights, built on the GPU if there is one.

    Same shapes, memory and speed as the real model; the benchmarks use it because no weights can be downloaded
    (building the 9B model on an H100 takes under a second, saving it about 30 s).

    >>> import tempfile
    >>> p = build_random_checkpoint(tempfile.mkdtemp(), tiny_glm_config(2), dtype=torch.float32)
    >>> (p / "config.json").exists(), (p / "tokenizer.json").exists()
    (True, True)
    """
    path = Path(path)
    model = random_model(config, dtype=dtype)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def ensure_random_checkpoint(path: str | os.PathLike, config: GlmConfig | None = None) -> Path:
    """``path`` if it already holds a checkpoint, else a random-weight one built there (``build_random_checkpoint``)."""
    path = Path(path)
    return path if (path / "config.json").exists() else build_random_checkpoint(path, config)


def cache_dir() -> Path:
    """Where glmkit keeps built artifacts: ``$GLMKIT_CACHE`` or ``~/.cache/glmkit``."""
    return Path(os.environ.get("GLMKIT_CACHE", Path.home() / ".cache" / "glmkit"))


def tiny_checkpoint_path() -> Path:
    """The tiny checkpoint in the cache, built on first use (about a second)."""
    path = cache_dir() / "tiny-glm"
    if not (path / "model.safetensors").exists():
        build_tiny_checkpoint(path)
    return path


def model_label(path: str | os.PathLike) -> str:
    """How tables, results and notebooks name a model: the shipped tiny GLM-4 by name, any other checkpoint by its
    folder name, never by an absolute path of this machine (which would end up in committed outputs).

    >>> model_label(TRAINED_TINY_DIR)
    'tiny trained GLM-4 (glmkit/assets/tiny-glm-trained)'
    >>> model_label("/data/models/glm-4-9b-chat-hf"), model_label("GLM-4-9B-Chat, random weights")
    ('glm-4-9b-chat-hf', 'GLM-4-9B-Chat, random weights')
    """
    text = str(path)
    if "/" not in text and os.sep not in text:
        return text
    folder = Path(text).expanduser()
    if folder.name == TRAINED_TINY_DIR.name and folder.parent.name == ASSETS.name:
        return "tiny trained GLM-4 (glmkit/assets/tiny-glm-trained)"
    return folder.name or text


def default_model_path() -> Path:
    """``$GLMKIT_MODEL`` (a local GLM-4-9B-Chat checkpoint) when set, else the shipped trained tiny GLM."""
    env = os.environ.get("GLMKIT_MODEL")
    return Path(env).expanduser() if env else TRAINED_TINY_DIR
