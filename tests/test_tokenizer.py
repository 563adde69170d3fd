import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmkit.chat_template import GLM4_TOOL_SUFFIX
from glmkit.loading import load_tokenizer
from glmkit.models import TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_chat_template_is_glm4_byte_for_byte(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\nU<|assistant|>"


def test_multi_turn_and_no_generation_prompt(tok):
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\nA<|assistant|>\nB<|user|>\nC<|assistant|>"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False) == "[gMASK]<sop><|user|>\nA"


def test_tools_become_the_glm4_tool_system_prompt_and_calls_round_trip(tok):
    fn = {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}
    msgs = [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(msgs, tools=[{"type": "function", "function": fn}], tokenize=False,
                                   add_generation_prompt=True)
    expected_system = (
        "<|system|>\n你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n"
        + json.dumps(fn, ensure_ascii=False, indent=4) + "\n" + GLM4_TOOL_SUFFIX
    )
    assert text == ("[gMASK]<sop>" + expected_system + "<|user|>\nParis?<|assistant|>get_weather\n"
                    '{"city": "Paris"}<|observation|>\nsunny<|assistant|>')


def test_special_tokens_are_single_ids(tok):
    ids = [tok(t, add_special_tokens=False).input_ids for t in SPECIALS]
    assert all(len(i) == 1 for i in ids)
    assert [i[0] for i in ids] == tok.convert_tokens_to_ids(SPECIALS)
    assert len(set(i[0] for i in ids)) == len(SPECIALS)
    encoded = tok("[gMASK]<sop><|user|>\nhi<|assistant|>", add_special_tokens=False).input_ids
    assert encoded[:3] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>", "<|user|>"])


def test_decode_round_trips_text(tok):
    text = "GLM-4-9B-Chat has 40 layers and 2 KV heads. 你好!"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_training_script_reproduces_the_shipped_tokenizer(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), str(tmp_path)], check=True,
                   capture_output=True)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
