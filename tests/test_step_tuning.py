"""glmkit.step_tuning on a CPU: the knobs tuned in the decode step, the search with the step stood in for (the 16-bit
CUDA kernels run on Hopper GPUs only: ``benchmarks/step_shapes_tune.py`` runs it there), and the kernels reading a
tuned shape from the table where it fits."""

from dataclasses import asdict
from types import SimpleNamespace

import torch

from glmkit import gemv, gemv16_one, gemv_tuning, mlp16_one, step_tuning


def test_the_knobs_start_at_the_defaults_and_hold_only_shapes_that_fit():
    for limit in (gemv16_one.SMEM_H200, 200 * 1024):
        qkv, o_proj, mlp = step_tuning.knobs(limit)
        for knob, role in ((qkv, "qkv"), (o_proj, "o_proj")):
            assert knob.kernel == "16bit-one" and knob.columns == 4096
            assert gemv16_one.Shape16(**knob.candidates[0]) == gemv16_one.shape_for(4096, limit, role)
            shapes = [gemv16_one.Shape16(**c) for c in knob.candidates]
            assert len(set(shapes)) == len(shapes) > 1 and all(s.smem_bytes(4096) <= limit and s.early < s.depth
                                                              for s in shapes)
        assert (qkv.rows, o_proj.rows, mlp.rows) == (4608, 4096, 13696)
        assert mlp.candidates[0]["ring"] == mlp16_one.shape_for(4096, 13696, limit).ring
        assert all(c["ring"] <= mlp.candidates[0]["ring"] for c in mlp.candidates)


def test_the_search_keeps_a_right_shape_only_past_the_margin_and_builds_on_each_knob(monkeypatch):
    """Each decoder is built with the candidate in the table and timed in turns with the default's; one whose logits
    disagree with the default's is never kept however fast; a faster one replaces the default only by more than
    ``MARGIN``; a knob's kept shape stays in the table while the next knob is tuned; a candidate that fails to
    build is recorded."""
    monkeypatch.setattr(gemv, "_ACTIVE_CUDA", {})
    table = gemv.active_cuda_shapes()
    a = step_tuning.Knob("qkv", "16bit-one", 8, 16, ({"warps": 4}, {"warps": 8}, {"warps": 2}, {"warps": 16}))
    b = step_tuning.Knob("mlp", "16bit-mlp", 32, 16, ({"ring": 12}, {"ring": 6}))
    built = []

    def build():
        warps, ring = table[("16bit-one", 8, 16)]["warps"], table.get(("16bit-mlp", 32, 16), {}).get("ring")
        built.append((warps, ring))
        if warps == 16:
            raise RuntimeError("too many registers")
        seconds = {4: 1.0, 8: 0.9, 2: 0.5}[warps] * (0.95 if ring == 6 else 1.0)  # 2 warps: fast but wrong
        drift = iter([1.0, 1.03, 0.97] * 10)  # this decoder's own spread from one measurement to the next
        return (lambda: seconds * next(drift)), torch.ones(4) * (3.0 if warps == 2 else 1.0)

    rows = step_tuning.search([a, b], build, log=lambda line: None)
    assert rows[0]["best"]["warps"] == 8 and rows[1]["best"]["ring"] == 6  # 10% and 5% faster than the defaults
    assert [round(t["over_default"], 3) for t in rows[0]["tried"][:3]] == [1.0, 0.9, 0.5]
    assert [t["logits_rel_diff"] for t in rows[0]["tried"][:3]] == [0.0, 0.0, 2.0]
    assert "too many registers" in rows[0]["tried"][3]["error"]
    assert built[-2:] == [(8, 12), (8, 6)]  # the mlp knob tuned with q/k/v's kept shape in the table
    assert table == {("16bit-one", 8, 16): {"warps": 8}, ("16bit-mlp", 32, 16): {"ring": 6}}
    assert gemv_tuning.table_configs(rows[1:]) == [{"kernel": "16bit-mlp", "rows": 32, "columns": 16, "ring": 6}]
    slight = step_tuning.Knob("o_proj", "16bit-one", 8, 16, ({"warps": 4}, {"warps": 8}))
    monkeypatch.setattr(gemv, "_ACTIVE_CUDA", {})
    table = gemv.active_cuda_shapes()
    rows = step_tuning.search([slight], lambda: ((lambda s=0.99 if table[("16bit-one", 8, 16)]["warps"] == 8 else 1.0:
                                                  s), torch.ones(4)), log=lambda line: None)
    assert rows[0]["best"]["warps"] == 4 and table[("16bit-one", 8, 16)] == {"warps": 4}  # 1%: the default stays


def test_the_16bit_kernels_take_a_tuned_shape_only_where_it_fits(monkeypatch):
    monkeypatch.setattr(gemv16_one, "smem_limit", lambda device: gemv16_one.SMEM_H200)
    monkeypatch.setattr(mlp16_one, "smem_limit", lambda device: gemv16_one.SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    tuned = gemv16_one.Shape16(2, 8, 2, 1)
    monkeypatch.setattr(gemv, "_ACTIVE_CUDA", {("16bit-one", 4096, 4096): asdict(tuned),
                                               ("16bit-one", 4608, 4096): {"groups": 8, "warps": 4, "depth": 3,
                                                                           "early": 2},  # too much shared memory
                                               ("16bit-mlp", 13696, 4096): {"ring": 6}})
    device = torch.device("cpu")
    assert gemv16_one.launch_shape(device, 4096, 4096, "o_proj") == tuned
    assert gemv16_one.launch_shape(device, 4608, 4096, "qkv") == gemv16_one.shape_for(4096, role="qkv")
    assert mlp16_one._shape_on(device, 4096, 13696).ring == 6
    gemv._ACTIVE_CUDA[("16bit-mlp", 13696, 4096)] = {"ring": 64}  # more than fit
    assert mlp16_one._shape_on(device, 4096, 13696) == mlp16_one.shape_for(4096, 13696)



def test_every_shipped_cuda_kernel_shape_is_one_its_kernel_launches(monkeypatch):
    """The H200 tables' entries for glmkit's CUDA kernels are taken as they are (none would fall back to a default
    unnoticed): each 4-bit and 16-bit kernel's ``launch_shape`` (the MLP's ``_shape_on``) returns the entry."""
    from glmkit import gemv4bit_mma, gemv4bit_one
    from glmkit.gemv import cuda_shapes_for

    shipped = cuda_shapes_for("NVIDIA H200")
    assert {kernel for kernel, _, _ in shipped} == {"4bit-one", "4bit-mma", "16bit-one", "16bit-mlp"}
    monkeypatch.setattr(gemv, "_ACTIVE_CUDA", shipped)
    for module in (gemv16_one, mlp16_one, gemv4bit_one):
        monkeypatch.setattr(module, "smem_limit", lambda device: gemv16_one.SMEM_H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    device, gate_up = torch.device("cpu"), (13696, 4096)
    for (kernel, rows, k), fields in shipped.items():
        if kernel == "4bit-one":
            assert gemv4bit_one.launch_shape(device, rows, k, (rows, k) == gate_up) == gemv4bit_one.OneShape(**fields)
        elif kernel == "4bit-mma":
            assert gemv4bit_mma.launch_shape(rows, k, (rows, k) == gate_up) == gemv4bit_mma.MmaShape(**fields)
        elif kernel == "16bit-one":
            assert gemv16_one.launch_shape(device, rows, k) == gemv16_one.Shape16(**fields)
        else:
            assert mlp16_one._shape_on(device, k, rows).ring == fields["ring"]


def test_glmkit_tune_times_the_16bit_kernels_in_the_step_only_for_16_bit_on_one_card(monkeypatch, tmp_path, capsys):
    """``glmkit tune`` writes the tuned table, then tunes the 16-bit CUDA kernels in the step for bf16/fp16 at
    ``--tp 1`` only; if that fails (a busy card), what was tuned before stays written and it says why."""
    import glmkit.gemv_tuning
    from glmkit.cli import main

    calls = []
    monkeypatch.setattr(glmkit.gemv_tuning, "tune", lambda kernels, tp=1: calls.append(("tune", tuple(kernels), tp))
                        or [])
    monkeypatch.setattr(step_tuning, "tune_step", lambda: calls.append(("step",)) or [])
    table = tmp_path / "t.json"
    for argv, step in ((["--kernels", "nf4"], False), (["--kernels", "bf16", "--tp", "2"], False),
                       (["--kernels", "bf16,nf4"], True), (["--kernels", "fp16"], True)):
        calls.clear()
        assert main(["tune", *argv, "--output", str(table)]) == 0
        assert (("step",) in calls) == step and calls[0][0] == "tune"

    def busy():
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(step_tuning, "tune_step", busy)
    table.unlink()
    assert main(["tune", "--kernels", "bf16", "--output", str(table)]) == 0 and table.exists()
    assert "16-bit CUDA kernels: not tuned (OutOfMemoryError: CUDA out of memory)" in capsys.readouterr().out
