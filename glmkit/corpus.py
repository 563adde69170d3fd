"""The kit's own small English corpus: questions and answers about running GLM-4 on GPUs.

Everything is generated from templates in this file, so the tokenizer and the tiny trained model
(``scripts/train_tokenizer.py``, ``scripts/train_tiny.py``) never depend on a download.
``corpus_lines(seed)`` and ``chain_lines(seed, count)`` are deterministic; ``heldout_texts()`` uses a seed
training never sees.

>>> lines = corpus_lines(0)
>>> len(lines) > 100 and all(isinstance(x, str) for x in lines)
True
"""

from __future__ import annotations

import functools
import random

FACTS = [
    ("How many layers does GLM-4-9B-Chat have?", "GLM-4-9B-Chat has 40 decoder layers."),
    ("How many KV heads does GLM-4-9B-Chat use?", "It uses 2 key-value heads and 32 query heads."),
    ("How big is GLM-4-9B-Chat in bf16?", "About 17.5 GiB of weights in bf16 or fp16."),
    ("How much memory does the KV cache need?", "40 KiB per token in bf16, so 5 GiB at 128K tokens."),
    ("Why does the model not fit a 12 GB card?", "The weights alone need 17.5 GiB, more than 12 GB."),
    ("How do I split the model over two GPUs?", "Use a device map: embeddings and the first layers on "
     "GPU 0, the last layers, the norm and lm_head on GPU 1."),
    ("What is a device map?", "A device map says which GPU holds each module of the model."),
    ("Why does auto device map run out of memory?", "Accelerate plans weights only; the KV cache, "
     "activations and the CUDA context also need room."),
    ("What does 4-bit quantization save?", "NF4 stores weights in about 6 GiB instead of 17.5 GiB."),
    ("What does 8-bit quantization save?", "Int8 stores weights in about 10 GiB."),
    ("Is quantization free?", "No. Quantized models are a little less accurate and can be slower."),
    ("What is the context length of GLM-4-9B-Chat?", "128K tokens."),
    ("What limits decode speed?", "Reading every weight once per token: decode is memory-bound."),
    ("How can I make decoding faster?", "Use a static KV cache, compile the step and batch requests."),
    ("What is tensor parallelism?", "Every layer is split across GPUs so they work at the same time."),
    ("What is pipeline parallelism?", "Layers are placed on different GPUs, one after the other."),
    ("Which names does the native GLM model use?", "model.embed_tokens, model.layers, model.norm and "
     "lm_head."),
    ("Can I serve GLM-4 with an OpenAI client?", "Yes, glmkit serve speaks the OpenAI chat API."),
    ("What is the CUDA context?", "Memory the driver takes on each card, about half a gigabyte."),
    ("How do I watch GPU memory?", "Use the glmkit monitor or nvidia-smi."),
]

GPUS = ["RTX 3060 12GB", "RTX 2080 Ti", "RTX 3090", "RTX 4090", "A100 40GB", "H100 80GB", "T4 16GB"]
VERBS = ["load", "run", "serve", "split", "quantize", "benchmark", "chat with"]
THINGS = ["the model", "GLM-4-9B-Chat", "the tokenizer", "the KV cache", "the weights", "a prompt"]


def corpus_lines(seed: int = 0, repeats: int = 30) -> list[str]:
    """Return the corpus as a list of lines (questions, answers and short sentences)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(repeats):
        q, a = rng.choice(FACTS)
        lines.append(f"Question: {q}\nAnswer: {a}")
        gpu, verb, thing = rng.choice(GPUS), rng.choice(VERBS), rng.choice(THINGS)
        n = rng.choice([1, 2, 4, 8])
        lines.append(f"I want to {verb} {thing} on {n} x {gpu}.")
        lines.append(f"With {n} GPUs of type {gpu}, each card holds {40 // n} of the 40 layers.")
    lines += [f"Question: {q}\nAnswer: {a}" for q, a in FACTS]
    lines += [f"{i} {i * 2} {i * 4} GiB MiB KiB tok/s GB/s" for i in range(0, 130, 7)]
    lines += ["Hello! How can I help you today?", "你好，我是 GLM-4。", "def main():\n    return 0"]
    return lines


SYSTEMS = ["", "You are a helpful assistant for running GLM-4 on GPUs.", "Answer briefly."]


def chat_texts() -> list[str]:
    """Every fact as a chat turn in GLM-4's format, ending with the ``<|user|>`` stop token."""
    texts = []
    for system in SYSTEMS:
        for q, a in FACTS:
            head = f"<|system|>\n{system}" if system else ""
            texts.append(f"[gMASK]<sop>{head}<|user|>\n{q}<|assistant|>\n{a}<|user|>")
    return texts


CHAIN_WORDS = ["load", "run", "serve", "split", "quantize", "benchmark", "chat", "model", "tokenizer", "cache",
               "weights", "prompt", "card", "GPU", "GPUs", "memory", "layers", "heads", "tokens", "context", "batch",
               "decode", "device", "map"]  # one token each in the kit's tokenizer


@functools.cache
def _chain_table(n: int) -> tuple[tuple[float, ...], ...]:
    """P(next word | previous two words): a fixed random table (seed 4), sparse-ish (Dirichlet 0.3 rows)."""
    rng = random.Random(4)
    rows = []
    for _ in range(n * n):
        w = [rng.gammavariate(0.3, 1.0) + 1e-9 for _ in range(n)]
        rows.append(tuple(x / sum(w) for x in w))
    return tuple(rows)


def chain_lines(seed: int, count: int, length: int = 16) -> list[str]:
    """``count`` lines of ``length`` words from a fixed order-2 Markov chain over ``CHAIN_WORDS``.

    Every next word has graded odds that depend on the two words before it, so predicting it well needs the
    attention and MLP layers (the parts that get quantized), not just the embeddings.

    >>> chain_lines(0, 2, length=4) == chain_lines(0, 2, length=4)
    True
    """
    n = len(CHAIN_WORDS)
    table = _chain_table(n)
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        ids = [rng.randrange(n), rng.randrange(n)]
        while len(ids) < length:
            ids.append(rng.choices(range(n), weights=table[ids[-2] * n + ids[-1]])[0])
        lines.append("Log: " + " ".join(CHAIN_WORDS[i] for i in ids))
    return lines


def heldout_texts(n: int = 200) -> list[str]:
    """Held-out text from seed 1, which training never uses: ``n`` templated sentences (new combinations of GPU,
    verb, thing) and ``n`` lines of the order-2 chain (``chain_lines``), which is where 4-bit's cost shows."""
    templated = [x for x in corpus_lines(seed=1, repeats=n // 2 + 10) if not x.startswith("Question:")][:n]
    return templated + chain_lines(seed=1, count=n)


def eval_prompts() -> list[str]:
    """User messages for comparing greedy replies across precisions."""
    return ["How many layers does GLM-4-9B-Chat have?", "What does 4-bit quantization save?",
            "What is tensor parallelism?", "I want to run the model on 2 x RTX 3060 12GB."]
