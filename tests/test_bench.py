import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch

from glmkit.attention import qkv_decode_attention
from glmkit.bench import PATHS, decode_grid, measure_decode, save_result
from glmkit.loading import load_model
from glmkit.results import load as load_results
from glmkit.results import planner_accuracy_rows


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path, device_map="cpu")


def test_decode_grid_rows_are_well_formed(model):
    rows = decode_grid(model, paths=PATHS, batch_sizes=(1, 2), prompt_lens=(8,), new_tokens=4,
                       attn_implementations=("sdpa", "eager"))
    assert len(rows) == 2 * 2 * 2 + 2  # generate and static over 2 attention kinds x 2 batches, fast over 2 batches
    for r in rows:
        assert r["path"] in PATHS and r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_bytes"] > 0
    assert {r["attn_implementation"] for r in rows if r["path"] == "generate"} == {"sdpa", "eager"}
    with pytest.raises(ValueError, match="Unknown path"):
        measure_decode(model, "turbo")


def test_save_and_load_results_round_trip(tmp_path):
    save_result("example", {"value": 3}, out_dirs=[tmp_path])
    data = load_results("example", tmp_path)
    assert data["value"] == 3 and "versions" in data["environment"] and data["environment"]["date"]
    assert load_results("never_measured", tmp_path) is None


def test_committed_gpu_results_name_their_device_and_versions():
    for name in ("planner_accuracy", "planner_validation", "quantization_9b", "decode", "long_context", "monitor_check",
                 "oom_12gib", "profile_step", "gemv_tune", "gemv_accuracy"):
        data = load_results(name)
        assert data is not None, name
        assert "H100" in data["environment"]["device"] and data["environment"]["versions"]["torch"]
    rows = planner_accuracy_rows(load_results("planner_accuracy"))
    assert len(rows) == len(load_results("planner_accuracy")["cases"])


def test_decode_tuner_runs_and_records(model):
    from glmkit.widgets import decode_tuner

    tuner = decode_tuner(model)
    tuner.batch.value, tuner.new_tokens.value, tuner.path.value = 2, 4, "fast"
    row = tuner.run()
    assert row["batch_size"] == 2 and row["path"] == "fast" and tuner.results == [row]
    assert "tok/s" in tuner.status.value
    json.dumps(row)  # JSON-ready
    tuner.batch.value, tuner.projections.value = 1, False  # the fast path with cuBLAS, then with the Triton kernels
    assert tuner.run()["gemv"] is False
    from glmkit.gemv import triton_available

    if triton_available():  # a GPU, or the CPU interpreter the tests set up
        tuner.projections.value = "triton"
        assert tuner.run()["gemv"] == "triton" and "fast (Triton)" in tuner.status.value
    tuner.path.value = "generate"
    assert "fast_options" not in tuner.run()  # the kernel menu is the fast path's only


def test_decode_tuner_loads_a_precision_from_the_checkpoint_once_and_names_it_in_rows_and_lines(model, tiny_path):
    pytest.importorskip("bitsandbytes")
    from glmkit.widgets import decode_tuner, model_precision

    own = model_precision(model)
    tuner = decode_tuner(model, checkpoint=tiny_path, precisions=["fp16", "nf4"])
    assert tuner.precision.options == (own, "fp16", "nf4") and tuner.precision.value == own
    tuner.prompt.value, tuner.new_tokens.value = 8, 4
    assert tuner.run()["precision"] == own and list(tuner.models) == [own]  # nothing loaded before it is picked
    tuner.precision.value = "nf4"
    row = tuner.run()
    nf4 = tuner.models["nf4"]
    assert model_precision(nf4) == "nf4" and nf4.model.layers[0].mlp.down_proj.weight.__class__.__name__ == "Params4bit"
    assert next(nf4.parameters()).device == next(model.parameters()).device  # loaded where the model is
    assert row["precision"] == "nf4" and "nf4 generate, batch 1" in tuner.status.value
    tuner.path.value = "fast"  # 4-bit weights on the fast path (bitsandbytes' matmul on a CPU)
    assert tuner.run()["precision"] == "nf4" and "nf4 fast (" in tuner.status.value
    tuner.precision.value, tuner.path.value = own, "generate"  # back to the model given, then nf4 again: no reload
    tuner.run()
    tuner.precision.value = "nf4"
    tuner.run()
    assert tuner.models["nf4"] is nf4 and tuner.models[own] is model
    assert [r["precision"] for r in tuner.results] == [own, "nf4", "nf4", own, "nf4"]
    assert [label.split(" (")[0] for label in tuner.series()] == [f"{own} generate", "nf4 generate", "nf4 fast"]
    tuner.unload("nf4")
    assert "nf4" not in tuner.models
    with pytest.raises(ValueError, match="you gave"):
        tuner.unload(own)


def test_decode_tuner_says_what_failed_when_a_precision_cannot_load_and_keeps_its_results(model, tiny_path, tmp_path):
    import shutil

    from glmkit.widgets import decode_tuner, model_precision

    broken = shutil.copytree(tiny_path, tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # a checkpoint whose weights cannot load
    own = model_precision(model)
    tuner = decode_tuner(model, checkpoint=broken, precisions=["fp16"])
    tuner.prompt.value, tuner.new_tokens.value = 8, 4
    first = tuner.run()
    tuner.precision.value = "fp16"
    with pytest.raises(RuntimeError, match="Could not load fp16 from"):
        tuner.run()
    status = tuner.status.value
    assert "Could not load fp16" in status and f"pick {own} (loaded)" in status and "\n" not in status
    assert tuner.results == [first] and list(tuner.models) == [own]
    tuner.precision.value = own
    tuner.button.click()  # the widget still measures
    assert len(tuner.results) == 2 and f"{own} generate, batch 1" in tuner.status.value


def test_decode_tuner_menus_and_load_errors_in_the_users_words(model, tiny_path):
    from glmkit.loading import CheckpointNotFoundError
    from glmkit.widgets import _load_error, decode_tuner, model_precision

    assert decode_tuner(model).precision.options == (model_precision(model),)  # no checkpoint: the model alone
    both = decode_tuner({"mine": model, "again": model})
    assert both.precision.options == ("mine", "again") and both.model is model
    assert decode_tuner(model, checkpoint=tiny_path).precision.options[1:] == tuple(
        p for p in ("bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq") if p != model_precision(model))
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        decode_tuner(model, checkpoint=tiny_path, precisions=["nf4", "int3"])
    with pytest.raises(ValueError, match="pass checkpoint="):
        decode_tuner(model, precisions=["nf4"])
    with pytest.raises(CheckpointNotFoundError):
        decode_tuner(model, checkpoint=tiny_path / "missing")
    # transformers' words when bitsandbytes is not installed, and an out-of-memory error: what to do, in one line
    missing = ImportError("Using `bitsandbytes` 4-bit quantization requires bitsandbytes: `pip install -U bitsandbytes`")
    assert _load_error("nf4", missing, tiny_path, ["bf16"]) == (
        "nf4 needs bitsandbytes, which is not installed here: pip install -U bitsandbytes and restart the kernel, "
        "or pick bf16 (loaded) or another precision.")
    oom = _load_error("fp16", torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate"), tiny_path, ["bf16"])
    assert oom.startswith("Not enough memory to load fp16 next to bf16: free one with tuner.unload(name)")
    assert "\n" not in oom


def test_bench_bytes_read_per_token(model):
    from glmkit.bench import bytes_read_per_token

    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bytes_read_per_token(model) == total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    assert torch.is_tensor(emb)


def test_copy_and_read_bandwidth_count_the_bytes_they_move(monkeypatch):
    """With every timing one second, the bandwidths are the bytes moved: a copy's read and written, ``repeats``
    times; a matrix-vector product's weight read 10 times a round (float32 on a CPU)."""
    import glmkit.bench

    monkeypatch.setattr(glmkit.bench, "_seconds", lambda fn, repeats, device: (fn(), 1.0)[1])
    assert glmkit.bench.copy_bandwidth(2**16, 3, device="cpu") == 2 * 2**16 * 3
    assert glmkit.bench.read_bandwidth("cpu", rows=64, columns=128, rounds=2) == 10 * 64 * 128 * 4


def test_attention_stand_ins_take_what_the_decoders_pass(monkeypatch):
    """benchmarks/step_roles.py's stand-ins replace ``qkv_decode_attention`` in a decoder: they must take every
    argument it takes, or the decoder's warm-up fails, falls back to another attention and times that instead."""
    pytest.importorskip("triton")  # (benchmarks/step_roles.py imports it, as the tests of the kernels do)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    step_roles = importlib.import_module("step_roles")
    wanted = list(inspect.signature(qkv_decode_attention).parameters)
    for stand_in in (step_roles.minimal_attention, step_roles.without_tickets, step_roles.no_attention):
        assert list(inspect.signature(stand_in).parameters) == wanted, stand_in.__name__
