"""Figures come from results: notebook prose and the README carry no typed-in measurement."""

import json
import re
from pathlib import Path

import nbformat
import pytest

import glmkit.bench
from glmkit import gemv4bit_mma, results
from glmkit.cards import decision_table, speed_ceiling
from glmkit.fast_decode import FOUR_BIT_MAX_BATCH
from glmkit.gemv4bit import ROW_KERNEL_MAX_VECTORS
from glmkit.gemv_tuning import beats_default

ROOT = Path(__file__).resolve().parents[1]

# A measured figure: a number with a speed, bandwidth, memory-peak, percentage or speed-up unit.
FIGURE = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:\s*[–-]\s*[-+]?\d[\d,]*(?:\.\d+)?)?\s*"
                    r"(?:tok/s|tokens/s|TB/s|GB/s|GiB|MiB|%)|(?<![\w.])[-+]?\d+(?:\.\d+)?(?:x|×)(?![\w])")

# Figures prose may state because they are not measurements: architecture and planner arithmetic from the config
# (the same on every machine), unit examples, and the tiny model's training experiments (notebook 04 explains
# them; they are not full-size figures). Each entry: (file, figure) -> why.
ALLOWED = {
    ("*", "17.5 GiB"): "9.4 B parameters x 2 bytes: architecture",
    ("*", "17.51 GiB"): "bf16 weights from the config: architecture",
    ("*", "1.16 GiB"): "embed_tokens / lm_head size from the config",
    ("*", "0.35 GiB"): "double quantization's saving: planner arithmetic",
    ("*", "6.2–6.6 GiB"): "4-bit weights: planner arithmetic",
    ("*", "1.7 GiB"): "the MLP output of a 32K prompt: [1, 32768, 27392] x 2 bytes",
    ("*", "12 GiB"): "a card size (a budget), not a measurement",
    ("*", "24 GiB"): "a card size (a budget)",
    ("*", "8 GiB"): "a card size (a budget)",
    ("*", "12GiB"): "a budget in code",
    ("*", "24GiB"): "a budget in code",
    ("README.md", "4 MiB"): "the server's request-body limit, a setting",
    ("*", "5.0 GiB"): "KV cache at 128K from the config",
    ("*", "0.31 GiB"): "KV cache at 8K from the config",
    ("*", "1.4 GiB"): "the fused q/k/v copy: its size from the config",
    ("04_quantization.ipynb", "-0.04% to +0.06%"): "tiny-model training experiments, explained in place",
    ("04_quantization.ipynb", "+0.02% to +0.13%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.21% to +0.36%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "-0.04%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.06%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.02%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.13%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.21%"): "tiny-model training experiments",
    ("04_quantization.ipynb", "+0.36%"): "tiny-model training experiments",
}


def stated_figures(text: str, file: str) -> list[str]:
    """Measured-looking figures in ``text`` that are not on the allowed list."""
    found = [m.group(0).strip() for m in FIGURE.finditer(text)]
    return [f for f in found if ("*", f) not in ALLOWED and (file, f) not in ALLOWED]


def test_the_figure_pattern_catches_measurements_and_passes_architecture():
    text = "the fast path reached 150.3 tok/s, 87.5% of the roofline, 8.4x plain generate(), peak 11.99 GiB, 40 layers"
    assert stated_figures(text, "x") == ["150.3 tok/s", "87.5%", "8.4x", "11.99 GiB"]
    assert stated_figures("17.51 GiB of weights, 40 layers, 2 KV heads, 128K context", "x") == []


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_markdown_states_no_measured_figure(path):
    nb = nbformat.read(path, 4)
    bad = {i: stated_figures(c.source, path.name) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"}
    bad = {i: f for i, f in bad.items() if f}
    assert not bad, (f"{path.name}: markdown cells state measured figures {bad}; render them from "
                     "benchmarks/results with a glmkit.results function in a code cell instead")


def test_the_fast_path_today_sentence_states_its_runs():
    d, other = results.load("attention_tickets"), results.load("attention_tickets_run2")
    sentence = str(results.fast_path_today_sentence())
    now = {r["variant"]: r for r in d["rows"]}["tiles side by side, the last to finish combines"]
    assert f"{now['best_tok_s']:.1f} tok/s, {100 * now['fraction_of_roofline']:.1f}% of the roofline" in sentence
    floor, mine = ({r["variant"]: r for r in x["rows"]}["a minimal kernel"]["best_replay_us"]["160"] for x in (other, d))
    # "H200s differ": slower there at no less copy bandwidth, which the cards' copy and read explain (below)
    assert floor > mine and other["copy_bandwidth_bytes_s"] >= d["copy_bandwidth_bytes_s"]
    assert f"{floor:.0f} µs against {mine:.0f}" in sentence
    assert "need not rank how fast it reads (*Why H200s differ*, below)" in sentence
    kernels = results.load("step_roles")["runs"]["bf16, fast path"]["kernels_per_step"]
    assert f"A step is {kernels} kernels" in sentence


def test_card_bandwidth_figures_are_each_runs_own(monkeypatch, tmp_path):
    """Every run of ``card_bandwidth.py`` is a row of the table with its own figures, one file a card (its UUID), and
    the sentence's spans are the runs' smallest and largest. Without the files both say "not measured"."""
    runs = results.card_bandwidth_runs()
    assert len(runs) >= 2 and all(name == f"card_bandwidth_{r['gpu_uuid'][:8]}" for name, r in runs)
    table = results.card_bandwidth_table()
    for (name, r), row in zip(runs, table.rows, strict=True):
        assert row == [f"`{name}.json`", f"{r['copy_bandwidth_bytes_s'] / 1e12:.3f}",
                       f"{r['read_bandwidth_bytes_s'] / 1e12:.3f}", f"{r['read_over_copy']:.3f}",
                       f"{r['best_tok_s']:.1f}", f"{r['fraction_of_copy_roofline'] * 100:.1f}%",
                       f"{r['fraction_of_read_roofline'] * 100:.1f}%"]
        assert abs(r["read_over_copy"] - r["read_bandwidth_bytes_s"] / r["copy_bandwidth_bytes_s"]) < 1e-9
        assert abs(r["fraction_of_copy_roofline"] * r["copy_roofline_tok_s"] - r["best_tok_s"]) < 1e-6
        assert r["best_tok_s"] == max(r["decode_tok_s"]) and r["read_weight_bytes"] == 2 * r["read_shape"][0] * \
            r["read_shape"][1]
    cards = len({r["gpu_uuid"] for _, r in runs})
    sentence = str(results.card_bandwidth_sentence())
    assert f"{len(runs)} runs on {cards} NVIDIA H200s" in sentence and f"{len(runs)} runs on {cards}" in table.caption
    copy = [100 * r["fraction_of_copy_roofline"] for _, r in runs]
    read = [100 * r["fraction_of_read_roofline"] for _, r in runs]
    assert f"{min(copy):.1f}–{max(copy):.1f}% of the copy roofline ({max(copy) - min(copy):.1f} points apart)" in sentence
    assert f"{min(read):.1f}–{max(read):.1f}% of the read roofline ({max(read) - min(read):.1f} points apart)" in sentence
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in str(results.card_bandwidth_sentence())
    assert "not measured yet" in str(results.card_bandwidth_table())


def _card(uuid: str, copy: float, read: float, tok_s: float) -> dict:
    """A run of ``card_bandwidth.py`` as its file holds it, from its two bandwidths (TB/s) and its bf16 rate."""
    per_token = 17.56e9
    return {"environment": {"device": "NVIDIA H200", "date": "2026-12-01"}, "rounds": 5, "gpu_uuid": uuid,
            "copy_bandwidth_bytes_s": copy * 1e12, "read_bandwidth_bytes_s": read * 1e12, "read_over_copy": read / copy,
            "read_weight_bytes": 1241513984, "best_tok_s": tok_s,
            "fraction_of_copy_roofline": tok_s / (copy * 1e12 / per_token),
            "fraction_of_read_roofline": tok_s / (read * 1e12 / per_token)}


@pytest.mark.parametrize("cards, reads_ranked, yardstick", [
    # the decoder alike against reads (85.4% on both), the card that copies faster reads slower: both conclusions
    ([_card("a", 4.285, 4.454, 216.6), _card("b", 4.254, 4.505, 219.1)], False, True),
    # the card that copies faster reads faster too, and the decoder's share moves against both rooflines alike:
    # neither conclusion
    ([_card("a", 4.30, 4.52, 220.0), _card("b", 4.20, 4.40, 210.0)], True, False),
])
def test_card_bandwidth_sentence_draws_only_what_its_figures_hold(monkeypatch, cards, reads_ranked, yardstick):
    monkeypatch.setattr(results, "card_bandwidth_runs", lambda: [(f"card_bandwidth_{c['gpu_uuid']}", c) for c in cards])
    sentence = str(results.card_bandwidth_sentence())
    assert "2 runs on 2 NVIDIA H200s" in sentence
    assert ("did not read fastest" in sentence) == (not reads_ranked)
    assert ("not with the decoder" in sentence) == yardstick


def test_bf16_nf4_runs_read_each_files_default_decoders(monkeypatch, tmp_path):
    """Every listed run of the default decoders is a row with its own file's figures: bf16's and nf4's rates are the
    default decoders' rows (not a variant's), nf4 is set against bf16's copy roofline of that run, and the last column
    follows the two marks."""
    runs = {r["name"]: r for r in results.bf16_nf4_runs()}
    assert list(runs) == [name for name, _ in results.BF16_NF4_RUNS]
    assert [r["name"] for r in runs.values() if r["kernel"] == results.KERNEL_NOW] == list(results.X_IN_REGISTERS)

    def rows(name, key="variant"):
        return {row[key]: row for row in results.load(name)["rows"]}

    x = rows("nf4_x_regs")
    assert runs["nf4_x_regs"]["nf4_tok_s"] == x["nf4, x in registers"]["best_tok_s"] != x["nf4"]["best_tok_s"]
    alu, control = rows("nf4_alu"), rows("nf4_control")
    assert runs["nf4_alu"]["nf4_tok_s"] == alu["nf4, 0 word(s) on the integer units"]["best_tok_s"]
    assert runs["nf4_control"]["nf4_tok_s"] == control["nf4"]["best_tok_s"] != control["nf4 again"]["best_tok_s"]
    greedy = {(r["precision"], r["loop"]): r for r in results.load("greedy_tail")["rows"]}
    assert runs["greedy_tail"]["nf4_tok_s"] == greedy[("nf4", "greedy in the step")]["best_tok_s"] != \
        greedy[("nf4", "argmax after the step")]["best_tok_s"]
    prefetch = [r for r in results.load("l2_prefetch")["rows"] if r["precision"] == "bf16"]
    assert runs["l2_prefetch"]["bf16_tok_s"] == next(r for r in prefetch if not r["prefetches"])["best_tok_s"]
    for name in ("nf4_alu", "nf4_one_step"):  # against the bf16 roofline the file itself records
        assert runs[name]["nf4_over_bf16_roofline"] == pytest.approx(
            runs[name]["nf4_tok_s"] / results.load(name)["roofline_tok_s"]["bf16"], rel=1e-9)
    split = results.load("nf4_split")
    first, step = split["in_step_first_run"], split["in_step"]
    bf16_bytes = first["copy_bandwidth_bytes_s"] / first["roofline_tok_s"]["bf16"]
    assert runs["nf4_split"]["bf16_tok_s"] == max(step["rows"]["bf16"]["decode_tok_s"])
    assert runs["nf4_split"]["nf4_tok_s"] == max(step["rows"]["old kernel"]["decode_tok_s"])
    assert runs["nf4_split"]["bf16_share"] == pytest.approx(
        runs["nf4_split"]["bf16_tok_s"] * bf16_bytes / step["copy_bandwidth_bytes_s"], rel=1e-9)
    table = results.bf16_nf4_table()
    for r, row in zip(runs.values(), table.rows, strict=True):
        assert row[0] == f"`{r['name']}.json`" and row[1] == r["kernel"] and row[2] == r["bf16_mlp"]
        assert row[8] == f"{r['nf4_tok_s'] / r['bf16_tok_s']:.3f}x"
        assert row[9] == ("yes" if r["bf16_share"] >= 0.9 and r["nf4_tok_s"] >= 2 * r["bf16_tok_s"] else "no")
    # bf16's MLP as one kernel exactly where the file's bf16 row says it ran so
    one = [name for name in runs if rows_of_bf16_mlp_kernel(results.load(name))]
    assert [name for name, r in runs.items() if r["bf16_mlp"] == results.MLP_ONE] == one == \
        list(results.NF4_AGAINST_BF16_NOW)
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in str(results.bf16_nf4_table()) and "not measured yet" in results.bf16_nf4_sentence()


def rows_of_bf16_mlp_kernel(result: dict) -> list[dict]:
    """A result's bf16 rows that record their MLP ran as one kernel."""
    rows = result.get("rows")
    return [r for r in rows if r.get("precision") == "bf16" and r.get("mlp_kernel")] if isinstance(rows, list) else []


def _pair_run(bf16: float, share: float, nf4: float, name: str = "made_up", kernel: str = results.KERNEL_NOW,
              mlp: str = results.MLP_TWO, cards: tuple[str, ...] = ()) -> dict:
    """A run for ``bf16_nf4_sentence``: bf16's tok/s and share of its roofline, nf4's tok/s, the 4-bit kernel, how
    bf16 ran its MLP, the cards."""
    return {"name": name, "date": "2026-12-01", "copy_bandwidth_bytes_s": 4.25e12, "bf16_tok_s": bf16,
            "bf16_share": share, "nf4_tok_s": nf4, "ratio": nf4 / bf16, "nf4_over_bf16_roofline": nf4 * share / bf16,
            "kernel": kernel, "bf16_mlp": mlp, "gpu_uuids": list(cards)}


def test_bf16_nf4_sentence_reads_the_runs_against_bf16_as_it_is_now_on_their_own():
    """Where bf16's MLP ran as one kernel in some runs, those runs get a clause of their own (files, cards, rates, how
    many hold both marks), and what moves from run to run and the cap on bf16 are read from them alone: bf16 changed
    between the groups, which is no run-to-run spread."""
    one = results.MLP_ONE
    runs = [_pair_run(215.0, 0.884, 465.0), _pair_run(219.0, 0.906, 467.0),
            _pair_run(227.0, 0.938, 464.0, "a", mlp=one, cards=("GPU-1",)),
            _pair_run(223.0, 0.920, 461.0, "b", mlp=one, cards=("GPU-1", )),
            _pair_run(226.0, 0.935, 450.0, "c", mlp=one, cards=("GPU-2",))]
    sentence = str(results.bf16_nf4_sentence(runs))
    assert "its MLP one CUDA kernel (`a.json`, `b.json`, `c.json`, 2 cards): bf16 223.0–227.0 tok/s" in sentence
    assert "nf4 450.0–464.0, 1.991–2.067x bf16; bf16 reached 90% of its roofline and nf4 2x bf16's speed in the same " \
           "run in 2 of 3." in sentence
    assert "nf4 moves less" not in sentence  # 3.1% against bf16's 1.8% among those three (5.6% over all five)
    caps = [r["nf4_over_bf16_roofline"] / 2 * 100 for r in runs[2:]]
    assert f"{min(caps):.1f}–{max(caps):.1f}% of bf16's copy roofline in the runs against bf16 as it is now" in sentence


@pytest.mark.parametrize("runs, both, steadier, room", [
    ([_pair_run(219.0, 0.905, 440.0), _pair_run(214.0, 0.884, 439.0)], 1, True, "every"),
    ([_pair_run(219.0, 0.905, 430.0), _pair_run(214.0, 0.884, 425.0)], 0, True, "none"),  # nf4 under 1.8x the roofline
    ([_pair_run(219.0, 0.905, 450.0), _pair_run(218.0, 0.901, 430.0)], 1, False, "some"),  # nf4 moving more than bf16
])
def test_bf16_nf4_sentence_draws_only_what_its_figures_hold(runs, both, steadier, room):
    sentence = str(results.bf16_nf4_sentence(runs))
    assert f"in the same run in {both} of 2." in sentence
    assert ("nf4 moves less from run to run" in sentence) == steadier
    caps = [r["nf4_over_bf16_roofline"] / 2 * 100 for r in runs]
    assert f"{min(caps):.1f}–{max(caps):.1f}% of bf16's copy roofline in these runs" in sentence
    assert {"every": "above 90% in every run", "none": "both cannot hold", "some": "above 90% in 1 of them"}[room] in \
        sentence
    assert "timed once" not in sentence  # made-up runs are not among the files counted the earlier way


def test_bf16_nf4_sentence_keeps_the_kernel_before_and_runs_counted_the_earlier_way_apart():
    """Runs of the 4-bit kernel before are summed up on their own (and those counted with the one-token stream timed
    once named as such); what moves from run to run and the cap on bf16 are read from the kernel as it is now."""
    before = results.KERNEL_BEFORE
    runs = [_pair_run(219.0, 0.905, 444.0, "greedy_tail", before), _pair_run(214.0, 0.884, 439.0, "old", before),
            _pair_run(216.0, 0.893, 465.0), _pair_run(218.0, 0.901, 466.0)]
    sentence = str(results.bf16_nf4_sentence(runs))
    assert "2 of them ran the 4-bit kernel before" in sentence and "nf4 439.0–444.0 tok/s" in sentence
    assert "(1 of the 2 counted their rates with the one-token stream they subtract timed once" in sentence
    assert "which holds x in registers (`made_up.json`, `made_up.json`), nf4 decoded 465.0–466.0 tok/s" in sentence
    assert "(0.2% between the slowest and the fastest of the runs of the kernel as it is now, bf16 0.9%)" in sentence
    caps = [r["nf4_over_bf16_roofline"] / 2 * 100 for r in runs[2:]]
    assert f"{min(caps):.1f}–{max(caps):.1f}% of bf16's copy roofline in the runs of the kernel as it is now" in sentence


def test_readme_measured_section_is_rendered_from_results():
    readme = (ROOT / "README.md").read_text()
    section = results.readme_measured_section()
    assert section in readme, ("README's measured section differs from the results: run "
                               "`python -m glmkit.results --update-readme`")


def test_readme_outside_the_rendered_section_states_no_measured_figure():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(results.README_BEGIN), readme.index(results.README_END)
    prose = readme[:start] + readme[end:]
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)  # commands and code blocks
    assert stated_figures(prose, "README.md") == []


def test_missing_result_says_not_measured_and_switches_once_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in results.tensor_parallel_sentence()
    assert "not measured yet" in results.two_gpu_sentence()
    env = {"device": "NVIDIA H200", "date": "2026-11-29"}
    runs = [{"mode": "one GPU", "batch_size": 1, "decode_tok_s": 20.0},
            {"mode": "2-GPU tensor parallel", "batch_size": 1, "decode_tok_s": 10.0}]
    (tmp_path / "tensor_parallel.json").write_text(json.dumps({"environment": env, "method": "m", "runs": runs}))
    sentence = results.tensor_parallel_sentence()
    assert "not measured" not in sentence and "10.0 tok/s (0.50x one GPU)" in sentence
    assert "10.0" in str(results.tensor_parallel_table())
    maps = [{"map": "manual 20/20", "planned": [10 * 2**30, 11 * 2**30], "peak_reserved": [10 * 2**30, 12 * 2**30]}]
    longest = [{"mode": "plain generate(), accelerate auto", "prompt_len": 16384, "ok": False}]
    (tmp_path / "two_gpu.json").write_text(json.dumps({"environment": env, "maps": maps, "longest": longest}))
    sentence = results.two_gpu_sentence()
    assert "10.00 / 12.00 GiB against 10.00 / 11.00 planned" in sentence and "16,384 tokens OOM" in sentence
    assert "not measured yet" in results.two_gpu_fast_sentence() and results.two_gpu_fast_chart() is None
    rows = [{"path": "one GPU", "batch_size": 1, "decode_tok_s": 190.0},
            {"path": "split 20/20", "batch_size": 1, "decode_tok_s": 180.0}]
    (tmp_path / "two_gpu_fast.json").write_text(json.dumps({"environment": env, "mode": "two GPUs", "method": "m",
                                                             "rows": rows, "greedy_tokens_identical": True}))
    assert "180.0 tok/s against 190.0 on one GPU (0.95x)" in results.two_gpu_fast_sentence()
    assert results.two_gpu_fast_chart() is not None
    tp_runs = [{"path": "one GPU, whole model (FastDecoder)", "batch_size": 1, "decode_tok_s": 200.0},
               {"path": "one TP=2 rank's shard, no all-reduce (TPDecoder)", "batch_size": 1, "decode_tok_s": 250.0}]
    (tmp_path / "tp_bound.json").write_text(json.dumps({"environment": env, "runs": tp_runs}))
    assert "not measured yet" in results.tp_estimate_sentence()  # the NCCL latency is still missing
    even = 1000 / results.ALLREDUCES_PER_TOKEN  # µs: the 1 ms a step the shard saves, over the token's all-reduces
    assert "break-even" not in results.tp_estimate_sentence() and f"**{even:.1f} µs**" in results.tp_estimate_sentence()
    nccl = [{"batch_size": 1, "bytes": 8192, "backend": "nccl", "eager_us": 30.0, "in_cuda_graph_us": 10.0}]
    (tmp_path / "allreduce_latency.json").write_text(json.dumps({"environment": env, "world_size": 2, "runs": nccl}))
    estimate = results.tp_estimate_sentence()  # 4 ms + 81 x 10 µs (the in-graph latency) = 4.81 ms a token
    est = 1 / (4e-3 + results.ALLREDUCES_PER_TOKEN * 10e-6)
    assert "not measured" not in estimate and f"about **{est:.0f} tok/s, {est / 200:.2f}x one GPU**" in estimate
    assert "10.0 µs each inside a CUDA graph" in results.allreduce_sentence()
    assert results.tp_estimate_chart() is not None
    tp_rows = [{"path": "one GPU (FastDecoder, uncapped)", "batch_size": 1, "decode_tok_s": 200.0},
               {"path": "one GPU (FastDecoder, uncapped)", "batch_size": 16, "decode_tok_s": 2000.0},
               {"path": "TP=2 (TPDecoder, each card capped at 12 GiB)", "batch_size": 1, "decode_tok_s": 240.0},
               {"path": "TP=2 (TPDecoder, each card capped at 12 GiB)", "batch_size": 16, "oom": "CUDA out of memory"}]
    apart = {"decode_tok_s": 200.0, "fused_over_apart": 1.2}
    (tmp_path / "tp_fast.json").write_text(json.dumps({"environment": env, "method": "m", "rows": tp_rows,
                                                        "batch1_adds_and_norms_apart": apart}))
    assert "240.0 tok/s against 200.0 (1.20x)" in results.tp_fast_sentence()
    assert "kernel of its own (`fuse_norms=False`" in results.tp_fast_sentence()
    assert "200.0 tok/s, the fused step 1.20x that" in results.tp_fast_sentence()
    assert "batch 16: out of memory (each card capped at 12 GiB)" in results.tp_fast_sentence()
    assert f"the estimate's {est / 200:.2f}x is below it" in results.tp_estimate_sentence()
    assert "not measured yet" in results.nf4_decode_sentence() and results.nf4_decode_chart() is None
    assert "not measured yet" in results.nf4_mma_sentence() and results.nf4_mma_chart() is None
    assert "not measured yet" in str(results.nf4_mma_table())
    assert "not measured yet" in results.nf4_fused_sentence() and results.nf4_fused_chart() is None
    assert "not measured yet" in results.nf4_one_sentence() and results.nf4_one_chart() is None
    assert "not measured yet" in str(results.nf4_one_table())
    assert "not measured yet" in str(results.nf4_projection_table())
    decode = [{"path": "bf16 fast (Triton)", "best_tok_s": 100.0, "roofline_tok_s": 200.0, "fraction_of_roofline": 0.5},
              {"path": "nf4 fast (Triton)", "best_tok_s": 90.0, "roofline_tok_s": 600.0, "fraction_of_roofline": 0.15},
              {"path": "nf4 fast (bnb matmul_4bit, eager layers)", "best_tok_s": 80.0, "roofline_tok_s": 600.0,
               "fraction_of_roofline": 0.13},
              {"path": "generate() (bitsandbytes)", "best_tok_s": 5.0, "roofline_tok_s": 600.0,
               "fraction_of_roofline": 0.01}]
    (tmp_path / "nf4_decode.json").write_text(json.dumps({"environment": env, "method": "m", "decode": decode,
                                                           "copy_bandwidth_bytes_s": 4e12, "nf4_model_bytes": 6 * 2**30,
                                                           "tuned_shapes_for_this_card": 1}))
    nf4 = results.nf4_decode_sentence()
    assert "glmkit's nf4 Triton kernel is faster than bitsandbytes' own kernel" in nf4  # the file decides, not the text
    assert "0.90x bf16's fast path" in nf4 and "3.00x fewer bytes" in nf4 and "12 GiB cap: not measured yet" in nf4
    assert [r[1] for r in results.nf4_decode_rows(results.load("nf4_decode"))][:2] == ["bf16 fast (Triton)",
                                                                                       "generate() (bitsandbytes)"]
    assert results.nf4_decode_chart() is not None
    links = {"links": [{"nvlink": True}], "hidden_state_bytes": 8192,
             "directions": [{"from": 0, "to": 1, "bandwidth_bytes_s": 3e11, "hidden_state_seconds": {"1": 2e-5}}]}
    (tmp_path / "gpu_links.json").write_text(json.dumps({"environment": env, **links}))
    two_gpu_bullets = results.readme_measured_section().split("**Two GPUs**")[1].split("**The server on two cards**")[0]
    assert "not measured yet" not in two_gpu_bullets  # the server's files are not written here
    assert "Server throughput on a GPU: not measured yet" in results.server_sentence()  # neither server file here
    levels = [{"mode": m, "clients": c, "via": "http", "seconds": 6.0, "requests": 2, "tokens": 256,
               "tokens_per_s": t, "engine_steps_per_s": 50.0, "vs_decoder": t / (100.0 * c)}
              for m, c, t in [("continuous", 1, 90.0), ("continuous", 4, 300.0), ("static", 1, 88.0), ("static", 4, 150.0)]]
    ttft = {m: {"samples": 4, "long_tokens": 500, "idle_p50_s": 0.1, "idle_p99_s": 0.2, "busy_p50_s": b,
                "busy_p99_s": 2 * b, "busy_first_token_before_long_ended": n, "busy_p50_vs_idle": b / 0.1}
            for m, b, n in [("continuous", 0.15, 4), ("static", 3.0, 0)]}
    (tmp_path / "server_load_gpu_cb.json").write_text(json.dumps(
        {"environment": env, "decoder": [{"batch": 1, "decode_tok_s": 100.0}, {"batch": 4, "decode_tok_s": 400.0}],
         "levels": levels, "ttft": ttft}))
    server = results.server_sentence()
    assert "continuous batching served **90.0 / 300.0 tokens/s**, static batching 88.0 / 150.0" in server
    assert "(continuous over static: 1.02x / 2.00x)" in server and "p50 3.00 s, p99 6.00 s (30x idle" in server


def test_tensor_parallel_speed_is_the_default_all_reduces_where_the_run_had_it(tmp_path, monkeypatch):
    """TPDecoder's allreduce="auto" row is what the sentence reports (what a user gets), even where another mode
    measured faster in the same run; without one, the fastest mode (what "auto" would keep). Each mode is listed."""
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    env = {"device": "NVIDIA H200", "date": "2026-11-30"}
    tp = "TP=2 (TPDecoder, each card capped at 12 GiB)"
    rows = [{"path": "one GPU (FastDecoder, uncapped)", "batch_size": 1, "decode_tok_s": 200.0},
            {"path": tp, "batch_size": 1, "allreduce": "nccl", "allreduce_ran": "nccl all-reduce", "decode_tok_s": 250.0},
            {"path": tp, "batch_size": 1, "allreduce": "auto", "decode_tok_s": 240.0,
             "allreduce_ran": "glmkit push kernel (measured, in_cuda_graph_us: nccl 13.9 µs, push 5.5 µs)"}]
    (tmp_path / "tp_fast.json").write_text(json.dumps({"environment": env, "method": "m", "rows": rows}))
    sentence = results.tp_fast_sentence()
    assert "batch 1: 240.0 tok/s against 200.0 (1.20x)" in sentence
    assert 'nccl all-reduce: batch 1 250.0 tok/s' in sentence
    assert '`allreduce="auto"`, which kept the glmkit push kernel (timed in a CUDA graph: nccl 13.9 µs' in sentence
    slower = {**rows[1], "allreduce": "symm", "allreduce_ran": "symmetric-memory one-shot", "decode_tok_s": 230.0}
    (tmp_path / "tp_fast.json").write_text(json.dumps({"environment": env, "method": "m",
                                                        "rows": [rows[0], slower, rows[1]]}))  # no auto row
    assert "batch 1: 250.0 tok/s against 200.0 (1.25x)" in results.tp_fast_sentence()  # the faster, not the first


def test_a_result_is_parsed_once_and_read_again_once_rewritten(tmp_path):
    path = tmp_path / "example.json"
    path.write_text(json.dumps({"value": 1}))
    first = results.load("example", tmp_path)
    assert results.load("example", tmp_path) is first  # parsed once
    path.write_text(json.dumps({"value": 22}))  # re-measured
    assert results.load("example", tmp_path)["value"] == 22


def test_rendered_sentences_match_the_committed_files():
    decode = results.load("decode")
    assert f"{decode['batch1'][0]['decode_tok_s']:.1f} tok/s" in results.decode_sentence()
    lc = results.long_context_sentence()
    assert "outside PyTorch" in lc and "DynamicCache" in lc
    static = results.static_server_sentence()  # the H100 runs before continuous batching
    assert "9.2x one client" in static and "10.2–29.5 s" in static
    cb = results.load("server_load_gpu_cb")
    server = results.server_sentence()
    for level in cb["levels"]:
        assert f"{level['tokens_per_s']:.1f}" in server, level
    assert f"{cb['ttft']['static']['busy_p50_s']:.2f} s" in server and "not measured" not in server
    nf4, decoded = results.nf4_decode_sentence(), results.load("nf4_decode")
    paths = {row["path"]: row for row in decoded["decode"]}
    default, bf16 = paths[results.NF4_DEFAULT_PATH], paths["bf16 fast (glmkit kernels)"]
    assert "measured again after its rewrite" not in nf4  # the file times glmkit's default 4-bit kernel itself
    assert f"**{default['best_tok_s'] / bf16['best_tok_s']:.2f}x** bf16's fast path" in nf4
    for row in decoded["decode"]:
        assert f"{row['best_tok_s']:.1f}" in nf4, row["path"]
    table = results.nf4_projection_table()  # glmkit's default kernel first, from the same file
    assert table.headers[3] == "nf4 glmkit (default)"
    assert [row[3] for row in table.rows] == [f"{x['nf4_glmkit_us']:.1f} µs, {x['nf4_glmkit_tb_s']:.2f} TB/s"
                                              for x in decoded["projections"]]
    kernel, gemv = results.nf4_kernel_sentence(), results.load("nf4_gemv")
    for row in gemv["decode"]:
        assert f"{row['best_tok_s']:.1f}" in kernel, row["path"]
    for x in gemv["projections"]:
        assert f"{x['speedup_vs_bnb']:.2f}x bitsandbytes'" in kernel, x["projection"]
    assert f"{100 * gemv['accuracy']['nf4_triton']['rel_err_median']:.1f}%" in kernel
    acc = gemv["accuracy"]
    assert f"{100 * acc['fp16']['rel_err_median']:.2f}% (bf16: {100 * acc['bf16']['rel_err_median']:.1f}%)" in kernel
    long = next(r for r in map(results.load, results.NF4_DECODE_RUNS) if r and r.get("long_context"))["long_context"]
    assert f"decoding at {long['decode_tok_s']:.1f} tok/s" in nf4 and f"{long['peak_reserved'] / 2**30:.2f} GiB" in nf4
    assert ("within the plan" in nf4) == (long["peak_reserved"] <= long["planned_bytes"])
    limits, ncu = results.nf4_limits_sentence(), {(r["weights"], r["projection"]): r for r in results.load("nf4_ncu")["rows"]}
    gate_up4, gate_up16 = ncu[("nf4", "gate_up (SwiGLU)")], ncu[("bf16", "gate_up (SwiGLU)")]
    assert f"L1/TEX unit {gate_up4['L1/TEX Cache Throughput %']:.0f}% busy" in limits
    assert f"(DRAM) is {gate_up4['DRAM Throughput %']:.0f}% busy" in limits
    assert f"keeps DRAM {gate_up16['DRAM Throughput %']:.0f}% busy" in limits
    assert gate_up4["DRAM Throughput %"] < gate_up16["DRAM Throughput %"] < gate_up4["L1/TEX Cache Throughput %"]
    best = results.load("nf4_lookups")["best_us"]
    assert f"({best['gate_up prmt']:.1f} µs" in limits and best["gate_up shuffle"] < best["gate_up mixed"]
    batch, rows = results.nf4_batch_sentence(), results.load("nf4_batch")["rows"]
    for row in rows:  # every batch size's figures
        assert f"against {row['nf4_bitsandbytes']:.1f} tok/s ({row['glmkit_over_bitsandbytes']:.2f}x" in batch
        for key, how in (("nf4_rows", "per row"), ("nf4_tensor_cores", "on tensor cores")):
            assert (key not in row) or f"{row[key]:.1f} {how}" in batch
    assert len(results.nf4_batch_table().rows) == len(rows)
    # the decoder's choices follow the measurement: the per-row kernel up to where the tensor-core kernel overtakes
    # it, glmkit's kernels up to the largest batch at which they were faster than bitsandbytes' at every size
    both = [r for r in rows if "nf4_rows" in r and "nf4_tensor_cores" in r]
    overtakes = min(r["batch"] for r in both if r["nf4_tensor_cores"] > r["nf4_rows"])
    assert f"faster from batch {overtakes}" in batch and ROW_KERNEL_MAX_VECTORS == overtakes - 1
    faster = [r["batch"] for r in rows if r["glmkit_over_bitsandbytes"] > 1.02]
    assert faster == [r["batch"] for r in rows] and FOUR_BIT_MAX_BATCH >= max(faster)
    # 2-8 rows through the CUDA tensor-core kernel: each batch size's figures, and the dispatch follows them (the
    # kernel from the smallest batch where it beat the Triton kernels per projection, never at one vector)
    mma, mma_rows = results.nf4_mma_sentence(), [r for r in results.load("nf4_batch_mma")["rows"] if "nf4_mma" in r]
    for row in mma_rows:
        triton = max(row.get("nf4_rows", 0.0), row.get("nf4_tensor_cores", 0.0))
        assert f"batch {row['batch']}: {row['nf4_mma']:.0f} tok/s against {triton:.0f}" in mma
        assert row["nf4_mma"] > triton and row["nf4_mma"] > row["bf16"]
    assert len(results.nf4_mma_table().rows) == len(mma_rows) and "faster than bf16" in mma
    bars = [p.get_height() for p in results.nf4_mma_chart().axes[0].patches]  # three bars a batch size, as measured
    assert bars == [v for r in mma_rows for v in (r["nf4_mma"], max(r.get("nf4_rows", 0.0),
                                                                    r.get("nf4_tensor_cores", 0.0)), r["bf16"])]
    projections = results.load("nf4_mma")["projections"]
    one = [p["mma_over_triton"] for p in projections if p["vectors"] == 1]
    several = {p["vectors"] for p in projections if p["vectors"] > 1 and p["mma_over_triton"] > 1.2}
    assert f"{min(one):.2f}-{max(one):.2f}x at one vector" in mma and min(one) < 1.0
    assert gemv4bit_mma.MIN_VECTORS == min(several) == 2 and max(several) <= gemv4bit_mma.MAX_VECTORS
    ncu = next(r for r in results.load("nf4_mma_ncu")["rows"] if r["vectors"] == 1)
    stalls = ncu["stalls per issued instruction"]
    assert f"keeps DRAM {ncu['DRAM Throughput %']:.0f}% busy" in mma and max(stalls, key=stalls.get) == "long_scoreboard"
    assert f"({stalls['long_scoreboard']:.1f} cycles per issued instruction" in mma
    stream = list(results.load("nf4_stream")["versions"].values())[-1]  # the one-vector layout tried and not kept
    ours, theirs = (sum(p[k] for p in stream["projections_1_vector"].values()) for k in ("stream_best_us", "triton_us"))
    assert "was slower still over a layer" in mma and f"{ours:.1f} against {theirs:.1f} µs" in mma and ours > theirs
    fixed = results._fixed_us(stream["pieces_of_4_8_16_blocks"])
    assert 0 < fixed < min(r["stream (4, 16, 4, 2), reads only"] for r in stream["pieces_of_4_8_16_blocks"])
    assert f"it took {fixed:.1f} µs a launch that does not grow" in mma
    split, fast = str(results.two_gpu_fast_sentence()), results.load("two_gpu_fast")
    one = {x["batch_size"]: x["decode_tok_s"] for x in fast["rows"] if x["path"] == "one GPU"}
    for x in fast["rows"]:
        if x["path"] != "one GPU":
            cache = f" ({x['context']:,}-token cache)" if x["context"] != 8192 else ""
            assert f"batch {x['batch_size']}{cache}: {x['decode_tok_s']:.1f} tok/s against " \
                f"{one[x['batch_size']]:.1f} on one GPU" in split
    assert f"{fast['plan']['largest_batch_at_8k']} is the largest it fits on two 12 GiB cards" in split
    assert "one-GPU proxy" in results.two_gpu_fast_sentence("two_gpu_fast_proxy")
    assert "2.1%" in results.planner_sentence()  # the held-out check


def test_planner_is_close_on_static_cache_long_context_runs():
    lc = results.load("long_context")
    for row in lc["runs"]:
        if row["ok"] and "DynamicCache" not in row["mode"]:
            assert abs(results.planned_long_context_bytes(row) / row["peak_reserved"] - 1) < 0.02, row


def test_bench_keeps_measurement_only():
    assert not [n for n in dir(glmkit.bench) if n.startswith("plot_") or n.endswith("_table") and n != "decode_table"]


def test_speed_ceiling_from_bandwidth():
    assert round(speed_ceiling("RTX 3060 12GB"), 1) == 20.5  # 360 GB/s / 17.56 GB per token
    assert speed_ceiling("RTX 3060 12GB", "nf4") > 2.5 * speed_ceiling("RTX 3060 12GB")
    assert speed_ceiling("RTX 3090 24GB", tensor_parallel=2) == pytest.approx(2 * speed_ceiling("RTX 3090 24GB"))
    rows = {r[0]: r for r in decision_table().rows}
    assert rows["12GiB"][1:4] == ["no", "yes", "yes"]  # bf16 not on one 12 GiB card; nf4 on one; bf16 on two
    assert rows["24GiB"][1] == "yes"


def _level(name, kind):
    """``{clients: tokens/s}`` of one server of a ``benchmarks/server_tp.py`` result."""
    row = next(r for r in results.load(name)["rows"] if r["kind"] == kind)
    return {lv["clients"]: lv["tokens_per_s"] for lv in row["levels"]}


def test_the_server_on_two_cards_renders_the_committed_files():
    tp, split, one = _level("server_tp_2gpu", "tp2"), _level("server_split_2gpu", "split"), _level("server_split_2gpu", "one")
    plain = {lv["clients"]: lv["tokens_per_s"] for lv in results.load("server_load_2gpu")["levels"]}
    table = results.two_card_server_table()
    rows = {int(r[0]): r for r in table.rows}
    assert sorted(rows) == sorted(one)
    for c, row in rows.items():
        assert row[1] == f"{tp[c]:.1f}" and row[2] == f"{tp[c] / one[c]:.2f}x"
        assert row[3] == f"{split[c]:.1f}" and row[4] == f"{split[c] / one[c]:.2f}x" and row[5] == f"{one[c]:.1f}"
        assert row[6] == (f"{plain[c]:.1f}" if c in plain else "-")
    assert "NVIDIA H200" in table.caption and "separate run" in table.caption  # two runs: said, not hidden
    sentence = results.two_card_server_sentence()
    more = sum(tp[c] > one[c] for c in one)
    assert f"more tokens/s than one GPU at {more} of {len(one)} levels" in sentence
    assert " / ".join(f"{one[c]:.1f}" for c in sorted(one)) in sentence
    assert "| clients |" in results.readme_measured_section() and f"| {tp[1]:.1f} |" in results.readme_measured_section()
    assert results.two_card_server_chart() is not None


def _batch1(name, start):
    return next(x["decode_tok_s"] for x in results.load(name)["rows"] if x["batch_size"] == 1 and x["path"].startswith(start))


def test_which_path_for_which_link_renders_the_committed_files():
    whole, shard = results.tp_bound_pairs(results.load("tp_bound"))[1]
    rows = {r[0]: r for r in results.two_card_link_table().rows}
    for link, split, tp, allreduce in (("NVLink, peer to peer", "two_gpu_fast", "tp_fast", "allreduce_latency"),
                                       ("through host memory", "two_gpu_fast_host_hop", "tp_fast_no_p2p",
                                        "allreduce_latency_no_p2p")):
        row = rows[link]
        s, one = _batch1(split, "split"), _batch1(split, "one GPU")
        hop = 1 / s - 1 / one
        lat = results.load(allreduce)["runs"][0]["in_cuda_graph_us"] * 1e-6
        t = _batch1(tp, "TP=2")
        own = any(x["path"].startswith("one GPU") for x in results.load(tp)["rows"])
        tp_one = _batch1(tp, "one GPU") if own else _batch1("tp_fast", "one GPU")
        assert row[6].endswith("*)") != own  # a star: its one-GPU figure comes from tp_fast.json's run
        assert row[2] == f"{1e6 * hop:.0f}" and row[3] == f"{s:.1f} ({s / one:.2f}x)"
        token_ms = results.ALLREDUCES_PER_TOKEN * 1e3 * lat  # the token's all-reduces, ms
        assert row[4] == f"{1e6 * lat:.1f}" and row[5] == f"{token_ms:.2f}"
        assert row[6].startswith(f"{t:.1f} ({t / tp_one:.2f}x")
        per_token = results.ALLREDUCES_PER_TOKEN
        split_est, tp_est = whole / (1 + hop * whole), 1 / (1 / shard + per_token * lat)  # tok/s, computed here
        assert row[7] == f"{split_est / whole:.2f}x / {tp_est / whole:.2f}x"
    guidance = results.link_guidance_sentence()
    assert f"**{(1 / whole - 1 / shard) / results.ALLREDUCES_PER_TOKEN * 1e6:.1f} µs**" in guidance  # the break-even latency
    assert "approximation" in guidance and "allreduce_latency.py" in guidance and "gpu_links.py" in guidance
    e = results.two_card_estimate(1 / whole, 1 / shard, allreduce_s=1e-3, hop_s=0.0)  # a very slow link
    assert e.tp_tok_s < e.one_gpu_tok_s == e.split_tok_s and "TP=2" in str(e)


def test_two_card_figures_say_not_measured_without_their_files(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    for figure in (results.two_card_server_table(), results.two_card_server_sentence(), results.two_card_link_table(),
                   results.link_guidance_sentence(), results.two_gpu_table(), results.two_gpu_longest_sentence()):
        assert "not measured yet" in str(figure)
    assert results.two_card_server_chart() is None


def test_plain_two_gpu_runs_render_the_committed_files():
    tp = results.load("tensor_parallel")
    base = {x["batch_size"]: x["decode_tok_s"] for x in tp["runs"] if x["mode"] == "one GPU"}
    rows = results.tensor_parallel_table().rows
    for x, row in zip(tp["runs"], rows):
        assert row[2] == f"{x['decode_tok_s']:.1f}" and row[3] == f"{x['decode_tok_s'] / base[x['batch_size']]:.2f}x"
    two = results.load("two_gpu")
    longest = results.two_gpu_longest_sentence()
    for mode in {x["mode"] for x in two["longest"]}:
        ok = max(x["prompt_len"] for x in two["longest"] if x["mode"] == mode and x["ok"])
        assert f"{mode}: {ok:,} tokens ok" in longest
    for m, row in zip(two["maps"], results.two_gpu_table().rows):
        assert row[4] == " / ".join(f"{p / 2**30:.2f}" for p in m["peak_reserved"])


NOTEBOOKS_WITH_TWO_GPU_FIGURES = ("02_manual_split", "03_auto_maps", "08_tensor_parallel", "09_the_guide_point_by_point")


@pytest.mark.parametrize("name", NOTEBOOKS_WITH_TWO_GPU_FIGURES)
def test_every_figure_a_notebook_renders_comes_from_a_committed_file(name):
    """Every ``glmkit.results`` sentence or table a notebook calls with no argument renders a measurement, not
    "not measured yet": the files exist, so the notebook must show them."""
    import inspect

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", 4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    called = set(re.findall(r"\b(\w+_(?:sentence|table))\(\)", code))
    figures = {n: getattr(results, n) for n in called if hasattr(results, n)}
    assert figures, name
    for n, f in figures.items():
        if not any(p.default is p.empty for p in inspect.signature(f).parameters.values()):
            assert "not measured yet" not in str(f()), n
    assert "not measured yet" not in code


def test_readme_says_not_measured_nowhere():
    assert "not measured yet" not in (ROOT / "README.md").read_text()


def test_readme_shows_the_load_chart_of_the_committed_runs():
    """The README's load chart (``docs/server_load.svg``, written by ``--update-readme``) is there, referenced, and
    drawn from the committed runs: its text (kept as text) names each run's device and the GPU run's clients."""
    root = results.RESULTS_DIR.parents[1]
    svg = (root / results.README_CHART).read_text()
    assert f"]({results.README_CHART.as_posix()})" in (root / "README.md").read_text()
    for name in ("server_load_cpu", "server_load_gpu_cb"):
        assert f"{results.load(name)['environment']['device']}: throughput" in svg, name
    gpu = results.load("server_load_gpu_cb")
    for n in {level["clients"] for level in gpu["levels"]}:
        assert f">{n}</text>" in svg, n
    assert f"busy: while a {gpu['ttft']['continuous']['long_tokens']}-token request runs" in svg


def test_fused_step_figures_render_the_committed_files():
    d, p = results.load("decode_h200_fused"), results.load("profile_step_h200_fused")
    fused = next(r for r in d["batch1"] if r["path"] == "fast" and not r.get("fast_options"))
    sentence = str(results.fusion_sentence())
    assert f"{fused['decode_tok_s']:.1f} tok/s, {100 * fused['fraction_of_roofline']:.1f}% of the roofline" in sentence
    table = results.fusion_table()
    labels = [row[0] for row in table.rows]
    compiled = p["paths"]["fast, compiled layer, Triton GEMV, CUDA graph"]
    row = table.rows[labels.index("all fused, compiled layer, plain launches")]
    assert row[1] == f"{compiled['kernels_per_step']:.0f}" and row[-1] == f"{compiled['wall_ms']:.2f}"
    if results.PDL_PATH in p["paths"]:  # the default, uncompiled with PDL: its wall time
        assert labels[-1] == "all fused, uncompiled, PDL (the default)"
        assert table.rows[-1][-1] == f"{p['paths'][results.PDL_PATH]['wall_ms']:.2f}"
    assert table.rows[0][0].startswith("before fusion")  # profile_step_h200.json, the step before any fusion


def test_pdl_figures_render_the_committed_files():
    d, probe = results.load("pdl_decode"), results.load("pdl_probe")
    table = results.pdl_table()
    measured = [r for r in d["rows"] if "decode_tok_s" in r]
    assert [row[1] for row in table.rows] == [f"{r['decode_tok_s']:.1f}" for r in measured]
    assert table.rows[0][-1] == "1.000x" and d["environment"]["device"] in table.caption
    plain = min(r["ms"] for r in probe["rows"] if r["pdl"] == 0)
    assert f"{plain:.3f} ms with plain launches" in str(results.pdl_probe_sentence())


def test_step_roles_figures_render_the_committed_files():
    d, apart = results.load("step_roles"), results.load("attention_apart")
    run = d["runs"]["bf16, fast path"]
    table = results.step_roles_table()
    assert [row[2] for row in table.rows] == [f"{r['adds_us']:.0f}" for r in run["roles"]]
    assert f"takes {run['replay_us']:.0f} µs" in table.caption and d["environment"]["device"] in table.caption
    sentence = str(results.attention_cost_sentence())
    replay = {k.split(", ")[1]: r["replay_us"] for k, r in d["runs"].items() if k.startswith("bf16, ")}
    assert replay["no kernel"] < replay["minimal kernel"] < replay["fast path"]  # what the sentence says of them
    for k in ("fast path", "minimal kernel", "no kernel"):
        assert f"{replay[k]:.0f} µs" in sentence
    first = apart["runs"][0]["dtypes"]["bf16"]["rows"]
    old, new = first[0], first[1]
    assert (old["apart"], new["apart"]) == (False, True) and new["best_replay_us"] < old["best_replay_us"]
    assert f"from {old['best_replay_us']:.0f} to {new['best_replay_us']:.0f} µs" in sentence
    one = {r["variant"]: r["best_replay_us"] for r in results.load("attention_one_tile")["rows"]}
    tiles, whole, floor = one["tiles of 128 x 8 warps"], one["one tile of 512 x 16 warps"], one["a minimal kernel"]
    assert all(floor[p] < tiles[p] < whole[p] for p in tiles)  # what the sentence says of them
    assert " / ".join(f"{tiles[p]:.0f}" for p in sorted(tiles, key=int)) + " µs" in sentence
    pieces = {r["variant"]: r["best_replay_us"] for r in results.load("attention_pieces")["rows"]}
    one_softmax, eight = pieces["one softmax a tile of 128, 8 warps"], pieces["8 pieces of 16 a tile of 128, 8 warps"]
    assert all(one_softmax[p] < eight[p] for p in one_softmax)  # "nor did ... pay for themselves"
    assert f"from {one_softmax['160']:.0f} to {eight['160']:.0f} µs at a 160-token cache" in sentence
    stages = {r["variant"]: r for r in results.load("attention_stages")["rows"]}
    piped, now = stages["pipelined (Triton's default)"], stages["1 stage, the next tile read ahead"]
    assert all(now["best_replay_us"][p] <= piped["best_replay_us"][p] for p in now["best_replay_us"])  # "did pay"
    assert f"{100 * now['fraction_of_roofline']:.1f}% of the roofline" in sentence
    tickets = {r["variant"]: r for r in results.load("attention_tickets")["rows"]}
    walk, side = tickets["one program per KV head, tile after tile"], tickets["tiles side by side, the last to finish combines"]
    longer = sorted(side["best_replay_us"], key=int)[1:]  # caches of two and three tiles: "so did splitting"
    assert all(side["best_replay_us"][p] < walk["best_replay_us"][p] for p in longer)
    assert side["best_tok_s"] > walk["best_tok_s"] and f"{side['best_tok_s']:.1f} against {walk['best_tok_s']:.1f}" \
        in sentence


def test_one_sequence_in_4_bits_renders_the_committed_files_and_the_defaults_follow_them():
    from glmkit import gemv4bit

    r, paired = results.load("nf4_fused_paired"), results.load("nf4_paired")
    v = {row["variant"]: row for row in r["rows"]}
    sentence = str(results.nf4_fused_sentence())
    assert f"**{v['fused']['best_tok_s']:.1f} tok/s**, {v['fused']['over_bf16']:.2f}x bf16" in sentence
    assert f"against {v['compiled layer']['best_replay_us']:.0f} for the layer compiled" in sentence
    assert v["fused"]["over_bf16"] == pytest.approx(v["fused"]["best_tok_s"] / v["bf16"]["best_tok_s"])
    table = results.nf4_fused_table()
    assert [row[2] for row in table.rows] == [f"{x['best_tok_s']:.1f}" for x in r["rows"]]
    assert sorted(b.get_height() for b in results.nf4_fused_chart().axes[0].patches) == \
        sorted(x["best_tok_s"] for x in r["rows"])
    # what a 4-bit decoder does by default is what measured faster: norms folded, no PDL, two tiles a program
    assert v["fused"]["best_replay_us"] < min(v["compiled layer"]["best_replay_us"], v["fused, PDL"]["best_replay_us"])
    best = {(x["projection"], x["paired"]): x["best"]["us"] for x in paired["projections"]}
    assert all(best[(name, 1)] < best[(name, 0)] for name, _ in best) and gemv4bit.PAIRED_ROWS


def test_one_sequence_through_the_cuda_kernel_renders_the_committed_files_and_the_default_follows_them():
    from glmkit import gemv4bit_one

    r, proj = results.load(results.NF4_ONE_RUN), results.load("nf4_one")
    v = {row["variant"]: row for row in r["rows"]}
    one, plain, tri, bf16 = v["CUDA kernel"], v["CUDA kernel, plain launches"], v["Triton kernel"], v["bf16"]
    sentence = str(results.nf4_one_sentence())
    assert f"**{one['best_tok_s']:.1f} tok/s**, {one['over_bf16']:.3f}x bf16" in sentence
    assert f"{tri['best_tok_s']:.1f} tok/s ({tri['over_bf16']:.2f}x) through the Triton kernel" in sentence
    assert one["over_bf16"] == pytest.approx(one["best_tok_s"] / bf16["best_tok_s"])
    # the kernels the two decoders ran, and the default is the one that measured faster
    assert one["kernel_env"] is None and tri["kernel_env"] == "triton" and one["fuses_norms"] and tri["fuses_norms"]
    assert one["best_replay_us"] < min(tri["best_replay_us"], v["CUDA kernel, compiled layer"]["best_replay_us"],
                                       plain["best_replay_us"])
    # programmatic dependent launch changes when the kernels run, not what they compute: the same bits
    assert one["options"] == {} and plain["options"] == {"pdl": False}
    assert plain["step_logits_rel_diff_to_default"] == 0 and plain["tokens_as_default"] == plain["of"]
    assert f"against {plain['best_tok_s']:.1f} tok/s ({plain['over_bf16']:.2f}x) with the same kernels" in sentence
    assert all(p["one_folded_pdl"]["same_as_plain"] for p in proj["projections"])
    table = results.nf4_one_table()
    assert [row[4] for row in table.rows] == [f"{p['one_folded']['us']:.1f}" for p in proj["projections"]]
    assert [row[5] for row in table.rows] == [f"{p['one_folded_pdl']['us']:.1f}" for p in proj["projections"]]
    assert sorted(b.get_height() for b in results.nf4_one_chart().axes[0].patches) == \
        sorted(x["best_tok_s"] for x in r["rows"])
    # the shipped launch shapes are the ones each projection measured fastest at (of those timed)
    for p in proj["projections"]:
        swiglu = p["projection"] == "gate_up"
        best = min(p["one"], key=lambda x: x["us"])
        shape = gemv4bit_one.shape_for(swiglu, p["columns"])
        timed = {(x["groups"], x["warps"], x["depth"], x["wide"]): x["us"] for x in p["one"]}
        shipped = timed[(shape.groups, shape.warps, shape.depth, shape.wide)]
        assert shipped <= 1.05 * best["us"], (p["projection"], shape, best)
    # against twice bf16: reached (by how much) or how far, from the same file; and what Nsight Compute saw
    margin = bf16["best_replay_us"] / 2 - one["best_replay_us"]
    assert f"{one['over_bf16']:.3f}x in decode tok/s, and the step's graph {abs(margin):.0f} µs " \
        f"{'under' if margin >= 0 else 'over'} half of bf16's" in sentence
    # where the last changes' speed came from (nf4_leave_sms.json): each variant in order, and bf16 beside them
    leave = {row["variant"]: row for row in results.load("nf4_leave_sms")["rows"]}
    steps = " → ".join(f"{label} {leave[name]['best_tok_s']:.1f}" for name, label in results.LEAVE_LABELS.items())
    assert steps in sentence and f"against bf16's {leave['bf16']['best_tok_s']:.1f}" in sentence
    assert all(row["tokens_as_default"] == row["of"] for row in leave.values() if row["precision"] == "nf4")
    # bf16 keeps TICKET_TILE because EARLY_TILE without SMs left measured slower
    assert leave["bf16, tiles of 256"]["best_tok_s"] < leave["bf16"]["best_tok_s"]
    # what holding x in registers gave, variants taking turns in one run (nf4_x_regs.json), and that run beside it
    x = {row["variant"]: row for row in results.load("nf4_x_regs")["rows"]}
    now, before = x[results.X_REGS_NOW], x[results.X_REGS_BEFORE]
    assert now["x_regs"] and not before["x_regs"] and now["best_replay_us"] < before["best_replay_us"]
    assert f"{now['best_replay_us']:.0f} µs against {before['best_replay_us']:.0f} with x read from shared memory" \
        in sentence
    assert f"nf4 {now['best_tok_s']:.1f}: **{now['over_bf16']:.3f}x** (`nf4_x_regs.json`, another run)" in sentence
    # another H200 only where the cards recorded with the runs differ
    assert not set(results._gpu_uuids(results.NF4_ONE_RUN)) & set(results._gpu_uuids("nf4_one_step_run5"))
    assert "(`nf4_one_step_run5.json`, another H200)" in sentence
    assert f"{now['tokens_as_shipped']} of {now['of']} greedy tokens agree" in sentence
    # the runs of the kernel before are not shown as this kernel's
    assert "greedy_tail.json" not in sentence and "nf4_one_step_run3" not in sentence
    gate_up = results.load("nf4_one_ncu")["rows"][0]
    stall = max(gate_up["stalls per issued instruction"].items(), key=lambda kv: kv[1])
    assert gate_up["projection"] == "gate_up" and f"`{stall[0]}` ({stall[1]:.2f} cycles" in sentence
    assert f"DRAM {gate_up['DRAM Throughput %']:.0f}% busy" in sentence
    # the same profile with x in registers: fewer shared-memory wavefronts, and the two longest waits named
    now = results.load("nf4_one_ncu_x_regs")["rows"][0]
    wavefronts = "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"
    assert now["projection"] == "gate_up" and now[wavefronts] < gate_up[wavefronts]
    assert f"{now[wavefronts] / 1e6:.2f} M shared-memory load wavefronts on gate_up against " \
        f"{gate_up[wavefronts] / 1e6:.2f} M" in sentence
    waits = sorted((kv for kv in now["stalls per issued instruction"].items()
                    if kv[0] not in ("selected", "not_selected")), key=lambda kv: kv[1], reverse=True)
    assert f"wait most on `{waits[0][0]}` ({waits[0][1]:.2f}" in sentence and f"`{waits[1][0]}` ({waits[1][1]:.2f}" \
        in sentence


def test_one_sequence_figures_render_a_fresh_run_without_dependent_launch(monkeypatch):
    """``nf4_one.py`` run again on a GPU without programmatic dependent launch (before Hopper) writes no PDL timings
    and no ``earlier_versions``: the sentence and table show what it has, the plain launches last."""
    import copy

    proj = copy.deepcopy(results.load("nf4_one"))
    for p in proj["projections"]:
        del p["one_folded_pdl"]
    del proj["layer_us"]["one_folded_pdl"], proj["earlier_versions"]
    loaded = results.load
    monkeypatch.setattr(results, "load", lambda name, *a: proj if name == "nf4_one" else loaded(name, *a))
    sentence, table = str(results.nf4_one_sentence()), results.nf4_one_table()
    q = proj["projections"][0]
    assert f"{q['projection']} {q['triton_folded']['us']:.1f} → {q['one_folded']['us']:.1f} µs" in sentence
    assert "back to back" not in sentence and "plain read of the same bytes" not in sentence
    assert "CUDA kernel, PDL (µs)" not in table.headers and table.rows[0][4] == f"{q['one_folded']['us']:.1f}"
    assert table.rows[0][5] == f"{q['triton_folded']['us'] / q['one_folded']['us']:.2f}x"


def test_the_greedy_pick_inside_the_step_renders_the_committed_files_and_the_default_follows_them():
    r = results.load("greedy_tail")
    g = {(row["precision"], row["loop"]): row for row in r["rows"]}
    sentence, table = str(results.greedy_tail_sentence()), results.greedy_tail_table()
    for p in ("nf4", "bf16"):
        before, now = g[(p, results.GREEDY_BEFORE)], g[(p, results.GREEDY_IN_STEP)]
        # the default loop (decode_tokens -> decode_greedy) is the one that measured faster, with and without the
        # end-token check, and it decodes the same tokens
        assert now["best_tok_s"] > before["best_tok_s"] and now["best_tok_s_eos_check"] > before["best_tok_s_eos_check"]
        assert now["tokens_as_argmax_after"] == now["of"] == 32
        gain = (now["best_tok_s"] / before["best_tok_s"] - 1) * 100
        assert f"{p} {before['best_tok_s']:.1f} → {now['best_tok_s']:.1f} tok/s ({gain:+.1f}%)" in sentence
        assert [p, results.GREEDY_IN_STEP, f"{now['best_tok_s']:.1f}", f"{gain:+.1f}%"] == \
            [row[:4] for row in table.rows if row[:2] == [p, results.GREEDY_IN_STEP]][0]
    nf4, bf16 = g[("nf4", results.GREEDY_IN_STEP)], g[("bf16", results.GREEDY_IN_STEP)]
    assert nf4["over_bf16_same_loop"] == pytest.approx(nf4["best_tok_s"] / bf16["best_tok_s"])
    assert f"nf4 decodes {nf4['over_bf16_same_loop']:.3f}x bf16" in sentence


def _default_row(rows: list[dict]) -> dict:
    """The row of a run's default bf16 decoder, found apart from results' own lists: the one-kernel MLP's bf16 row in
    mlp16_step's runs, the shipped ring's in the ring runs; before it, the 16-bit CUDA kernel's in gemv16_step's runs
    and the variant runs' default."""
    return next(row for row in rows if (row.get("mlp_kernel") and row["precision"] == "bf16") or row.get("cuda_kernel")
                or row["variant"] in ("ring 12 ahead 12", "triton gate_up", "default", "Triton attention"))


@pytest.mark.parametrize("listed", ["BF16_NOW_RUNS", "BF16_BEFORE_RUNS"])
def test_bf16_now_runs_read_each_files_default_row(listed, monkeypatch, tmp_path):
    """Every listed run of the default bf16 decoder (now, and before its MLP ran as one kernel) is a row with its own
    file's figures, from the default row (not the Triton GEMVs', not a variant's), its card the one the file records,
    and the last column follows the mark."""
    runs = results.bf16_now_runs(listed=getattr(results, listed))
    assert [r["name"] for r in runs] == [name for name, _ in getattr(results, listed)]
    for r in runs:
        result = results.load(r["name"])
        rows = result["rows"]
        default = _default_row(rows)
        assert (r["tok_s"], r["step_us"], r["share"]) == (default["best_tok_s"], default["best_replay_us"],
                                                          default["fraction_of_roofline"])
        assert any(row["best_tok_s"] != r["tok_s"] for row in rows)  # a variant beside it: another rate
        assert r["gpu_uuid"] == result["gpu_uuids"][0][:12]
    table = results.bf16_now_table(runs)
    for r, row in zip(runs, table.rows, strict=True):
        assert row[0] == f"`{r['name']}.json`" and row[-1] == ("yes" if r["share"] >= 0.9 else "no")
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in str(results.bf16_now_table()) and "not measured yet" in str(results.bf16_now_sentence())


def _now_run(uuid: str, copy: float, step: float, tok_s: float, share: float) -> dict:
    return {"name": f"run_{uuid}", "gpu_uuid": uuid, "environment": {"device": "NVIDIA H200", "date": "2026-12-01"},
            "copy_bandwidth_bytes_s": copy * 1e12, "step_us": step, "tok_s": tok_s, "share": share}


@pytest.mark.parametrize("runs, told", [
    # the cards at 90% copied slower than the others: said so
    ([_now_run("a", 4.24, 4487, 223.0, 0.923), _now_run("b", 4.27, 4570, 217.0, 0.893)], "copied slower decoded faster"),
    # copy bandwidths that overlap: they do not tell the cards apart
    ([_now_run("a", 4.26, 4487, 223.0, 0.923), _now_run("b", 4.25, 4570, 217.0, 0.893),
      _now_run("c", 4.27, 4571, 217.0, 0.891)], "does not tell those cards apart"),
    # the faster cards copied faster too: no conclusion
    ([_now_run("a", 4.30, 4487, 223.0, 0.905), _now_run("b", 4.20, 4570, 217.0, 0.899)], None),
    # every run at 90%: no comparison of steps
    ([_now_run("a", 4.24, 4487, 223.0, 0.923)], None),
])
def test_bf16_now_sentence_draws_only_what_its_figures_hold(runs, told):
    sentence = str(results.bf16_now_sentence(runs, before=[]))
    at = sum(r["share"] >= 0.9 for r in runs)
    assert f"90% or more in {at} of {len(runs)}" in sentence
    assert ("The same step took" in sentence) == (0 < at < len(runs))
    for phrase in ("copied slower decoded faster", "does not tell those cards apart"):
        assert (phrase in sentence) == (phrase == told)


def test_gemv16_sentence_names_what_was_not_kept(monkeypatch, tmp_path):
    """The 16-bit kernel's paragraph gives the figures of what was tried beside it and not kept, from their files, and
    leaves them out where the files are absent."""
    gate_up = results.load("gemv16_gate_up")
    rows = {r["variant"]: r["best_replay_us"] for r in gate_up["rows"]}
    clause = results._gemv16_not_kept()
    assert f"against {rows['triton gate_up']:.0f}" in clause and "`gemv16_gate_up.json`" in clause
    assert min(us for v, us in rows.items() if v.startswith("cuda")) > rows["triton gate_up"]  # why not kept
    attention = results.load("attention_one_step")
    steps = {r["variant"]: r["best_replay_us"] for r in attention["rows"]}
    assert f"{steps['CUDA attention']:.0f}" in clause and "`attention_one_step*.json`" in clause
    assert clause in str(results.gemv16_sentence())
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert results._gemv16_not_kept() == ""


def test_bf16_now_sentence_gives_the_default_before_apart():
    """The runs before the one-kernel MLP are told apart from today's: their span and how many reached the mark."""
    now = [_now_run("a", 4.24, 4434, 224.6, 0.929)]
    before = [_now_run("b", 4.24, 4512, 221.2, 0.915), _now_run("c", 4.27, 4570, 216.0, 0.889)]
    sentence = str(results.bf16_now_sentence(now, before=before))
    assert "90% or more in 1 of 1." in sentence
    assert "Before its MLP ran as one kernel, 2 runs on 2 NVIDIA H200s" in sentence
    assert "read 88.9–91.5%, 90% or more in 1 of 2." in sentence


def test_mlp16_paragraph_and_table_read_each_run(monkeypatch, tmp_path):
    """The one-kernel MLP's paragraph spans every run's gain and share in each precision, from the files, and its
    table holds every row of every run; both say "not measured" without the files."""
    runs = results.mlp16_runs()
    assert [name for name, _ in runs] == list(results.MLP16_RUNS)
    sentence = str(results.mlp16_sentence())
    for p in ("bf16", "fp16"):
        pairs = [results._mlp16_pair(r, p) for _, r in runs]
        shares = [100 * k["fraction_of_roofline"] for _, k in pairs]
        assert f"{min(shares):.1f}–{max(shares):.1f}% of the copy roofline" in sentence
        assert all(k["best_replay_us"] < t["best_replay_us"] for t, k in pairs)  # the kernel's step is the faster
    first_kernel = results._mlp16_pair(runs[0][1], "bf16")[1]
    assert f"{first_kernel['best_replay_us']:.0f} against" in sentence and "`mlp16_transposed.json`" in sentence
    table = results.mlp16_table()
    assert len(table.rows) == sum(len(r["rows"]) for _, r in runs)
    assert {row[3] for row in table.rows} == {"one kernel", "Triton gate/up, down"}
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in str(results.mlp16_sentence()) and "not measured yet" in str(results.mlp16_table())
    assert results.mlp16_chart() is None


def test_speed_by_cache_length_reads_the_newest_sweep(monkeypatch, tmp_path):
    """Every cache length of the newest sweep is a row with each precision's rates, with cache spans and with one
    graph for the whole cache, from the file, and their share of the precision's best; the sentence gives each line's
    worst and the earlier sweep's; without a file, "not measured"."""
    r = results.load("max_len_spans")
    table, sentence = results.max_len_table(), str(results.max_len_sentence())
    assert "`max_len_spans.json`" in table.caption
    for p in r["precisions"]:
        best = max(x["best_tok_s"] for rows in (r["precisions"][p], r["cache_spans"][p]) for x in rows)
        for decoder, rows in (("cache spans (default)", r["cache_spans"][p]),
                              ("one graph for the whole cache", r["precisions"][p])):
            column = table.headers.index(f"{p}, {decoder}: tok/s (of {p}'s best)")
            assert [row[column] for row in table.rows] == [f"{x['best_tok_s']:.1f} ({x['best_tok_s'] / best:.0%})"
                                                           for x in rows]
            worst = min(rows, key=lambda x: x["best_tok_s"])
            assert f"{p} with {decoder}: " in sentence
            assert f"at worst {worst['best_tok_s'] / best:.0%} of {p}'s best ({worst['max_len']:,} positions)" in sentence
    earlier = results.load("max_len_sweep")["precisions"]["nf4"]
    worst = min(earlier, key=lambda x: x["best_tok_s"])
    assert f"{100 * worst['best_tok_s'] / max(x['best_tok_s'] for x in earlier):.0f}% of its best in nf4" in sentence
    assert results.max_len_chart() is not None
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert "not measured yet" in str(results.max_len_table()) and results.max_len_chart() is None


def test_the_long_context_clause_reads_the_newest_run_and_the_two_kernels():
    """The 32K run shown is the newest with a long_context stage; the CUDA and Triton 4-bit kernels' runs of one call
    give the ratio."""
    clause = results.nf4_long_context_clause()
    newest = next(r for r in map(results.load, results.NF4_DECODE_RUNS) if r and r.get("long_context"))
    assert f"`{newest['name']}.json`" in clause and f"{newest['long_context']['decode_tok_s']:.1f} tok/s" in clause
    a, b = (results.load(f"nf4_long_{k}")["long_context"]["decode_tok_s"] for k in ("cuda", "triton"))
    assert f"{a:.1f} tok/s with glmkit's batch-1 4-bit CUDA kernel and {b:.1f} with its Triton kernel: {a / b:.2f}x" in clause
    assert clause in str(results.nf4_decode_sentence())


def _accuracy_file(tmp_path, nf4: float, yardstick: float) -> None:
    """An nf4_decode.json whose accuracy stage gave nf4 and its yardstick these median errors."""
    def row(against: str, median: float) -> dict:
        steps = [median * (0.9 + 0.2 * i / 15) for i in range(16)]  # each step's error, around the median
        return {"against": against, "rel_err_median": median, "rel_err_max": median * 1.2, "argmax_equal": 10,
                "steps": 16, "rel_err_steps": steps}
    rows = {"bf16 fast (glmkit kernels)": row("checkpoint in fp32", 0.065), results.NF4_DEFAULT_PATH: row("nf4", nf4),
            results.ACCURACY_YARDSTICK: row("nf4", yardstick)}
    env = {"device": "NVIDIA H200", "date": "2026-12-01"}
    (tmp_path / "nf4_decode.json").write_text(json.dumps({"name": "nf4_decode", "environment": env, "decode": [],
                                                          "accuracy": {"forced_steps": 16, "rows": rows}}))


@pytest.mark.parametrize("nf4, yardstick, within", [(0.070, 0.072, True), (0.0745, 0.0704, False)])
def test_fast_path_accuracy_says_only_what_its_figures_hold(monkeypatch, tmp_path, nf4, yardstick, within):
    """nf4's logits are set against bf16 arithmetic on the same nf4 weights: "no error beyond" only where nf4's
    median error is at most the yardstick's, else by how much it is above; the table holds every decoder's row."""
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    _accuracy_file(tmp_path, nf4, yardstick)
    sentence = str(results.fast_path_accuracy_sentence())
    assert ("add no error beyond" in sentence) == within
    assert (f"{nf4 / yardstick:.2f}x that" in sentence) == (not within)
    assert f"{100 * nf4:.2f}% from an fp32 decoder on the same nf4 weights" in sentence
    # step by step: every step's ratio is nf4 / yardstick, so nf4 is the smaller on all steps or none
    assert f"smaller on {16 if nf4 < yardstick else 0} of 16 steps" in sentence
    assert f"per-step ratios is {nf4 / yardstick:.3f}" in sentence
    assert [row[2] for row in results.fast_path_accuracy_table().rows] == ["6.50%", f"{100 * nf4:.2f}%",
                                                                          f"{100 * yardstick:.2f}%"]


def test_the_committed_accuracy_names_both_4bit_kernels_and_why_they_differ():
    """The newest accuracy run shows the Triton kernel's error and the CUDA kernel's with bf16 products beside the
    default's (fp16 products), and the per-projection run says how far the CUDA kernel is from exact with each."""
    acc = results._accuracy_run()["accuracy"]["rows"]
    sentence = str(results.fast_path_accuracy_sentence())
    for path in (results.NF4_TRITON_PATH, results.NF4_BF16_PRODUCTS_PATH):
        assert f"{100 * acc[path]['rel_err_median']:.2f}%" in sentence
        assert path in [row[0] for row in results.fast_path_accuracy_table().rows]
    rows = results.load("nf4_code_rounding")["rows"]
    assert all(x["cuda_vs_exact"] < x["cuda_bf16_products_vs_exact"] and x["fp16_code_vs_exact_fp64"] <
               x["bf16_code_vs_exact_fp64"] for x in rows)  # the figures the sentence's "against" rests on
    for key in ("cuda_vs_exact", "cuda_bf16_products_vs_exact", "cuda_large_x_vs_exact"):
        assert results._range([100 * x[key] for x in rows], 2, "%") in sentence


def test_the_accuracy_sentence_gives_both_bf16_yardsticks_and_the_prefill_before_and_after():
    """The cuBLAS yardstick beside the fast path's, each layer's error given fp32's inputs, and the prompt's keys with
    q/k/v as one GEMM and as three (the run before), from the committed files."""
    sentence = str(results.fast_path_accuracy_sentence())
    acc = results._accuracy_run()["accuracy"]["rows"]
    for path, where in ((results.ACCURACY_YARDSTICK_CUBLAS, "from fp32 on the same nf4 weights"),
                        (results.BF16_CUBLAS_PATH, "on the checkpoint")):
        assert f"{100 * acc[path]['rel_err_median']:.2f}% {where}" in sentence
    run, before = results.load("nf4_layer_errors"), results.load("nf4_layer_errors_three_gemms")
    assert results._range([100 * x for x in run["rows"]["nf4 fast, fed"]["layer_rel_err"]], 2, "%") in sentence
    for r in (run, before):
        assert f"{100 * r['rows']['nf4 fast, free']['prompt_keys_rel_err']:.2f}%" in sentence
    assert before["rows"]["nf4 fast, free"]["prompt_keys_rel_err"] > run["rows"]["nf4 fast, free"]["prompt_keys_rel_err"]


def test_the_mma_tuning_table_and_sentence_match_the_run():
    """Per launch the default and the kept shape of the 2-8-row 4-bit CUDA kernel with their summed µs; the sentence
    names the launches that took another shape and each batch's decode ratio; the kept shapes are those shipped for
    the card."""
    from glmkit.gemv import cuda_shapes_for

    run = results.load("mma_shapes_tune")
    rows = {row[0]: row for row in results.mma_shapes_table().rows}
    for p in run["projections"]:
        assert rows[p["projection"]][6] == f"{p['best']['us_summed']:.1f}"
        assert rows[p["projection"]][4] == f"{sum(p['default']['us'].values()):.1f}"
        kept = {key: p["best"][key] for key in ("warps", "unroll", "min_blocks")}
        assert cuda_shapes_for(run["device"])[("4bit-mma", p["rows"], p["columns"])] == kept
    sentence = str(results.mma_shapes_sentence())
    for b, x in run["decode"]["batches"].items():
        assert f"{b} sequences {x['best_tok_s']['tuned shapes']:.1f} tok/s" in sentence
        assert f"({x['tuned_over_default']:.3f}x)" in sentence
    assert "another shape than the default for o_proj, down_proj (at least 2% faster)" in sentence  # the committed run


def test_the_step_tuning_table_and_sentence_match_the_run():
    """Per knob the default's and the kept shape's step with their paired ratio; the sentence gives the candidates'
    spread and, where nothing was kept, says the defaults stay and what two decoders of the same shapes measured."""
    run = results.load("step_shapes_tune")
    rows = {row[0]: row for row in results.step_shapes_table().rows}
    for p in run["projections"]:
        assert rows[p["projection"]][4] == f"{p['default']['step_us']:.0f}"
        assert rows[p["projection"]][7] == f"{p['best']['over_default']:.3f}x"
    sentence = str(results.step_shapes_sentence())
    spread = [t["over_default"] for p in run["projections"] for t in p["tried"] if "over_default" in t]
    assert results._range(spread, 3, "x") in sentence and f"took {run['tuning_seconds']:.0f} s" in sentence
    assert "None was 2% faster, so the defaults stay" in sentence  # the committed run: every candidate within 2%
    assert all(t["over_default"] > 0.98 for p in run["projections"] for t in p["tried"] if "over_default" in t)
    d = run["decode"]
    assert f"({d['tuned_over_default']:.3f}x)" in sentence


def test_the_sweep_sentence_gives_the_engines_lone_request_with_and_without_spans():
    """engine_spans.json's two decoders per precision, their rates and ratio, in the cache-length sentence."""
    sentence = str(results.max_len_sentence())
    for p, rows in results.load("engine_spans")["precisions"].items():
        on, off = (next(x["best_tok_s"] for x in rows if x["cache_spans"] is spans) for spans in (True, False))
        assert f"{p} {on:.1f} tok/s with cache spans against {off:.1f} with one graph ({on / off:.2f}x)" in sentence


def test_the_newest_run_is_the_latest_date_then_the_first_named(monkeypatch, tmp_path):
    """A plain rerun under a script's other name, on a later date, is the one shown; on one date, the first name."""
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    for name, date in (("a", "2026-12-01"), ("b", "2026-12-01"), ("c", "2026-11-30")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "environment": {"date": date}, "x": 1}))
    assert results._newest(["c", "b", "a"])["name"] == "b" and results._newest(["a", "b"])["name"] == "a"
    assert results._newest(["c", "missing"], "x")["name"] == "c" and results._newest(["a"], "y") is None


def test_the_4bit_cuda_kernels_tuning_shows_each_launch_and_the_decoders_speed_both_ways():
    """one_shapes_tune.json: a row per GLM-4-9B launch with the default's and the fastest shape's time, and the
    decode speeds with both, their ratio and whether the tokens agree, as the file holds them."""
    r = results.load("one_shapes_tune")
    rows = results.one_shapes_table().rows
    assert [row[0] for row in rows] == [p["projection"] for p in r["projections"]] == ["qkv", "o_proj", "gate_up",
                                                                                        "down_proj"]
    for row, p in zip(rows, r["projections"]):
        assert row[4] == f"{p['default']['us']:.1f}" and row[6] == f"{p['best']['us']:.1f}"
        assert p["best"]["us"] <= p["default"]["us"]  # the fastest is at most the default it was timed beside
    best = r["decode"]["best_tok_s"]
    sentence = str(results.one_shapes_sentence())
    assert f"{best['tuned shapes']:.1f} tok/s with each launch's fastest shape and {best['default shapes']:.1f}" in sentence
    assert ("the same tokens" in sentence) == r["decode"]["same_tokens"]
    # none of the H200's fastest shapes beats its default by the margin a tune asks: the defaults stay
    assert not any(beats_default(p["best"]["us"], p["default"]["us"]) for p in r["projections"])
    assert "none is, and the defaults stay" in sentence
