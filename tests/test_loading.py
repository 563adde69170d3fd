import json
import shutil

import pytest
import torch

from glmkit.device_map import DeviceMapError
from glmkit.loading import (
    CheckpointNotFoundError,
    NoGpuError,
    NotAGlmCheckpointError,
    RemoteCodeCheckpointError,
    load_model,
    load_tokenizer,
)
from glmkit.models import build_tiny_checkpoint


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="glmkit make-tiny"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(NotAGlmCheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_other_architecture_is_not_glm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotAGlmCheckpointError, match="'llama' model, not GLM-4"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path, tiny_path):
    shutil.copy(tiny_path / "config.json", tmp_path / "config.json")
    with pytest.raises(NotAGlmCheckpointError, match="no weights"):
        load_model(tmp_path)


def test_remote_code_checkpoint_says_hf_format_is_needed(tmp_path):
    config = {"model_type": "chatglm", "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
              "num_layers": 40}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeCheckpointError, match="glm-4-9b-chat-hf"):
        load_model(tmp_path)
    with pytest.raises(RemoteCodeCheckpointError):
        load_tokenizer(tmp_path)


def test_gpu_device_map_without_that_gpu(tiny_path):
    missing = torch.cuda.device_count()  # one past the last GPU: none at all on CI
    with pytest.raises(NoGpuError, match="device_map='cpu'"):
        load_model(tiny_path, device_map={"": missing})
    with pytest.raises(NoGpuError, match=f"GPU {missing}"):
        load_model(tiny_path, device_map=f"cuda:{missing}")


def test_guide_device_map_is_caught_before_loading(tiny_path):
    guide = {"transformer.word_embeddings": "cpu", "lm_head": "cpu"}
    guide |= {f"transformer.layers.{i}": "cpu" for i in range(30)}
    with pytest.raises(DeviceMapError, match="ChatGLM-6B names"):
        load_model(tiny_path, device_map=guide)


def test_load_model_cpu_and_generate(tiny_path):
    model = load_model(tiny_path, dtype=torch.float32, device_map="cpu")
    tok = load_tokenizer(tiny_path)
    assert not model.training and model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_dtype_as_string(tiny_path):
    assert load_model(tiny_path, dtype="bfloat16", device_map="cpu").dtype == torch.bfloat16


def test_glmkit_model_env_var_picks_the_checkpoint(tmp_path, monkeypatch, tiny_path):
    other = build_tiny_checkpoint(tmp_path / "seed1", seed=1)
    monkeypatch.setenv("GLMKIT_MODEL", str(other))
    from_env = load_model(device_map="cpu")
    explicit = load_model(other, device_map="cpu")
    default = load_model(tiny_path, device_map="cpu")
    assert torch.equal(from_env.lm_head.weight, explicit.lm_head.weight)
    assert not torch.equal(from_env.lm_head.weight, default.lm_head.weight)


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
def test_bitsandbytes_quantized_load_generates(tiny_path, quantization):
    model = load_model(tiny_path, dtype=torch.bfloat16, device_map="cpu", quantization=quantization)
    linear = model.model.layers[0].mlp.gate_up_proj
    assert type(linear).__name__ == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
    assert type(model.lm_head).__name__ == "Linear"  # the output layer stays in 16 bit
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_unknown_quantization(tiny_path):
    with pytest.raises(ValueError, match="'int3'"):
        load_model(tiny_path, device_map="cpu", quantization="int3")
