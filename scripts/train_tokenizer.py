"""Train the tiny byte-level BPE tokenizer shipped in ``glmkit/assets/tokenizer``.

Run: ``python scripts/train_tokenizer.py`` (deterministic; takes about a second).
The vocabulary is tiny (1024 ids, a multiple of 64 so bitsandbytes can quantize the
embedding-sized matrices), but the special tokens and the chat template are GLM-4's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glmkit.corpus import corpus_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "glmkit" / "assets" / "tokenizer"
VOCAB_SIZE = 1024
# GLM-4's special tokens, in the order of the official tokenizer (its ids start at 151329).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
]


def train(out: Path = OUT) -> Path:
    """Train the tokenizer and save it (tokenizer.json, tokenizer_config.json, chat template) to ``out``."""
    # Local import: the template lives in the package so tests can compare against it.
    sys.path.insert(0, str(ROOT))
    from transformers import PreTrainedTokenizerFast

    from glmkit.chat_template import GLM4_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(0), trainer=trainer)
    # Specials go last, like GLM-4 (its specials follow the regular vocabulary).
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=GLM4_CHAT_TEMPLATE,
        model_max_length=131072,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    print(f"wrote {out} with {len(fast)} tokens")
    return out


if __name__ == "__main__":
    train(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
