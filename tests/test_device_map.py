import pytest
import torch
from torch import nn
from transformers import LlamaConfig, Qwen2Config

from glmkit.device_map import (
    NATIVE_TO_REMOTE,
    DeviceMapError,
    as_model,
    check_device_map,
    even_split,
    model_units,
    split_layers,
    translate_names,
)
from glmkit.models import glm4_9b_chat_config, tiny_glm_config

C = glm4_9b_chat_config()
LLAMA = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128)
QWEN = Qwen2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)


def guide_map():
    """The map a widely read guide gives for GLM-4 (ChatGLM-6B v1 names, 30 layers, 15/15)."""
    dm = {"transformer.word_embeddings": 0, "transformer.final_layernorm": 1, "lm_head": 1}
    dm |= {f"transformer.layers.{i}": 0 if i < 15 else 1 for i in range(30)}
    return dm


def test_split_layers_20_20_for_glm4():
    dm = split_layers(C, [20, 20])
    assert [dm[f"model.layers.{i}"] for i in range(40)] == [0] * 20 + [1] * 20
    assert dm["model.embed_tokens"] == 0 and dm["model.norm"] == 1 and dm["lm_head"] == 1
    assert len(dm) == 44
    assert check_device_map(C, dm).devices == {
        "0": ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(20)],
        "1": [f"model.layers.{i}" for i in range(20, 40)] + ["model.norm", "lm_head"],
    }


@pytest.mark.parametrize("config", [LLAMA, QWEN, tiny_glm_config()])
def test_names_come_from_the_model_for_other_decoders(config):
    units = model_units(config)
    names = {n for n, _ in as_model(config).named_modules()}
    assert set(units.all) <= names
    dm = split_layers(config, [1, len(units.layers) - 1], devices=["cpu", "cpu"])
    check_device_map(config, dm)


def test_hand_built_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Toy(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(4, 10)

    toy = Toy()
    units = model_units(toy)
    assert (units.head, units.layers, units.tail) == (["embed"], ["blocks.0", "blocks.1", "blocks.2"], ["head"])
    assert split_layers(toy, [2, 1]) == {"embed": 0, "blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "head": 1}
    with pytest.raises(DeviceMapError, match="inside the decoder block 'blocks.1'"):
        check_device_map(toy, {"embed": 0, "blocks.0": 0, "blocks.1.fc": 0, "blocks.2": 1, "head": 1})


def test_guide_map_is_caught_with_the_right_names_and_count():
    with pytest.raises(DeviceMapError) as err:
        check_device_map(C, guide_map())
    msg = str(err.value)
    assert "ChatGLM-6B" in msg and "transformer.layers.0..29: 30 layers" in msg and "28 layers there" in msg
    assert "all 40 decoder layers (model.layers.N) would stay unmapped" in msg
    assert "40 decoder layers named model.layers.0..39" in msg and "model.embed_tokens" in msg
    assert "split_layers(model, [20, 20])" in msg


def test_remote_code_names_are_caught_and_translated():
    native = split_layers(C, [20, 20])
    remote = translate_names(native, NATIVE_TO_REMOTE)
    assert remote["transformer.encoder.layers.39"] == 1 and remote["transformer.output_layer"] == 1
    assert remote["transformer.embedding.word_embeddings"] == 0
    assert remote["transformer.encoder.final_layernorm"] == 1
    with pytest.raises(DeviceMapError, match="translate_names"):
        check_device_map(C, remote)
    assert translate_names(remote) == native


def test_unknown_unmapped_and_bad_devices():
    dm = split_layers(C, [20, 20])
    with pytest.raises(DeviceMapError, match="Unknown module names in the device map: model.layers.40"):
        check_device_map(C, dm | {"model.layers.40": 1})
    partial = {k: v for k, v in dm.items() if k not in ("model.layers.5", "model.layers.6", "lm_head")}
    with pytest.raises(DeviceMapError, match="3 modules are not in the device map: model.layers.5..6, lm_head"):
        check_device_map(C, partial)
    with pytest.raises(DeviceMapError, match="not a device"):
        check_device_map(C, dm | {"lm_head": "gpu1"})
    with pytest.raises(DeviceMapError, match="not a device"):
        check_device_map(C, dm | {"lm_head": -1})
    with pytest.raises(DeviceMapError, match="non-empty dict"):
        check_device_map(C, {})
    assert check_device_map(C, {"": 0}).devices == {"0": [""]}
    assert check_device_map(C, dm | {"lm_head": torch.device("cpu")})


def test_split_layers_bad_input():
    with pytest.raises(DeviceMapError, match="adds up to 30, but the model has 40 decoder layers"):
        split_layers(C, [15, 15])
    with pytest.raises(DeviceMapError, match="41 devices for 40 layers"):
        split_layers(C, [1] * 41)
    with pytest.raises(DeviceMapError, match="non-negative integers"):
        split_layers(C, [-1, 41])
    with pytest.raises(DeviceMapError, match="2 layer counts for 3 devices"):
        split_layers(C, [20, 20], devices=[0, 1, 2])


def test_even_split():
    assert even_split(40, 3) == [14, 13, 13] and sum(even_split(40, 7)) == 40
