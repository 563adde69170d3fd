"""Committed measurements (``benchmarks/results/*.json``) rendered as sentences, tables and charts.

Every full-size figure a notebook or the README states comes from here: a cell calls a function that reads
the result file and writes the sentence (as d2l renders its numbers), so rerunning a benchmark cannot leave
stale prose. A figure whose result file does not exist yet renders as a plain "not measured yet" that
names the script to run, and switches to the number once the file is committed. ``glmkit.bench`` measures
and writes the files; this module only reads them. Taught in ``notebooks/05_tuning.ipynb`` and
``notebooks/09_the_guide_point_by_point.ipynb``.

>>> decode = load("decode")
>>> print(measured_on(decode))
NVIDIA H100 80GB HBM3, 2026-11-25
>>> print(from_result("no_such_result", lambda r: "never", what="A figure", script="benchmarks/x.py"))
A figure: not measured yet (run `benchmarks/x.py` on a GPU machine to measure it).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.allreduce import PER_TOKEN
from glmkit.device_map import split_layers
from glmkit.fast_decode import FOUR_BIT_MAX_BATCH
from glmkit.gemv4bit import ROW_KERNEL_MAX_VECTORS
from glmkit.gemv4bit_mma import MAX_VECTORS as MMA_MAX_VECTORS
from glmkit.gemv_tuning import MARGIN, beats_default
from glmkit.models import glm4_9b_meta_model
from glmkit.planning import plan_memory
from glmkit.tables import html_table, text_table
from glmkit.vocabulary import PRECISIONS, GiB

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------------------------
# General helpers: a loader by name, a sentence type, a table, a bar chart and a line chart


def load(name: str, results_dir: str | Path | None = None) -> dict[str, Any] | None:
    """A committed result by name (``None`` when it was never measured).

    A file is parsed once per process while it stays the same (a re-measured file is read again), so every
    renderer can load what it needs: the dict is shared between callers, so read it and do not change it.

    >>> load("decode")["name"], load("never_measured"), load("decode") is load("decode")
    ('decode', None, True)
    """
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _parsed(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """``path``'s JSON, cached by its modification time and size (the key changes when the file does)."""
    return json.loads(Path(path).read_text())


class Text(str):
    """A sentence or paragraph built from results: plain text in a terminal, Markdown in JupyterLab."""

    def _repr_markdown_(self) -> str:
        return str(self)


def measured_on(result: dict[str, Any]) -> str:
    """``"<device>, <date>"`` of a result, for captions."""
    env = result["environment"]
    return f"{env['device']}, {env['date']}"


def not_measured(what: str, script: str) -> Text:
    """The sentence for a figure whose result file does not exist yet."""
    return Text(f"{what}: not measured yet (run `{script}` on a GPU machine to measure it).")


def from_result(name: str, render: Callable[[dict[str, Any]], Any], *, what: str, script: str) -> Any:
    """``render(result)`` for a committed result (a sentence as ``Text``; a ``Table`` or chart as it is), else the
    plain "not measured yet" sentence."""
    result = load(name)
    if result is None:
        return not_measured(what, script)
    rendered = render(result)
    return Text(rendered) if isinstance(rendered, str) else rendered


@dataclass(repr=False)
class Table:
    """Headers and rows of strings; an HTML table in Jupyter, a text table in a terminal."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""

    def _repr_html_(self) -> str:
        return html_table(self.headers, self.rows, caption=self.caption)

    def __str__(self) -> str:
        return (self.caption + "\n" if self.caption else "") + text_table(self.headers, self.rows)

    __repr__ = __str__

    def markdown(self) -> str:
        """The table in Markdown (for the README), its caption as the line above.

        >>> print(table(["clients", "tok/s"], [[1, "8.6"]], caption="c").markdown())
        c
        <BLANKLINE>
        | clients | tok/s |
        | --- | --- |
        | 1 | 8.6 |
        """
        lines = [f"| {' | '.join(self.headers)} |", "| " + " | ".join("---" for _ in self.headers) + " |"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return (self.caption + "\n\n" if self.caption else "") + "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> Table:
    """A ``Table`` of any cells (turned into strings).

    >>> print(table(["clients", "tok/s"], [[1, "8.6"]]))
    clients  tok/s
    -------  -----
    1        8.6
    """
    return Table(list(headers), [[str(c) for c in row] for row in rows], caption)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str = "",
              reference: float | None = None, reference_label: str = "") -> Any:
    """One bar per label, with an optional dashed reference line (a roofline, one GPU's speed)."""
    import matplotlib.pyplot as plt  # optional (notebooks extra): only the charts need it

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels)), 3.2))
    bars = ax.bar(list(labels), list(values), color="#1f77b4")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
               title: str = "", log: bool = False) -> Any:
    """One line per series ``{label: (xs, ys)}``; ``log=True`` puts both axes on log scales."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), "o-", label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _range(values: Sequence[float], digits: int = 1, unit: str = "") -> str:
    """``"lo–hi unit"`` of some values (one value when they agree; signed with "to" when one is negative).

    >>> _range([2.0, 2.84], 1, " TB/s"), _range([-0.8, 3.4], 1, "%"), _range([1.0, 1.04])
    ('2.0–2.8 TB/s', '-0.8% to +3.4%', '1.0')
    """
    lo, hi = min(values), max(values)
    if f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        return f"{lo:.{digits}f}{unit}"
    if lo < 0:
        return f"{lo:+.{digits}f}{unit} to {hi:+.{digits}f}{unit}"
    return f"{lo:.{digits}f}–{hi:.{digits}f}{unit}"


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}%"


# ----------------------------------------------------------------------------------------------------------------
# Planner accuracy (planner_accuracy*.json, planner_validation.json): notebooks 01 and 03


def planner_accuracy_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows of predicted vs measured peak per case from a ``planner_accuracy`` result."""
    rows = []
    for c in result["cases"]:
        if "measured_peak" not in c:
            why = "; ".join(c.get("planner_problems", []))[:60]
            rows.append([c["precision"], str(c["batch_size"]), str(c["context_len"]),
                         f"{c['planned']['total'] / GiB:.2f}", "-", f"skipped: {why}"])
            continue
        rows.append([c["precision"], str(c["batch_size"]), str(c["context_len"]), f"{c['planned']['total'] / GiB:.2f}",
                     f"{c['measured_peak'] / GiB:.2f}", f"{100 * c['error']:+.1f}%"])
    return rows


def planner_accuracy_table(result: dict[str, Any]) -> Table:
    """Predicted vs measured peak per case (a ``planner_accuracy`` or ``planner_validation`` result)."""
    env = result["environment"]
    caption = (f"{env['device']}, {result['allocator']} allocator, torch {env['versions']['torch']}, "
               f"transformers {env['versions']['transformers']}, bitsandbytes {env['versions']['bitsandbytes']}; "
               f"worst |error| {100 * result['worst_abs_error']:.1f}%")
    return table(["precision", "batch", "context", "planned GiB", "measured GiB", "error"],
                 planner_accuracy_rows(result), caption=caption)


def plot_planner_accuracy(*results: dict[str, Any]) -> Any:
    """Scatter of planned vs measured peak (GiB) for one or more ``planner_accuracy`` results."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    top = 0.0
    for result, marker in zip(results, "os^"):
        cases = [c for c in result["cases"] if "measured_peak" in c]
        for precision in dict.fromkeys(c["precision"] for c in cases):
            xs = [c["measured_peak"] / GiB for c in cases if c["precision"] == precision]
            ys = [c["planned"]["total"] / GiB for c in cases if c["precision"] == precision]
            ax.scatter(xs, ys, marker=marker, label=f"{precision}, {result['allocator']} allocator")
            top = max(top, *xs, *ys)
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="planned = measured")
    ax.fill_between([0, top], [0, 0.95 * top], [0, 1.05 * top], color="grey", alpha=0.15, label="±5%")
    ax.set_xlabel("measured peak (GiB)")
    ax.set_ylabel("glmkit planner (GiB)")
    ax.set_title(f"GLM-4-9B-Chat on {results[0]['environment']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


PLANNER_LONG = {"expandable_segments": "planner_accuracy_long_expandable", "default": "planner_accuracy_long_default"}


def planner_long_rows() -> list[list[str]]:
    """Planned vs measured peak past 32K tokens (``planner_accuracy_long_*.json``), both allocators: the total and the
    allocator's slack (planned, and measured as peak reserved minus peak allocated)."""
    rows = []
    for allocator, name in PLANNER_LONG.items():
        result = load(name)
        for c in (result or {}).get("cases", []):
            if "measured_peak" in c:
                rows.append([allocator, c["precision"], str(c["batch_size"]), f"{c['context_len'] // 1024}K",
                             f"{c['planned']['total'] / GiB:.2f}", f"{c['measured_peak'] / GiB:.2f}", _pct(c["error"]),
                             f"{c['planned']['allocator'] / GiB:.2f}",
                             f"{(c['peak_reserved'] - c['peak_allocated']) / GiB:.2f}"])
    return rows


def planner_long_table() -> Table | Text:
    """The planner against ``generate()`` at 64K and 128K tokens, kept aside from every fit (notebook 03).

    >>> planner_long_table().headers[:4]
    ['allocator', 'precision', 'batch', 'context']
    """
    rows = planner_long_rows()
    if not rows:
        return not_measured("The planner past 32K tokens", "benchmarks/planner_accuracy.py --contexts 65536 131072")
    env = next(load(n) for n in PLANNER_LONG.values() if load(n) is not None)["environment"]
    caption = (f"{env['device']}, torch {env['versions']['torch']}, transformers {env['versions']['transformers']}; "
               "cases kept aside from every fit; measured slack = peak reserved − peak allocated")
    return table(["allocator", "precision", "batch", "context", "planned GiB", "measured GiB", "error",
                  "planned slack GiB", "measured slack GiB"], rows, caption=caption)


def planner_long_clause() -> str:
    """The sentence on the 64K/128K check, for ``planner_sentence`` ("" before it was measured)."""
    parts = []
    for allocator, name in PLANNER_LONG.items():
        result = load(name)
        cases = [c for c in (result or {}).get("cases", []) if "error" in c]
        if cases:
            errors = ", ".join(f"{c['context_len'] // 1024}K {_pct(c['error'])}" for c in cases)
            parts.append(f"{'`expandable_segments`' if allocator != 'default' else 'the default allocator'} {errors}")
    if not parts:
        return ""
    device = next(load(n) for n in PLANNER_LONG.values() if load(n) is not None)["environment"]["device"]
    return (f" Kept aside from both fits, batch 1 past 32K tokens on an {device} "
            f"(`planner_accuracy_long_*.json`): {'; '.join(parts)}.")


def planner_sentence() -> Text:
    """How close the planner came to measured peaks: the fitted cases, the held-out cases, the default allocator."""
    fit, held, default = load("planner_accuracy"), load("planner_validation"), load("planner_accuracy_default_allocator")
    if fit is None:
        return not_measured("The planner against measured peaks", "benchmarks/planner_accuracy.py")
    grid = sorted({c["context_len"] for c in fit["cases"]})
    text = (f"On an {fit['environment']['device']}, plain `generate()` in "
            f"{'/'.join(dict.fromkeys(c['precision'] for c in fit['cases']))}, {grid[0] // 1024}K–{grid[-1] // 1024}K "
            f"tokens, batch {' and '.join(str(b) for b in sorted({c['batch_size'] for c in fit['cases']}))}: with "
            f"`expandable_segments` (glmkit's setting) the planner's total is within "
            f"**{100 * fit['worst_abs_error']:.1f}%** of the measured peak in all {fit['cases_measured']} cases. Those are "
            f"the cases its activation and slack terms were fitted on")
    if held is None:
        text += "; a check on cases kept aside has not been measured yet (`benchmarks/planner_accuracy.py`)."
    else:
        contexts = "/".join(f"{c // 1024}K" for c in sorted({c["context_len"] for c in held["cases"]}))
        text += (f". On {held['cases_measured']} cases kept aside (batch "
                 f"{', '.join(str(b) for b in sorted({c['batch_size'] for c in held['cases']}))} at {contexts} tokens, "
                 f"`planner_validation.json`) the worst error is **{100 * held['worst_abs_error']:.1f}%**.")
    if default is not None:
        precisions = "/".join(dict.fromkeys(c["precision"] for c in default["cases"]))
        text += (f" With PyTorch's default allocator (its slack term fitted on {default['cases_measured']} cases, "
                 f"{precisions} on the same grid) the worst error is **{100 * default['worst_abs_error']:.1f}%**.")
    text += planner_long_clause()
    text += (" The planner assumes `expandable_segments`, which glmkit turns on in every process it starts (the "
             "notebooks' setup, `glmkit serve`, `load_model`); a `PYTORCH_CUDA_ALLOC_CONF` you set yourself wins, and "
             "every plan says which allocator it assumed (`glmkit plan --allocator expandable|default` to choose).")
    return Text(text)


# ----------------------------------------------------------------------------------------------------------------
# The single-card OOM (oom_12gib.json): notebook 01


def _gib_in(message: str, pattern: str) -> float | None:
    m = re.search(pattern + r" ([0-9.]+) (GiB|MiB)", message)
    return None if m is None else float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1)


def oom_sentence() -> Text:
    """What the recorded 12 GiB OOM shows, and how a real 12 GB card differs from a capped big one."""
    r = load("oom_12gib")
    if r is None:
        return not_measured("The single-card OOM", "benchmarks/oom_demo.py")
    asked = _gib_in(r["message"], "Tried to allocate")
    total = _gib_in(r["message"], "total capacity of")
    in_use = _gib_in(r["message"], "this process has")
    return Text(
        f"On the {r['environment']['device']} (CUDA reports {total:.2f} GiB) capped at {r['budget_bytes'] / GiB:.2f} "
        f"GiB, loading failed at once asking for **{asked:.2f} GiB**, the planner's weight figure, with "
        f"{in_use:.2f} GiB already in use outside PyTorch (the CUDA context). That single request is transformers' "
        f"allocator warm-up: before loading, it reserves the model's size in one block, capped at the card's "
        f"*total* memory − 1.2 GiB, and it does not see a per-process cap. On a real card whose total is 12 GiB the cap is "
        f"12 − 1.2 = 10.8 GiB, so the warm-up succeeds and the OOM comes partway through copying the weights instead, after "
        f"about that much has loaded. Either way the cause is the same: 17.51 GiB of weights on a 12 GiB card.")


# ----------------------------------------------------------------------------------------------------------------
# Decode speed (decode.json, decode_variants.json, monitor_check.json, gemv_*.json, profile_step.json): notebook 05


def plain_generate_speeds() -> list[tuple[str, float]]:
    """Every committed batch-1 bf16 plain ``generate()`` speed: (file, tok/s)."""
    speeds = []
    for name in ("decode", "planner_accuracy", "planner_validation", "planner_accuracy_default_allocator",
                 "quantization_9b", "monitor_check"):
        r = load(name)
        if r is None:
            continue
        if name == "decode":
            speeds += [(name, x["decode_tok_s"]) for x in r["batch1"] if x["path"] == "generate"]
        elif name == "quantization_9b":
            speeds += [(name, x["tok_s"]["1"]) for x in r["precisions"] if x["precision"] == "bf16"]
        elif name == "monitor_check":
            speeds += [(name, x) for x in r["decode_tok_s"]["none"]]
        else:
            speeds += [(name, x["tok_s"]) for x in r["decode_speed"] if x["precision"] == "bf16" and x["batch_size"] == 1]
    return speeds


def _row(result: dict[str, Any], path: str, gemv: Any = None) -> dict[str, Any]:
    return next(r for r in result["batch1"] if r["path"] == path
                and (gemv is None or (r.get("fast_options") or {}).get("gemv", "triton") == gemv))


def decode_sentence() -> Text:
    """The fast path against the roofline, plain ``generate()`` and transformers' static cache (``decode.json``)."""
    d = load("decode")
    if d is None:
        return not_measured("Decode speed", "benchmarks/decode.py")
    fast, cublas = _row(d, "fast", "triton"), _row(d, "fast", False)
    plain, static = _row(d, "generate"), _row(d, "static")
    speeds = plain_generate_speeds()
    monitor = [s for n, s in speeds if n == "monitor_check"]
    others = sorted(s for n, s in speeds if n != "monitor_check")
    text = (f"`benchmarks/decode.py` measured the copy bandwidth ({d['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s) and "
            f"the paths in one run on an {d['environment']['device']}: the fast path reached "
            f"**{fast['decode_tok_s']:.1f} tok/s, {100 * fast['fraction_of_roofline']:.1f}% of the "
            f"{d['roofline_tok_s']:.1f} tok/s roofline and {d['fast_over_generate']:.1f}x plain `generate()`** "
            f"({plain['decode_tok_s']:.1f} tok/s) in that run, against {static['decode_tok_s']:.1f} tok/s for "
            f"transformers' static cache with its own compilation. The same decoder with cuBLAS for every projection "
            f"(`FastDecoder(gemv=False)`) gave {cublas['decode_tok_s']:.1f} tok/s "
            f"({100 * cublas['fraction_of_roofline']:.1f}%): the difference is glmkit's Triton matrix-vector kernels "
            f"(`glmkit.gemv`). "
            f"Plain `generate()` at batch 1 is bound by the host CPU and varies between runs and machines: "
            f"{_range(monitor)} tok/s over {len(monitor)} runs in one process (`monitor_check.json`), and "
            f"{', '.join(f'{s:.1f}' for s in others)} tok/s in the other result files.")
    variants = load("decode_variants")
    if variants is not None:
        gains, best = [], 0.0
        for run in variants["runs"]:
            base = [statistics.median(v["decode_tok_s"]) for v in run["variants"] if v["variant"] == "cublas"][0]
            for v in run["variants"]:
                best = max(best, statistics.median(v["decode_tok_s"]))
                if v["variant"] != "cublas":
                    gains.append((v["variant"], statistics.median(v["decode_tok_s"]) / base - 1))

        def span(key: str) -> str:
            return _range([100 * g for v, g in gains if key in v], 1, "%")

        text += (f" Compiler options did not close that gap in earlier runs (`decode_variants.json`, none faster than "
                 f"{best:.1f} tok/s): inductor's max-autotune moved the cuBLAS path by {span('cublas, max-autotune')}, "
                 f"projections as inductor reductions by {span('reduction, ')}, and attention written as plain "
                 f"multiply-and-sum by {span('reduction attention')}.")
    sweep = [r for r in d["batch_sweep"] if "decode_tok_s" in r]
    sweep_tok = ", ".join(f"{r['decode_tok_s']:.0f}" for r in sweep)
    sweep_batch = ", ".join(str(r["batch_size"]) for r in sweep)
    text += (f"\n\nThe batch sweep shows why batching is the cheapest speed-up: the weights are read once per step for "
             f"the whole batch, so the total grows almost linearly: "
             f"{sweep_tok} tok/s at batch {sweep_batch} (summed over the batch). The knee comes where the step "
             f"turns compute-bound. Beyond batch 1 the fast path uses cuBLAS, which is built for that.")
    return Text(text)


def plot_decode(result: dict[str, Any]) -> Any:
    """Batch-1 decode tok/s per path against the roofline, and the fast path's batch sweep (``decode.json``)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = result["batch1"]
    labels = [_path_label(r) for r in rows]
    colors = {"fast": "#2ca02c", "generate": "#1f77b4", "static": "#ff7f0e"}  # a labelled fast variant: light green
    a.bar(labels, [r["decode_tok_s"] for r in rows],
          color=[colors.get(r["path"], "#7f7f7f") if label == r["path"] else "#98df8a" for label, r in zip(labels, rows)])
    a.tick_params(axis="x", labelsize=8)
    a.axhline(result["roofline_tok_s"], color="k", ls="--", lw=1, label=f"roofline {result['roofline_tok_s']:.0f} tok/s")
    a.set_ylabel("decode tok/s, batch 1")
    a.legend(fontsize=8)
    a.set_title(f"GLM-4-9B bf16 on {result['environment']['device']}", fontsize=9)
    sweep = [r for r in result["batch_sweep"] if "decode_tok_s" in r]
    b.plot([r["batch_size"] for r in sweep], [r["decode_tok_s"] for r in sweep], "o-", label="fast path")
    b.plot([r["batch_size"] for r in sweep], [r["batch_size"] * result["roofline_tok_s"] for r in sweep], "k--", lw=1,
           label="batch x roofline (weights read once per step)")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("batch size")
    b.set_ylabel("tok/s summed over the batch")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _path_label(row: dict[str, Any]) -> str:
    options = row.get("fast_options") or {}
    if options.get("gemv") is False:
        return f"{row['path']}\n(cuBLAS)"
    mode = options.get("compile_options", {}).get("mode")
    if mode:
        return f"{row['path']}\n({mode.split('-no-')[0]})"
    if options.get("fuse_norms") is False:
        return f"{row['path']}\n(norms apart)"
    return f"{row['path']}\n({options['attention']}\nattention)" if "attention" in options else row["path"]


def gemv_sentence() -> Text:
    """What the Triton matrix-vector kernels reach against cuBLAS (``gemv_tune.json``, ``gemv_accuracy.json``)."""

    def render(g: dict[str, Any]) -> str:
        rows = g["projections"]
        acc: dict[Any, dict[str, Any]] = {}  # per gemv option its first row: the decoder's default (norms folded in)
        for v in (load("gemv_accuracy") or {"variants": []})["variants"]:
            acc.setdefault(v["gemv"], v)
        text = (f"cuBLAS' kernels for these shapes read the weights at {_range([r['cublas_tb_s'] for r in rows])} TB/s on an "
                f"{g['environment']['device']}. `benchmarks/gemv_tune.py` tried {_range([len(r['tried']) for r in rows], 0)} "
                f"launch shapes per projection (checked against a float64 reference), timed back to back over 1 GiB of "
                f"weights as a decode step runs them. The best reach {_range([r['best']['tb_s'] for r in rows])} TB/s, "
                f"{_range([r['speedup_vs_cublas'] for r in rows], 2)}x cuBLAS, against a copy bandwidth of "
                f"{g['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s (a copy must also write; the `lm_head` kernel only reads).")
        if "triton" in acc and False in acc:
            t, c = acc["triton"], acc[False]
            text += (f" In bf16 they are as accurate as cuBLAS (`gemv_accuracy.json`): median logit error against the fp32 "
                     f"model {100 * t['rel_diff_to_fp32_median']:.2f}% vs {100 * c['rel_diff_to_fp32_median']:.2f}%, same "
                     f"argmax on {t['argmax_equal_to_fp32']} vs {c['argmax_equal_to_fp32']} of {t['steps']} steps (random "
                     f"weights make bf16's error that large for both).")
        return text
    return from_result("gemv_tune", render, what="The Triton GEMV kernels", script="benchmarks/gemv_tune.py")


def plot_gemv(result: dict[str, Any]) -> Any:
    """Memory bandwidth each projection's matrix-vector product reaches at batch 1, cuBLAS vs glmkit's Triton
    kernels, against the copy bandwidth of the same run (``gemv_tune.json``)."""
    import matplotlib.pyplot as plt

    rows = result["projections"]
    fig, ax = plt.subplots(figsize=(8, 3.0))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["cublas_tb_s"] for r in rows], width=0.4, label="cuBLAS (F.linear)", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], [r["best"]["tb_s"] for r in rows], width=0.4, label="glmkit.gemv (Triton)",
           color="#2ca02c")
    ax.axhline(result["copy_bandwidth_bytes_s"] / 1e12, color="k", ls="--", lw=1, label="copy bandwidth (roofline)")
    ax.set_xticks(list(x), [f"{r['projection']}\n{r['rows']}x{r['columns']}" for r in rows], fontsize=8)
    ax.set_ylabel("weights read, TB/s")
    ax.set_title(f"one token's projections of GLM-4-9B, bf16, on {result['environment']['device']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


KINDS = ("matmul (weights)", "attention", "norms, RoPE, SiLU, copies")


def kernel_category(name: str) -> str:
    """Coarse kind of a CUDA kernel from its name: matmul, attention, or elementwise/other.

    >>> kernel_category("triton_red_fused__to_copy_mul_sum_unsqueeze_0"), kernel_category("triton_red_fused_mean_rsqrt_1")
    ('matmul (weights)', 'norms, RoPE, SiLU, copies')
    """
    n = name.lower()
    if any(k in n for k in ("nvjet", "gemm", "gemv", "cublas", "cutlass", "splitk", "triton_mm")):
        return "matmul (weights)"
    if n.startswith("triton_red") and "_sum_" in n:  # FastDecoder(gemv=True): a projection as a reduction
        return "matmul (weights)"
    if any(k in n for k in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    return "norms, RoPE, SiLU, copies"


def step_breakdown(path: dict[str, Any]) -> dict[str, float]:
    """GPU milliseconds per decode step by kernel kind for one path of ``profile_step.json``."""
    ms = dict.fromkeys(KINDS, 0.0)
    for name, k in path["top_kernels"].items():
        ms[kernel_category(name)] += k["us_per_step"] / 1000
    ms[KINDS[2]] += max(path["gpu_kernel_ms"] - sum(ms.values()), 0.0)  # kernels outside the top 20
    return ms


def profile_sentence() -> Text:
    """Where one decode step's time goes, per path (``profile_step.json``)."""

    def render(p: dict[str, Any]) -> str:
        paths = p["paths"]
        eager, cublas = paths["fast, eager layer"], paths["fast, compiled layer"]
        triton, graph = paths["fast, compiled layer, Triton GEMV"], paths["fast, compiled layer, Triton GEMV, CUDA graph"]
        plain = paths["plain forward (dynamic cache)"]
        mm = {k: step_breakdown(v)["matmul (weights)"] for k, v in paths.items()}
        att = step_breakdown(graph)["attention"] / graph["gpu_kernel_ms"]
        ratios = [v["wall_ms"] / v["gpu_kernel_ms"] for k, v in paths.items() if "graph" not in k]
        return (
            f"`torch.profiler` over one decode step on an {p['environment']['device']} (`benchmarks/profile_step.py`). "
            f"With cuBLAS the weight matmuls take {mm['fast, compiled layer']:.1f} ms of the step's "
            f"{cublas['gpu_kernel_ms']:.1f} ms of GPU time in {cublas['kernels_per_step']:.0f} kernels; compiling the layer "
            f"had already cut {eager['kernels_per_step']:.0f} kernels to {cublas['kernels_per_step']:.0f} (the residual add "
            f"is fused with the next layer's norm, the attention mask built once per step). With glmkit's Triton GEMVs "
            f"the matmuls take {mm['fast, compiled layer, Triton GEMV']:.1f} ms and the step "
            f"{triton['gpu_kernel_ms']:.1f} ms in {triton['kernels_per_step']:.0f} kernels: no split-K reduce kernels, no "
            f"separate SiLU. Attention is {100 * att:.1f}% of the step at this short context. Without a CUDA graph the "
            f"*wall* time per step is {_range(ratios, 0)}x the GPU time (plain `forward`: {plain['wall_ms']:.0f} ms for "
            f"{plain['gpu_kernel_ms']:.1f} ms of kernels): launching kernels from Python is the real cost of plain "
            f"`generate()`, and the graph removes it ({graph['wall_ms']:.1f} ms wall).")
    return from_result("profile_step", render, what="The decode-step profile", script="benchmarks/profile_step.py")


FUSED_PATHS = (("sdpa attention", "norms fused, rope + SDPA apart"),
               ("norms apart", "norms apart (residual adds fused), glmkit's decode attention"),
               ("", "all fused, compiled layer, plain launches"))
PDL_PATH = "fast, uncompiled layer, Triton GEMV, CUDA graph, PDL (the default)"  # benchmarks/profile_step.py's


def _fused_path(profile: dict[str, Any], suffix: str) -> dict[str, Any] | None:
    base = "fast, compiled layer, Triton GEMV, CUDA graph"
    return profile["paths"].get(f"{base}, {suffix}" if suffix else base)


def fusion_table() -> Table | Text:
    """One bf16 decode step before and after the fused kernels, from one profiling run
    (``profile_step_h200_fused.json``): kernels a step, GEMV and other kernel time, gaps between kernels, wall time;
    and the step before any fusion from an earlier run on the same card (``profile_step_h200.json``)."""
    def render(p: dict[str, Any]) -> Table:
        rows = []
        before = load("profile_step_h200")
        if before is not None and _fused_path(before, "") is not None:
            b = _fused_path(before, "")
            gemv = sum(k["us_per_step"] for n, k in b["top_kernels"].items() if kernel_category(n) == KINDS[0]) / 1000
            rows.append([f"before fusion ({measured_on(before)})", f"{b['kernels_per_step']:.0f}", f"{gemv:.2f}",
                         f"{b['gpu_kernel_ms'] - gemv:.2f}", f"{b['wall_ms'] - b['gpu_kernel_ms']:.2f}",
                         f"{b['wall_ms']:.2f}"])
        for suffix, label in FUSED_PATHS:
            x = _fused_path(p, suffix)
            if x is not None and "gemv_kernel_ms" in x:
                rows.append([label, f"{x['kernels_per_step']:.0f}", f"{x['gemv_kernel_ms']:.2f}",
                             f"{x['non_gemv_kernel_ms']:.2f}", f"{x['launch_gaps_ms']:.2f}", f"{x['wall_ms']:.2f}"])
        pdl = p["paths"].get(PDL_PATH)
        if pdl is not None:  # kernels overlap under PDL: their own times add up past the wall time, not comparable
            rows.append(["all fused, uncompiled, PDL (the default)", f"{pdl['kernels_per_step']:.0f}", "overlapping",
                         "overlapping", "hidden", f"{pdl['wall_ms']:.2f}"])
        return Table(["one bf16 step, batch 1", "kernels", "GEMV ms", "other kernels ms", "gaps ms", "wall ms"], rows,
                     caption=f"`torch.profiler` over one CUDA-graph decode step of GLM-4-9B (random weights), "
                             f"{measured_on(p)} (`profile_step_h200_fused.json`)")
    return from_result("profile_step_h200_fused", render, what="The fused decode step",
                       script="benchmarks/profile_step.py --fast-only --name profile_step_h200_fused")


def pdl_table() -> Table | Text:
    """Batch-1 decode speed with the layer compiled, uncompiled, and uncompiled with programmatic dependent launch,
    one run (``pdl_decode.json``), and the GEMV chain of a token alone with and without it (``pdl_probe.json``)."""
    def render(d: dict[str, Any]) -> Table:
        labels = {"compiled": "compiled layer (plain launches)", "uncompiled": "uncompiled layer, plain launches",
                  "uncompiled+pdl": "uncompiled layer, PDL", "default": "the default"}
        base = next((r for r in d["rows"] if r["variant"] == "compiled" and "decode_tok_s" in r), None)
        rows = [[labels.get(r["variant"], r["variant"]), f"{r['decode_tok_s']:.1f}",
                 f"{100 * r['fraction_of_roofline']:.1f}%",
                 f"{r['decode_tok_s'] / base['decode_tok_s']:.3f}x" if base else "-"]
                for r in d["rows"] if "decode_tok_s" in r]
        return Table(["GLM-4-9B step, bf16, batch 1", "tok/s", "of the roofline", "vs compiled"], rows,
                     caption=f"One run, {measured_on(d)} (`pdl_decode.json`); roofline "
                             f"{d['roofline_tok_s']:.1f} tok/s (copy bandwidth / bytes a token reads)")
    return from_result("pdl_decode", render, what="Programmatic dependent launch",
                       script="benchmarks/pdl_decode.py --checkpoint /tmp/glm9b")


def pdl_sentence() -> str:
    """Programmatic dependent launch in one sentence (``pdl_decode.json`` and ``pdl_probe.json``), for the README."""
    d = load("pdl_decode")
    if d is None:
        return str(not_measured("Programmatic dependent launch", "benchmarks/pdl_decode.py"))
    rows = {r["variant"]: r for r in d["rows"] if "decode_tok_s" in r}
    compiled, plain, pdl = rows["compiled"], rows["uncompiled"], rows["uncompiled+pdl"]
    return (f"With Hopper's programmatic dependent launch (each kernel launched while the one before finishes; "
            f"`FastDecoder(pdl=)`, on by default where the GPU has it; a 4-bit model's only where glmkit's batch-1 "
            f"CUDA kernel runs), in one run on an "
            f"{measured_on(d)} "
            f"(`pdl_decode.json`): the same fused step decodes {compiled['decode_tok_s']:.1f} tok/s with its layer "
            f"compiled, {plain['decode_tok_s']:.1f} uncompiled and {pdl['decode_tok_s']:.1f} uncompiled with PDL "
            f"({pdl['decode_tok_s'] / compiled['decode_tok_s']:.3f}x compiled, "
            f"{100 * pdl['fraction_of_roofline']:.1f}% of the roofline). " + str(pdl_probe_sentence()))


def pdl_probe_sentence() -> Text:
    """The GEMV chain of one token (40 layers' four projections and lm_head, no attention) in a CUDA graph, with
    and without programmatic dependent launch, one run (``pdl_probe.json``)."""
    def render(d: dict[str, Any]) -> str:
        best = {}
        for r in d["rows"]:  # each variant timed twice: its faster run
            best[r["pdl"]] = min(best.get(r["pdl"], r["ms"]), r["ms"])
        plain, pdl = best[0], best.get(1)
        return (f"The projections of one token alone (40 layers' four GEMVs and lm_head, one CUDA graph, "
                f"{measured_on(d)}, `pdl_probe.json`): {plain:.3f} ms with plain launches, {pdl:.3f} ms with PDL "
                f"({plain / pdl:.3f}x), against a roofline of {d['roofline_ms']:.3f} ms: "
                f"{100 * d['roofline_ms'] / plain:.1f}% and {100 * d['roofline_ms'] / pdl:.1f}% of it.")
    return from_result("pdl_probe", render, what="The GEMV chain with and without PDL",
                       script="benchmarks/pdl_probe.py")


def attention_tile_sentence() -> Text:
    """Decode speed per tile shape of the attention kernel where one program walks a KV head's whole cache, one run
    (``attention_tiles.json``)."""
    def render(d: dict[str, Any]) -> str:
        best: dict[tuple[int, int], float] = {}
        ran = [r for r in d["rows"] if "decode_tok_s" in r]
        for r in ran:  # a shape timed twice (the first again last): its faster run
            best[(r["block_n"], r["num_warps"])] = max(best.get((r["block_n"], r["num_warps"]), 0), r["decode_tok_s"])
        first = (ran[0]["block_n"], ran[0]["num_warps"])
        shapes = ", ".join(f"{n} positions x {w} warps {v:.1f} tok/s ({v / best[first]:.3f}x)"
                           for (n, w), v in best.items())
        return (f"The attention kernel's tile where one program walks a KV head's whole cache (a short cache; "
                f"`glmkit.attention.SHORT_TILE`), GLM-4-9B bf16 at batch 1, one run on an {measured_on(d)} "
                f"(`attention_tiles.json`): {shapes}.")
    return from_result("attention_tiles", render, what="The attention kernel's tile shape",
                       script="benchmarks/attention_tiles.py")


_ROLE_LABELS = {"qkv": "q/k/v projection (norm folded in)", "attention": "attention (rope, cache write)",
                "o_proj": "o_proj (+ residual)", "gate_up": "gate_up + SwiGLU (norm folded in)",
                "down": "down_proj (+ residual)", "lm_head": "lm_head (final norm folded in)",
                "other": "embedding, positions, logits copy"}


def step_roles_table() -> Table | Text:
    """Where a batch-1 bf16 step's time goes, role by role (``step_roles.json``): the time each role adds to the
    step, and for the projections that time against their weight bytes at the copy bandwidth of the same run."""
    def render(d: dict[str, Any]) -> Table:
        run = d["runs"]["bf16, fast path"]
        rows = []
        for r in run["roles"]:
            bound = f"{r['roofline_us']:.0f}" if "roofline_us" in r else "-"
            share = f"{100 * r['fraction_of_copy_bandwidth']:.1f}%" if r.get("fraction_of_copy_bandwidth") else "-"
            rows.append([_ROLE_LABELS.get(r["role"], r["role"]), f"{r['calls_per_step']:.0f}", f"{r['adds_us']:.0f}",
                         bound, share])
        return Table(["GLM-4-9B bf16 step, batch 1", "kernels", "µs it adds", "µs at copy bandwidth",
                      "of copy bandwidth"], rows,
                     caption=f"One run, {measured_on(d)} (`step_roles.json`), a {d['position']}-token cache: the step's "
                             f"CUDA graph takes {run['replay_us']:.0f} µs against {run['roofline_us']:.0f} µs for its "
                             f"weights at the copy bandwidth ({100 * run['roofline_us'] / run['replay_us']:.1f}%)")
    return from_result("step_roles", render, what="Where a step's time goes",
                       script="benchmarks/step_roles.py --checkpoint /tmp/glm9b")


def per_cache(us: dict[str, float], at: list[str]) -> str:
    """A variant's µs a step at each cache length ``at``, in order.

    >>> per_cache({"40": 4647.2, "160": 4721.9}, ["40", "160"])
    '4647 / 4722'
    """
    return " / ".join(f"{us[p]:.0f}" for p in at)


def attention_cost_sentence() -> Text:
    """What attention costs a batch-1 bf16 step: the step with glmkit's attention kernel, with a kernel that only
    copies q, and with none (``step_roles.json``); and the kernel change that took some of it back
    (``attention_apart.json``)."""
    def render(d: dict[str, Any]) -> str:
        runs = d["runs"]
        fast, minimal, none = (runs[f"bf16, {k}"]["replay_us"] for k in ("fast path", "minimal kernel", "no kernel"))
        layers = next(r["calls_per_step"] for r in runs["bf16, fast path"]["roles"] if r["role"] == "attention")
        roofline = runs["bf16, fast path"]["roofline_us"]
        text = (f"At batch 1 attention reads almost nothing (GLM-4-9B: 1 KiB a cached token), yet in one run on an "
                f"{measured_on(d)} (`step_roles.json`, a {d['position']}-token cache) a bf16 step took {fast:.0f} µs "
                f"with glmkit's attention kernel, {minimal:.0f} µs with a kernel in its place that only waits for "
                f"q/k/v and copies q ({(fast - minimal) / layers:.1f} µs a layer more: "
                f"{100 * roofline / fast:.1f}% against {100 * roofline / minimal:.1f}% of the roofline), and "
                f"{none:.0f} µs with no kernel there ({(minimal - none) / layers:.1f} µs a layer for the kernel "
                f"boundary itself). Attention costs its chain of dependent steps on two SMs (one program per KV "
                f"head: loads, tensor-core products, softmax sums across warps), not bytes.")
        apart = load("attention_apart")
        if apart:
            first = apart["runs"][0]["dtypes"]["bf16"]["rows"]
            old = next(r for r in first if not r["apart"])
            new = next(r for r in first if r["apart"] and r["tile"] == [128, 8] and r["stages"] == "default")
            text += (f" Attending to the new position's k and v apart from the cache tiles (the tiles then go to the "
                     f"tensor cores as read) took a step from {old['best_replay_us']:.0f} to "
                     f"{new['best_replay_us']:.0f} µs in one run (`attention_apart.json`: "
                     f"{new['best_tok_s']:.1f} against {old['best_tok_s']:.1f} tok/s, "
                     f"{100 * new['fraction_of_roofline']:.1f}% of the roofline measured in that run).")
        one = load("attention_one_tile")
        if one:
            rows = _replay_by_variant(one)
            tiles, floor = rows["tiles of 128 x 8 warps"], rows["a minimal kernel"]
            whole = rows["one tile of 512 x 16 warps"]
            at = sorted(tiles, key=int)
            text += (f" Its time grows with the tiles it walks, one after another, of 128 positions (another run, "
                     f"`attention_one_tile.json`: a step {per_cache(tiles, at)} µs at a {' / '.join(at)}-token cache, "
                     f"against {per_cache(floor, at)} with the minimal kernel), and one tile over the whole cache was "
                     f"slower still ({per_cache(whole, at)} µs: the masked positions are multiplied too).")
        pieces = load("attention_pieces")
        if pieces:
            rows = {r["pieces"]: r["best_replay_us"] for r in pieces["rows"]
                    if r["tile"] == [128, 8] and r["variant"] != "a minimal kernel"}
            at = sorted(rows[1], key=int)
            text += (f" Nor did the sums across warps pay for themselves: giving each warp its own softmax over a "
                     f"piece of the tile, combined once at the end, took a step from {rows[1][at[1]]:.0f} to "
                     f"{rows[8][at[1]]:.0f} µs at a {at[1]}-token cache (`attention_pieces.json`).")
        stages = load("attention_stages")
        if stages:
            rows = {r["variant"]: r for r in stages["rows"]}
            piped, now = rows["pipelined (Triton's default)"], rows["1 stage, the next tile read ahead"]
            at = sorted(now["best_replay_us"], key=int)
            text += (f" What did pay: a plainer loop over the tiles (not software-pipelined by Triton, fewer "
                     f"instructions; the next tile read into registers ahead), a step "
                     f"{per_cache(now['best_replay_us'], at)} µs at a {' / '.join(at)}-token cache against "
                     f"{per_cache(piped['best_replay_us'], at)} pipelined "
                     f"(`attention_stages.json`: {now['best_tok_s']:.1f} against {piped['best_tok_s']:.1f} tok/s, "
                     f"{100 * now['fraction_of_roofline']:.1f}% of the roofline measured in that run).")
        tickets = load("attention_tickets")
        if tickets:
            rows = {r["variant"]: r for r in tickets["rows"]}
            walk = rows["one program per KV head, tile after tile"]
            side = rows["tiles side by side, the last to finish combines"]
            at = sorted(side["best_replay_us"], key=int)
            first = side["best_replay_us"][at[0]] - walk["best_replay_us"][at[0]]
            text += (f" And so did splitting a short cache into its tiles side by side, one program each, the last "
                     f"of a KV head to finish combining them in the same kernel: a step "
                     f"{per_cache(side['best_replay_us'], at)} µs at a {' / '.join(at)}-token cache against "
                     f"{per_cache(walk['best_replay_us'], at)} with one program walking the tiles "
                     f"(`attention_tickets.json`, another run: {side['best_tok_s']:.1f} against "
                     f"{walk['best_tok_s']:.1f} tok/s, {100 * side['fraction_of_roofline']:.1f}% of the roofline "
                     f"measured in that run; "
                     f"{'the same' if abs(first) < 1 else f'{first:+.0f} µs'} where the cache is one tile).")
        return text
    return from_result("step_roles", render, what="What attention costs a step",
                       script="benchmarks/step_roles.py --checkpoint /tmp/glm9b")


def fast_path_today_sentence() -> Text:
    """The batch-1 fast path as it decodes now, against the roofline of the same run, in bf16 and fp16
    (``attention_tickets*.json``), the same change on a slower H200 (``attention_tickets_run2.json``) and the
    kernels a step (``step_roles.json``)."""
    def render(d: dict[str, Any]) -> str:
        def now(result: dict[str, Any]) -> dict[str, Any]:
            return next(r for r in result["rows"] if r["variant"].startswith("tiles side by side")
                        or r["variant"].startswith("tiles of 128 side by side"))

        text = (f"In one run on an {measured_on(d)} (`attention_tickets.json`) a bf16 step at batch 1 decodes "
                f"{now(d)['best_tok_s']:.1f} tok/s, {100 * now(d)['fraction_of_roofline']:.1f}% of the roofline "
                f"measured in the same run ({d['roofline_tok_s']:.1f} tok/s)")
        fp16 = load("attention_tickets_fp16")
        if fp16:
            text += (f"; fp16 {now(fp16)['best_tok_s']:.1f} tok/s, {100 * now(fp16)['fraction_of_roofline']:.1f}% "
                     f"(`attention_tickets_fp16.json`)")
        other = load("attention_tickets_run2")
        if other:
            floor = {r["variant"]: r for r in other["rows"]}["a minimal kernel"]
            mine = {r["variant"]: r for r in d["rows"]}["a minimal kernel"]
            text += (f". H200s differ: on another the same attention reached "
                     f"{100 * now(other)['fraction_of_roofline']:.1f}% (`attention_tickets_run2.json`, before the "
                     f"rotary tables and the logits were read and written by the kernels themselves), and with a "
                     f"minimal attention kernel (and those three kernels more) its step took "
                     f"{floor['best_replay_us']['160']:.0f} µs against "
                     f"{mine['best_replay_us']['160']:.0f} here at a copy bandwidth of "
                     f"{other['copy_bandwidth_bytes_s'] / 1e12:.2f} against {d['copy_bandwidth_bytes_s'] / 1e12:.2f} "
                     f"TB/s" + (": a card's copy bandwidth need not rank how fast it reads (*Why H200s differ*, below)"
                                if card_bandwidth_runs() else ": the fixed costs of a step, not the bytes"))
        roles = load("step_roles")
        if roles:
            text += f". A step is {roles['runs']['bf16, fast path']['kernels_per_step']} kernels (`step_roles.json`)"
        runs = bf16_nf4_runs()
        if runs:
            text += (f". In the {len(runs)} runs that timed bf16 and nf4 together since the next token is picked inside "
                     f"the step (*bf16 and nf4 in the same run, run after run*, below), bf16 decoded "
                     f"{_span([r['bf16_tok_s'] for r in runs])} tok/s, {_span([r['bf16_share'] * 100 for r in runs])}% "
                     f"of the roofline measured in each")
        return text + "."
    return from_result("attention_tickets", render, what="The fast path today",
                       script="benchmarks/attention_tickets.py --checkpoint /tmp/glm9b")


# benchmarks/gemv16_step.py's runs, each on the card in hand
GEMV16_RUNS = ("gemv16_step", "gemv16_step_run2", "gemv16_step_run3", "gemv16_step_run4")
# the runs of a CUDA decode attention beside the Triton one (not kept), each on the card in hand
ATTENTION_ONE_RUNS = ("attention_one_step", "attention_one_step_run2", "attention_one_step_run3")
GEMV16_AT = ("40", "100", "160", "220", "262")  # the cache lengths each run replays the step at


def _committed(names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """The committed results of ``names`` that exist, in order, by name."""
    return [(name, r) for name in names if (r := load(name)) is not None]


def _replay_by_variant(result: dict[str, Any]) -> dict[str, float]:
    """A variant run's best replayed step (µs) per variant."""
    return {row["variant"]: row["best_replay_us"] for row in result["rows"]}


def _replays(names: Sequence[str]) -> list[dict[str, float]]:
    """``_replay_by_variant`` of each committed run of ``names``."""
    return [_replay_by_variant(r) for _, r in _committed(names)]


def gemv16_runs() -> list[tuple[str, dict[str, Any]]]:
    """The committed runs of ``benchmarks/gemv16_step.py``, by name."""
    return _committed(GEMV16_RUNS)


def _card(result: dict[str, Any]) -> str:
    """A short name for the card a result ran on (the start of its UUID), or its device's name."""
    uuids = result.get("gpu_uuids") or []
    return uuids[0][:12] if len(uuids) == 1 else result["environment"]["device"]


def gemv16_table() -> Table | Text:
    """GLM-4-9B's bf16 batch-1 step with q/k/v and o_proj through glmkit's 16-bit CUDA kernel against the Triton
    GEMVs, per run (``gemv16_step*.json``): the step replayed at each cache length (µs), decode tok/s and its share of
    the copy roofline of the same run."""
    runs = gemv16_runs()
    if not runs:
        return not_measured("bf16 q/k/v and o_proj through the 16-bit CUDA kernel", "benchmarks/gemv16_step.py")
    rows = [_step_row(name, r, row, "CUDA q/k/v, o_proj" if row["cuda_kernel"] else "Triton GEMVs")
            for name, r in runs for row in r["rows"]]
    return Table(["run", "card", "q/k/v and o_proj", *STEP_COLUMNS], rows,
                 caption=f"GLM-4-9B bf16 at batch 1, {_cards_of(runs)}, {_run_dates([r for _, r in runs])}: "
                         f"{STEP_CAPTION}")


# the columns a step run's table gives each variant after its labels (_step_row), and what they hold
STEP_COLUMNS = (*(f"µs at {p}" for p in GEMV16_AT), "decode tok/s", "of copy roofline")
STEP_CAPTION = ("the step's CUDA graph replayed back to back around each cache length, and decode tok/s (32 + 256 "
                "tokens, best of 3 rounds, the variants taking turns)")


def _step_row(name: str, result: dict[str, Any], row: dict[str, Any], *labels: str) -> list[str]:
    """A variant's row of a step run's table (``gemv16_table``, ``mlp16_table``): the file, the card, ``labels``,
    then ``STEP_COLUMNS``."""
    return [f"`{name}.json`", _card(result), *labels, *(f"{row['replay_at_us'][p]:.0f}" for p in GEMV16_AT),
            f"{row['best_tok_s']:.1f}", f"{100 * row['fraction_of_roofline']:.1f}%"]


def _cards_of(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """``_cards`` of named runs that record their cards as ``gpu_uuids``."""
    return _cards([{"gpu_uuid": _card(r), "environment": r["environment"]} for _, r in runs])


def gemv16_sentence() -> Text:
    """What glmkit's 16-bit CUDA kernel does for the bf16 step (``gemv16_step*.json``, ``gemv16_variants.json``,
    ``gemv_accuracy_h200.json``)."""
    runs = gemv16_runs()
    if not runs:
        return not_measured("bf16 q/k/v and o_proj through the 16-bit CUDA kernel", "benchmarks/gemv16_step.py")

    def pair(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return next(x for x in r["rows"] if not x["cuda_kernel"]), next(x for x in r["rows"] if x["cuda_kernel"])

    replay = [t["best_replay_us"] / c["best_replay_us"] for t, c in map(pair, (r for _, r in runs))]
    rate = [c["best_tok_s"] / t["best_tok_s"] for t, c in map(pair, (r for _, r in runs))]
    first, second = pair(runs[0][1])
    shares = [100 * pair(r)[1]["fraction_of_roofline"] for _, r in runs]
    text = (f"At batch 1 the bf16 step runs q/k/v and o_proj through a CUDA kernel of glmkit's (`glmkit.gemv16_one`) "
            f"where q/k/v can leave an SM to each of the decode attention's few programs (a cache of up to 512 "
            f"positions): its reads wait in shared memory, not registers, so the attention's programs find room, start "
            f"while q/k/v runs and read their first tile of the cache meanwhile. In {_cards_of(runs)} "
            f"({_run_dates([r for _, r in runs])}, `gemv16_step*.json`) the step's CUDA graph took "
            f"{_span([100 * (1 - 1 / x) for x in replay])}% less time with it around 160 cached tokens "
            f"({second['best_replay_us']:.0f} against {first['best_replay_us']:.0f} µs in the first run); by cache "
            f"length ({' / '.join(GEMV16_AT)} tokens) {per_cache(second['replay_at_us'], list(GEMV16_AT))} against "
            f"{per_cache(first['replay_at_us'], list(GEMV16_AT))} µs: the same up to one tile of the Triton path's "
            f"attention (128 positions), less beyond. Decode tok/s changed by "
            f"{100 * (min(rate) - 1):+.2f} to {100 * (max(rate) - 1):+.2f}% "
            f"(the token loop's rate moves about 1% from round to round), to {_span(shares)}% "
            f"of the copy roofline measured in each run. The greedy tokens differ from the Triton step's on these random "
            f"weights (its first step's logits {100 * second['first_logits_rel_diff']:.1f}% apart: the norm's product "
            f"is rounded to bf16 before the tensor cores multiply it)")
    accuracy = {v["variant"]: v for v in (load("gemv_accuracy_h200") or {"variants": []})["variants"]}
    cuda = next((v for v in accuracy.values() if v.get("cuda_16bit_kernel")), None)
    triton = accuracy.get("bf16, Triton GEMV")
    if cuda and triton:
        text += (f"; against an fp32 decoder both are as far as bf16 is (`gemv_accuracy_h200.json`, median logit error "
                 f"{100 * cuda['rel_diff_to_fp32_median']:.2f}% with it, {100 * triton['rel_diff_to_fp32_median']:.2f}% "
                 f"without, cuBLAS {100 * next(iter(accuracy.values()))['rel_diff_to_fp32_median']:.2f}%)")
    alone = {(a["projection"], a["kernel"]): a for a in runs[0][1]["alone"]}
    if ("qkv", "cuda") in alone:
        text += (f". Alone, launched back to back with programmatic dependent launch, q/k/v takes "
                 f"{alone['qkv', 'cuda']['us_pdl']:.1f} µs against {alone['qkv', 'triton']['us_pdl']:.1f} through the "
                 f"Triton GEMV, and o_proj (which lets the next kernel launch only as it ends) "
                 f"{alone['o_proj', 'cuda']['us_pdl']:.1f} against {alone['o_proj', 'triton']['us_pdl']:.1f}: what the "
                 f"step gains is the attention's early start, not faster projections")
    variants = load("gemv16_variants")
    if variants:
        def slower(run: int, variant: str, against: str) -> str:
            rows = {x["variant"]: x["best_replay_us"] for x in variants["runs"][run - 1]["rows"]}
            return f"{100 * (rows[variant] / rows[against] - 1):.1f}%"

        first_thing = slower(4, "qkv 4x4 + o_proj 2x8 first", "qkv 4x4 + o_proj 2x8 late")
        carve_out = slower(3, "bf16, max smem", "bf16")
        not_left = slower(1, "qkv cuda, no SMs left", "bf16")
        tiles_128 = slower(5, "qkv 4x4 + o_proj 2x8 late, tiles 128", "qkv 4x4 + o_proj 2x8 late, tiles 256")
        text += (f". Tried and not kept (`gemv16_variants.json`, {len(variants['runs'])} runs, steps around 160 cached "
                 f"tokens): o_proj letting gate/up launch first thing, whose small programs then ran on SMs set out "
                 f"for this kernel's shared memory with little L1 left ({first_thing} slower than letting it launch as "
                 f"each CTA ends); every Triton kernel asking for that carve-out too ({carve_out} slower); q/k/v "
                 f"through this kernel without leaving SMs ({not_left} slower than the Triton GEMV); the attention in "
                 f"tiles of 128, leaving it more SMs ({tiles_128} slower); other groups of warps and ring depths")
    text += _gemv16_not_kept()
    return Text(text + ". Where the attention's programs are many (a longer cache, or more rows), both stay on the "
                "Triton GEMVs, as in fp16 (not measured with it).")


def _gemv16_not_kept() -> str:
    """The clause of ``gemv16_sentence`` on what was tried beside it later and not kept (``gemv16_gate_up.json``,
    ``attention_one_step*.json``), or nothing where those results are absent."""
    text = ""
    gate_up = load("gemv16_gate_up")
    if gate_up:
        rows = _replay_by_variant(gate_up)
        tried = [us for v, us in rows.items() if v.startswith("cuda")]
        alone = {a["kernel"]: a["us_pdl"] for a in gate_up["alone"]}
        text += (f". Nor gate/up through it, up * silu(gate) folded in (8 gate rows and their 8 up rows a tile; "
                 f"`gemv16_gate_up.json`): alone {alone[next(k for k in alone if k.startswith('cuda'))]:.1f} µs "
                 f"against {alone['triton']:.1f}, in the step {_span(tried, 0)} µs against "
                 f"{rows['triton gate_up']:.0f}")
    pairs = _replays(ATTENTION_ONE_RUNS)
    if pairs:
        cuda, triton = (" / ".join(f"{p[v]:.0f}" for p in pairs) for v in ("CUDA attention", "Triton attention"))
        text += (f"; nor the decode attention through a CUDA kernel of its own (the cache tile copied before the wait, "
                 f"q straight into the tensor cores' operand; `attention_one_step*.json`): as accurate, but on "
                 f"{len(pairs)} H200s the step took {cuda} µs against {triton}: there the attention's time was "
                 f"already hidden")
    return text


# benchmarks/mlp16_step.py's runs, each on the card in hand; the ring sizes tried (both on one card)
MLP16_RUNS = ("mlp16_step", "mlp16_step_run2", "mlp16_step_run3", "mlp16_step_run4", "mlp16_step_run5")
MLP16_RING_RUNS = ("mlp16_ring", "mlp16_ring2")
MLP16_KERNEL, MLP16_TRITON = "one-kernel MLP (default)", "Triton gate/up and down"


def mlp16_runs() -> list[tuple[str, dict[str, Any]]]:
    """The committed runs of ``benchmarks/mlp16_step.py``, by name."""
    return _committed(MLP16_RUNS)


def _mlp16_pair(result: dict[str, Any], precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's Triton and one-kernel rows of ``precision``."""
    rows = {x["variant"]: x for x in result["rows"] if x["precision"] == precision}
    return rows[MLP16_TRITON], rows[MLP16_KERNEL]


def mlp16_table() -> Table | Text:
    """GLM-4-9B's batch-1 step with its MLP as one CUDA kernel against the two Triton GEMVs, per run and precision
    (``mlp16_step*.json``): the step replayed at each cache length (µs), decode tok/s and its share of the copy
    roofline of the same run."""
    runs = mlp16_runs()
    if not runs:
        return not_measured("The MLP as one CUDA kernel", "benchmarks/mlp16_step.py")
    rows = [_step_row(name, r, row, row["precision"], "one kernel" if row["mlp_kernel"] else "Triton gate/up, down")
            for name, r in runs for row in r["rows"]]
    return Table(["run", "card", "dtype", "MLP", *STEP_COLUMNS], rows,
                 caption=f"GLM-4-9B at batch 1, {_cards_of(runs)}, {_run_dates([r for _, r in runs])}: {STEP_CAPTION}")


def mlp16_chart() -> Any:
    """bf16's and fp16's share of the copy roofline per run, the Triton MLP beside the one-kernel MLP, the issue's
    90% dashed; ``None`` before any run exists."""
    runs = mlp16_runs()
    if not runs:
        return None
    groups = {f"{_card(r)}\n{p} ({name.removeprefix('mlp16_step').lstrip('_') or 'run1'})":
              {"Triton gate/up and down": 100 * t["fraction_of_roofline"], "one kernel": 100 * k["fraction_of_roofline"]}
              for name, r in runs for p in ("bf16", "fp16") for t, k in [_mlp16_pair(r, p)]}
    fig = _grouped_bars(groups, ylabel="% of the copy roofline (axis from 80%)",
                        references={g: 100 * BF16_MARK for g in groups}, reference_label=f"{BF16_MARK:.0%}",
                        title=f"GLM-4-9B at batch 1, {_cards_of(runs)}, decode tok/s over the roofline of each run")
    fig.axes[0].set_ylim(80, 100)
    return fig


def mlp16_sentence() -> Text:
    """What the one-kernel MLP (``glmkit.mlp16_one``) does for the batch-1 step (``mlp16_step*.json``), the ring it
    ships (``mlp16_ring*.json``) and the form not kept (``mlp16_transposed.json``)."""
    runs = mlp16_runs()
    if not runs:
        return not_measured("The MLP as one CUDA kernel", "benchmarks/mlp16_step.py")
    text = ("On Hopper the bf16 and fp16 batch-1 steps run each layer's MLP (RMSNorm, gate/up, SwiGLU, down and the "
            "residual add) as one CUDA kernel of glmkit's (`glmkit.mlp16_one`) instead of two Triton GEMVs: one CTA an "
            "SM streams its share of the gate/up rows, then of the down rows, through a ring of shared memory (TMA bulk "
            "copies), with a grid barrier for h between the two, so that the memory bus does not idle while one "
            f"kernel drains and the next starts. In {_cards_of(runs)} ({_run_dates([r for _, r in runs])}, "
            "`mlp16_step*.json`)")
    for p in ("bf16", "fp16"):
        pairs = [_mlp16_pair(r, p) for _, r in runs]
        less = [100 * (1 - k["best_replay_us"] / t["best_replay_us"]) for t, k in pairs]
        rate = [k["best_tok_s"] / t["best_tok_s"] for t, k in pairs]
        text += (f"{';' if p == 'fp16' else ''} the {p} step took {_span(less)}% less time around 160 cached tokens "
                 f"({pairs[0][1]['best_replay_us']:.0f} against {pairs[0][0]['best_replay_us']:.0f} µs in the first "
                 f"run) and decoded {_span(rate, 3)}x the tok/s: {_span([100 * k['fraction_of_roofline'] for _, k in pairs])}% "
                 f"of the copy roofline measured in each run, against "
                 f"{_span([100 * t['fraction_of_roofline'] for t, _ in pairs])}% with the two GEMVs")
    alone = {(a["dtype"], a["kernel"]): a for a in runs[0][1]["alone"]}
    kernel, triton = alone["bfloat16", MLP16_KERNEL], alone["bfloat16", MLP16_TRITON]
    first = {p: _mlp16_pair(runs[0][1], p) for p in ("bf16", "fp16")}
    text += (f". Alone (weights past L2, back to back with programmatic dependent launch) GLM-4-9B's bf16 MLP took "
             f"{kernel['us_pdl']:.1f} µs ({kernel['tb_s_pdl']:.2f} TB/s) against {triton['us_pdl']:.1f} "
             f"({triton['tb_s_pdl']:.2f} TB/s) for the two GEMVs in the first run. Every sum runs in a fixed order: "
             f"launched twice it gives the same bits (`benchmarks/gpu_smoke_mlp16.py`); its error against fp32 is of "
             f"the GEMVs' size ({100 * kernel['rel_err_to_fp32']:.4f}% against {100 * triton['rel_err_to_fp32']:.4f}% "
             f"of what the MLP adds, alone). In each run fp16's greedy tokens equal the Triton step's in "
             f"{_range([_mlp16_pair(r, 'fp16')[1]['tokens_as_triton'] for _, r in runs], 0)} of "
             f"{first['fp16'][1]['of']}, bf16's in {_range([_mlp16_pair(r, 'bf16')[1]['tokens_as_triton'] for _, r in runs], 0)} "
             f"of {first['bf16'][1]['of']} on these random weights (its first step's logits "
             f"{100 * first['bf16'][1]['first_logits_rel_diff']:.1f}% apart: h is summed in another order and rounds "
             f"differently to bf16)")
    by = _replays(MLP16_RING_RUNS)
    if by:
        shipped = f"ring {RING_SHIPPED} ahead {RING_SHIPPED}"
        others = sorted({v for b in by for v in b if v not in ("triton", shipped)})
        def times(variant: str) -> str:
            return " / ".join(f"{b[variant]:.0f}" for b in by if variant in b)

        def label(variant: str) -> str:  # "ring R ahead A": R slots, at most A stages of gate/up rows in flight
            ring, ahead = variant.removeprefix("ring ").split(" ahead ")
            return f"{ring} slots" + ("" if ring == ahead else f" with at most {ahead} stages of gate/up ahead")

        text += (f". A ring of {RING_SHIPPED} slots of 16 KiB was the fastest tried (`mlp16_ring*.json`, one card: "
                 f"{times(shipped)} µs, the Triton GEMVs {times('triton')}; "
                 + ", ".join(f"{label(v)} {times(v)}" for v in others) + ")")
    transposed = load("mlp16_transposed")
    if transposed:
        step = {x["variant"]: x["best_replay_us"] for x in transposed["step"]}
        text += (f". Not kept: a form that read a transposed copy of down's weight, each CTA summing its units into a "
                 f"partial of every output (`mlp16_transposed.json`): {step['fused ring 4']:.0f} against "
                 f"{step['default']:.0f} µs on one card, but the copy takes 4.5 GB more for GLM-4-9B in bf16")
    return Text(text + ". Elsewhere (before Hopper, other sizes, a compiled layer) the two Triton GEMVs run; "
                "`GLMKIT_MLP_KERNEL=triton` turns it off.")


RING_SHIPPED = 12  # glmkit.mlp16_one.RING, as the ring runs name it (results.py reads files, not kernels)


def card_bandwidth_runs() -> list[tuple[str, dict[str, Any]]]:
    """The committed runs of ``benchmarks/card_bandwidth.py`` (``card_bandwidth_<card>.json``), by file name.

    >>> all(name.startswith("card_bandwidth_") and "gpu_uuid" in run for name, run in card_bandwidth_runs())
    True
    """
    names = sorted(path.stem for path in RESULTS_DIR.glob("card_bandwidth_*.json"))
    return [(name, load(name)) for name in names]


def card_bandwidth_table() -> Table | Text:
    """Each card's copy and read bandwidth and the bf16 fast path against the roofline of each
    (``card_bandwidth_*.json``); or "not measured"."""
    named = card_bandwidth_runs()
    if not named:
        return not_measured("Copy and read bandwidth, card by card", "benchmarks/card_bandwidth.py")
    rows = [[f"`{name}.json`", f"{r['copy_bandwidth_bytes_s'] / 1e12:.3f}", f"{r['read_bandwidth_bytes_s'] / 1e12:.3f}",
             f"{r['read_over_copy']:.3f}", f"{r['best_tok_s']:.1f}", f"{r['fraction_of_copy_roofline'] * 100:.1f}%",
             f"{r['fraction_of_read_roofline'] * 100:.1f}%"] for name, r in named]
    runs = [r for _, r in named]
    return table(["run", "copy TB/s", "read TB/s", "read / copy", "bf16 tok/s", "of the copy roofline",
                  "of the read roofline"], rows,
                 caption=f"{_cards(runs)}, {_run_dates(runs)} (`benchmarks/card_bandwidth.py`): GLM-4-9B bf16 fast path "
                         f"at batch 1, {runs[0]['rounds']} rounds each, the best")


def _cards(runs: list[dict[str, Any]]) -> str:
    """``"3 runs on 3 NVIDIA H200s"``: the runs and the distinct cards (by UUID) they ran on."""
    cards = len({r["gpu_uuid"] for r in runs})
    devices = sorted({r["environment"]["device"] for r in runs})
    return f"{len(runs)} run{'s' * (len(runs) > 1)} on {cards} {' / '.join(devices)}{'s' * (cards > 1)}"


def _dates(dates: Iterable[str]) -> str:
    """``"2026-12-01"``, or ``"<first> to <last>"``: the dates some runs were measured on."""
    days = sorted(set(dates))
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _run_dates(runs: list[dict[str, Any]]) -> str:
    """``_dates`` of committed results (their environment records)."""
    return _dates(r["environment"]["date"] for r in runs)


def _span(values: Sequence[float], digits: int = 1) -> str:
    """``"213.9–219.5"``: the smallest and the largest of ``values``.

    >>> _span([2.0, 1.25, 1.5], 2)
    '1.25–2.00'
    """
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


# A run of bf16's and nf4's default decoders, read from its result: copy bandwidth (bytes/s), bf16's decode tok/s and
# share of its copy roofline, nf4's decode tok/s
PairedRun = tuple[float, float, float, float]


def _from_rows(is_bf16: Callable[[dict[str, Any]], bool],
               is_nf4: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], PairedRun]:
    """A ``PairedRun`` reader for a result whose ``rows`` hold both decoders' best rates (``is_bf16``/``is_nf4`` pick
    the default decoders' rows out of its variants)."""
    def read(result: dict[str, Any]) -> PairedRun:
        bf16 = next(r for r in result["rows"] if is_bf16(r))
        nf4 = next(r for r in result["rows"] if is_nf4(r))
        return (result["copy_bandwidth_bytes_s"], bf16["best_tok_s"], bf16["fraction_of_roofline"], nf4["best_tok_s"])
    return read


def _nf4_split_run(result: dict[str, Any]) -> PairedRun:
    """``nf4_split.json``'s ``in_step`` run (its kernel as it is, and bf16), against its copy bandwidth and the bytes a
    bf16 token reads (from its first run's roofline: the same model)."""
    first, step = result["in_step_first_run"], result["in_step"]
    bf16_bytes = first["copy_bandwidth_bytes_s"] / first["roofline_tok_s"]["bf16"]
    bf16, nf4 = (max(step["rows"][v]["decode_tok_s"]) for v in ("bf16", "old kernel"))
    return step["copy_bandwidth_bytes_s"], bf16, bf16 * bf16_bytes / step["copy_bandwidth_bytes_s"], nf4


def _variant(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["variant"] == name


# benchmarks/nf4_one_step.py's runs against bf16's default decoder as it is now, its MLP one CUDA kernel (glmkit.mlp16_one)
NF4_AGAINST_BF16_NOW = ("nf4_one_step_run6", "nf4_one_step_run7", "nf4_one_step_run8")
NF4_ONE_RUN = NF4_AGAINST_BF16_NOW[0]  # the run *4-bit, one sequence on the tensor cores* tells in full
MLP_ONE, MLP_TWO = "one kernel", "two GEMVs"  # how a run's bf16 decoder ran its MLP


# Every run of the batch-1 fast path's default decoders that timed bf16 and nf4 together since the next token is
# picked inside the step and the rates count the steps actually run, in order, and how each result's default rows are
# read: first those of the batch-1 4-bit CUDA kernel before, which read x from shared memory at every stage, then those
# of the kernel as it is now, which holds x in registers for rows of 4096 columns
_RUNS_X_SHARED: list[tuple[str, Callable[[dict[str, Any]], PairedRun]]] = [
    *[(name, _from_rows(_variant("bf16"), _variant("CUDA kernel"))) for name in ("nf4_one_step_run1", "nf4_one_step_run3")],
    ("greedy_tail", _from_rows(lambda r: r["precision"] == "bf16" and r["loop"] == "greedy in the step",
                               lambda r: r["precision"] == "nf4" and r["loop"] == "greedy in the step")),
    ("l2_prefetch", _from_rows(lambda r: r["precision"] == "bf16" and not r["prefetches"],
                               lambda r: r["precision"] == "nf4" and not r["prefetches"])),
    ("nf4_split", _nf4_split_run),
    ("nf4_alu", _from_rows(_variant("bf16"), _variant("nf4, 0 word(s) on the integer units"))),
    *[(name, _from_rows(_variant("bf16"), _variant("nf4")))
      for name in ("bf16_leave", "nf4_o_proj_depth", "nf4_x_lanes", "nf4_paired_stages", "nf4_control")],
]
_RUNS_X_IN_REGISTERS: list[tuple[str, Callable[[dict[str, Any]], PairedRun]]] = [
    ("nf4_x_regs", _from_rows(_variant("bf16"), _variant("nf4, x in registers"))),
    *[(name, _from_rows(_variant("bf16"), _variant("CUDA kernel")))
      for name in ("nf4_one_step", "nf4_one_step_run4", "nf4_one_step_run5")],
    ("gemv_early_block", _from_rows(_variant("bf16"), _variant("nf4"))),
    *[(name, _from_rows(_variant("bf16"), _variant("CUDA kernel"))) for name in NF4_AGAINST_BF16_NOW],
]
BF16_NF4_RUNS = [*_RUNS_X_SHARED, *_RUNS_X_IN_REGISTERS]
X_IN_REGISTERS = tuple(name for name, _ in _RUNS_X_IN_REGISTERS)
KERNEL_NOW, KERNEL_BEFORE = "x in registers", "x from shared memory"
# runs whose rates subtract a one-token stream timed once (before ``stream_rate`` timed it twice and kept the faster):
# a slow first timing makes such a rate read high
ONE_TIMED_STREAM = ("nf4_one_step_run1", "nf4_one_step_run3", "greedy_tail", "l2_prefetch", "nf4_split")
BF16_MARK, RATIO_MARK = 0.90, 2.0  # bf16 at 90% of its copy roofline; nf4 at twice bf16's speed, in the same run


def bf16_nf4_runs(specs: Sequence[tuple[str, Callable[[dict[str, Any]], PairedRun]]] = BF16_NF4_RUNS,
                  results_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Per committed run of ``specs`` (result name, reader): its date, copy bandwidth, bf16's decode tok/s and share
    of its copy roofline, nf4's tok/s, nf4 / bf16, and nf4 against bf16's copy roofline (tok/s)."""
    runs = []
    for name, read in specs:
        result = load(name, results_dir)
        if result is not None:
            runs.append(_paired(name, result, read))
    return runs


def _paired(name: str, result: dict[str, Any], read: Callable[[dict[str, Any]], PairedRun]) -> dict[str, Any]:
    """One run of ``bf16_nf4_runs``: ``read(result)`` as a dict, with nf4 / bf16 and nf4 against bf16's roofline."""
    bw, bf16, share, nf4 = read(result)
    return {"name": name, "date": result["environment"]["date"], "copy_bandwidth_bytes_s": bw, "bf16_tok_s": bf16,
            "bf16_share": share, "nf4_tok_s": nf4, "ratio": nf4 / bf16, "nf4_over_bf16_roofline": nf4 * share / bf16,
            "kernel": KERNEL_NOW if name in X_IN_REGISTERS else KERNEL_BEFORE,
            "bf16_mlp": MLP_ONE if _bf16_mlp_one(result) else MLP_TWO, "gpu_uuids": result.get("gpu_uuids", [])}


def _bf16_mlp_one(result: dict[str, Any]) -> bool:
    """Whether a run's bf16 default decoder ran its MLP as one CUDA kernel (its row records ``mlp_kernel``)."""
    rows = result.get("rows")
    return isinstance(rows, list) and any(r.get("precision") == "bf16" and r.get("mlp_kernel") for r in rows)


def _counted_before(runs: list[dict[str, Any]]) -> list[str]:
    """The runs (file names) whose rates were counted with the one-token stream timed once."""
    return [f"`{r['name']}.json`" for r in runs if r["name"] in ONE_TIMED_STREAM]


def _listed(runs: list[dict[str, Any]]) -> str:
    """The runs' files: ``"`a.json`, `b.json`"``."""
    return ", ".join(f"`{r['name']}.json`" for r in runs)


def _cards_named(runs: list[dict[str, Any]]) -> str:
    """``"2 cards"``: the distinct cards the runs name (``gpu_uuids``), or ``"cards not named"``."""
    cards = {u for r in runs for u in r.get("gpu_uuids", [])}
    return f"{len(cards)} card{'s' * (len(cards) != 1)}" if cards else "cards not named"


def _both(run: dict[str, Any]) -> bool:
    return run["bf16_share"] >= BF16_MARK and run["ratio"] >= RATIO_MARK


def bf16_nf4_table(runs: list[dict[str, Any]] | None = None) -> Table | Text:
    """bf16's share of its copy roofline and nf4's speed against bf16's, the batch-1 fast path in every run of the
    default decoders that timed both (``bf16_nf4_runs``), notebook 04; or "not measured"."""
    runs = bf16_nf4_runs() if runs is None else runs
    if not runs:
        return not_measured("bf16 and nf4 in the same run", "benchmarks/greedy_tail.py --checkpoint /tmp/glm9b")
    rows = [[f"`{r['name']}.json`", r["kernel"], r["bf16_mlp"], f"{r['copy_bandwidth_bytes_s'] / 1e12:.3f}",
             f"{r['bf16_tok_s']:.1f}", f"{r['bf16_share'] * 100:.1f}%", f"{r['nf4_tok_s']:.1f}",
             f"{r['nf4_over_bf16_roofline']:.3f}", f"{r['ratio']:.3f}x", "yes" if _both(r) else "no"] for r in runs]
    before, when = _counted_before(runs), _dates(r["date"] for r in runs)
    return table(["run", "4-bit kernel", "bf16's MLP", "copy TB/s", "bf16 tok/s", "of its copy roofline", "nf4 tok/s",
                  "nf4 / bf16's copy roofline", "nf4 / bf16", "bf16 ≥ 90% and nf4 ≥ 2x"], rows,
                 caption=f"GLM-4-9B at batch 1, the default decoders of {len(runs)} runs on H200s, {when} "
                         f"(`nf4_x_regs.json`: its variant with x in registers, which became the default after that "
                         f"run; each "
                         f"file's copy bandwidth and both rates from one run; 32-token prompt, 256 new tokens, best "
                         f"round; the 4-bit kernel as it is now holds x in registers, the one before read it from "
                         f"shared memory at every stage; bf16's MLP ran as two Triton GEMVs, or, in the latest "
                         f"runs, as one CUDA kernel, bf16's default now" + (f"; {', '.join(before)} counted their rates with the "
                                                            f"one-token stream they subtract timed once, which can "
                                                            f"read high" if before else "") + ")")


def bf16_nf4_sentence(runs: list[dict[str, Any]] | None = None) -> Text:
    """What ``bf16_nf4_table`` shows, in words: which rate moves from run to run, which holds, and where bf16 at 90%
    of its roofline and nf4 at twice bf16 can hold together (each conclusion written only where the figures hold
    it); or "not measured"."""
    runs = bf16_nf4_runs() if runs is None else runs
    if not runs:
        return not_measured("bf16 and nf4 in the same run", "benchmarks/greedy_tail.py --checkpoint /tmp/glm9b")

    def span(key: str, among: list[dict[str, Any]], scale: float = 1.0, digits: int = 1) -> str:
        return _span([r[key] * scale for r in among], digits)

    def both(among: list[dict[str, Any]]) -> str:
        return (f"bf16 reached {BF16_MARK:.0%} of its roofline and nf4 {RATIO_MARK:.0f}x bf16's speed in the same run "
                f"in {sum(map(_both, among))} of {len(among)}")

    now = [r for r in runs if r["kernel"] == KERNEL_NOW]
    earlier = [r for r in runs if r["kernel"] != KERNEL_NOW]
    latest = [r for r in now if r.get("bf16_mlp") == MLP_ONE]  # both decoders as they are now
    text = (f"In {len(runs)} runs of the default decoders on H200s, bf16 decoded {span('bf16_tok_s', runs)} tok/s "
            f"({span('bf16_share', runs, 100)}% of the copy roofline measured in each run).")
    if earlier:
        timed_once = _counted_before(earlier)
        text += (f" {len(earlier)} of them ran the 4-bit kernel before, which read x from shared memory at every "
                 f"stage: nf4 {span('nf4_tok_s', earlier)} tok/s, {span('ratio', earlier, 1, 3)}x bf16; "
                 f"{both(earlier)}" + (f" ({len(timed_once)} of the {len(earlier)} counted their rates with the "
                                       f"one-token stream they subtract timed once, which can read high)"
                                       if timed_once else "") + ".")
    if now:
        files = _listed(now)
        text += (f" With the kernel as it is now, which holds x in registers ({files}), nf4 decoded "
                 f"{span('nf4_tok_s', now)} tok/s, {span('ratio', now, 1, 3)}x bf16; {both(now)}.")
        if latest:
            text += (f" Against bf16 as it is now, its MLP one CUDA kernel ({_listed(latest)}, {_cards_named(latest)}): "
                     f"bf16 {span('bf16_tok_s', latest)} tok/s ({span('bf16_share', latest, 100)}% of its roofline), "
                     f"nf4 {span('nf4_tok_s', latest)}, {span('ratio', latest, 1, 3)}x bf16; {both(latest)}.")
    group = latest or now or earlier  # the runs of one code: what moves there moves from run to run
    those = ("the runs against bf16 as it is now" if latest else "the runs of the kernel as it is now" if now
             else "those timed as rates are timed now")
    steady = [r for r in group if r["name"] not in ONE_TIMED_STREAM]
    nf4, bf16 = ([r[k] for r in steady] for k in ("nf4_tok_s", "bf16_tok_s"))
    if len(steady) >= 2 and max(nf4) / min(nf4) < max(bf16) / min(bf16):
        text += (f" nf4 moves less from run to run ({(max(nf4) / min(nf4) - 1) * 100:.1f}% between the slowest and "
                 f"the fastest of {those}, bf16 {(max(bf16) / min(bf16) - 1) * 100:.1f}%): bf16 reads its weights at "
                 f"the speed of the card's memory, nf4 is held by the work on each packed byte.")
    caps = [r["nf4_over_bf16_roofline"] / RATIO_MARK for r in group]
    room = sum(cap >= BF16_MARK for cap in caps)
    which = those if group != runs else "these runs"
    text += (f" For nf4 to be {RATIO_MARK:.0f}x as fast, bf16 can be at most 1/{RATIO_MARK:.0f} as fast as nf4: "
             f"{min(caps) * 100:.1f}–{max(caps) * 100:.1f}% of bf16's copy roofline in {which}, ")
    if room == len(group):
        text += (f"above {BF16_MARK:.0%} in every run: both hold where bf16 lands between {BF16_MARK:.0%} and that "
                 f"run's cap.")
    elif room:
        text += (f"above {BF16_MARK:.0%} in {room} of them: only there can both hold, with bf16 between "
                 f"{BF16_MARK:.0%} and that run's cap.")
    else:
        text += f"under {BF16_MARK:.0%} in every run: in these runs both cannot hold."
    return Text(text)


# Every committed run that timed the default bf16 batch-1 decoder as it is now (the MLP as one CUDA kernel,
# glmkit.mlp16_one; q/k/v and o_proj through glmkit.gemv16_one), by result and the row that holds it:
# benchmarks/mlp16_step.py's runs, then the shipped ring's rows of the ring runs beside them, then the bf16 rows of
# benchmarks/nf4_one_step.py's runs against it
BF16_NOW_RUNS: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    *[(name, lambda r: r["precision"] == "bf16" and r["mlp_kernel"]) for name in MLP16_RUNS],
    *[(name, _variant(f"ring {RING_SHIPPED} ahead {RING_SHIPPED}")) for name in MLP16_RING_RUNS],
    *[(name, lambda r: r["variant"] == "bf16" and r["mlp_kernel"]) for name in NF4_AGAINST_BF16_NOW],
]
# ... and the default before it (its MLP two Triton GEMVs): gemv16_step.py's runs, then the default rows of the variant
# runs beside them
BF16_BEFORE_RUNS: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    *[(name, lambda r: r["cuda_kernel"]) for name in GEMV16_RUNS],
    ("gemv16_gate_up", _variant("triton gate_up")), ("step_by_position", _variant("default")),
    ("bf16_sweep", _variant("default")),
    *[(name, _variant("Triton attention")) for name in ATTENTION_ONE_RUNS],
]


def bf16_now_runs(results_dir: str | Path | None = None,
                  listed: list[tuple[str, Callable[[dict[str, Any]], bool]]] | None = None) -> list[dict[str, Any]]:
    """Per committed run of ``BF16_NOW_RUNS`` (or ``listed``: ``BF16_BEFORE_RUNS``): its name, card, environment,
    copy bandwidth, and the default decoder's step around 160 cached tokens (µs, the best replay), decode tok/s and
    share of the copy roofline."""
    runs = []
    for name, pick in BF16_NOW_RUNS if listed is None else listed:
        result = load(name, results_dir)
        if result is not None:
            row = next(r for r in result["rows"] if pick(r))
            runs.append({"name": name, "gpu_uuid": _card(result), "environment": result["environment"],
                         "copy_bandwidth_bytes_s": result["copy_bandwidth_bytes_s"], "step_us": row["best_replay_us"],
                         "tok_s": row["best_tok_s"], "share": row["fraction_of_roofline"]})
    return runs


def bf16_now_table(runs: list[dict[str, Any]] | None = None) -> Table | Text:
    """The default bf16 batch-1 decoder as it is now, run by run and card by card (``bf16_now_runs``); or "not
    measured"."""
    runs = bf16_now_runs() if runs is None else runs
    if not runs:
        return not_measured("The bf16 step as it is now, card by card", "benchmarks/mlp16_step.py")
    rows = [[f"`{r['name']}.json`", r["gpu_uuid"], f"{r['copy_bandwidth_bytes_s'] / 1e12:.3f}", f"{r['step_us']:.0f}",
             f"{r['tok_s']:.1f}", f"{100 * r['share']:.1f}%", "yes" if r["share"] >= BF16_MARK else "no"]
            for r in runs]
    return table(["run", "card", "copy TB/s", "step µs at 160", "decode tok/s", "of copy roofline",
                  f"≥ {BF16_MARK:.0%}"], rows,
                 caption=f"GLM-4-9B bf16 at batch 1, the default decoder, {_cards(runs)}, {_run_dates(runs)}: the "
                         f"step's CUDA graph replayed around 160 cached tokens and decode tok/s (32 + 256 tokens), "
                         f"best of 3 rounds taken in turns with the run's other variants")


def bf16_now_sentence(runs: list[dict[str, Any]] | None = None, before: list[dict[str, Any]] | None = None) -> Text:
    """What ``bf16_now_table`` shows, in words: the spread of bf16's share of its roofline over cards, how many runs
    reach ``BF16_MARK``, and whether the copy bandwidth tells the cards apart; or "not measured"."""
    runs = bf16_now_runs() if runs is None else runs
    if not runs:
        return not_measured("The bf16 step as it is now, card by card", "benchmarks/mlp16_step.py")
    at, under = [r for r in runs if r["share"] >= BF16_MARK], [r for r in runs if r["share"] < BF16_MARK]
    text = (f"{_cards(runs)} ({_run_dates(runs)}; `mlp16_step*.json`, the shipped ring's rows of `mlp16_ring*.json` "
            f"and the bf16 rows of the 4-bit runs against it, `{NF4_AGAINST_BF16_NOW[0]}.json` to "
            f"`{NF4_AGAINST_BF16_NOW[-1]}.json`): "
            f"the default bf16 decoder decoded {_span([r['tok_s'] for r in runs])} tok/s, "
            f"{_span([100 * r['share'] for r in runs])}% of the copy roofline measured in each run, "
            f"{BF16_MARK:.0%} or more in {len(at)} of {len(runs)}.")
    if before is None:
        before = bf16_now_runs(listed=BF16_BEFORE_RUNS)
    if before:
        text += (f" Before its MLP ran as one kernel, {_cards(before)} ({_run_dates(before)}; `gemv16_step*.json` and "
                 f"the default rows of the variant runs beside them) read {_span([100 * r['share'] for r in before])}%, "
                 f"{BF16_MARK:.0%} or more in {sum(r['share'] >= BF16_MARK for r in before)} of {len(before)}.")
    if at and under:
        steps = [_span([r["step_us"] for r in among], 0) for among in (at, under)]
        copies = [[r["copy_bandwidth_bytes_s"] / 1e12 for r in among] for among in (at, under)]
        text += (f" The same step took {steps[0]} µs around 160 cached tokens in the runs at {BF16_MARK:.0%} or more "
                 f"and {steps[1]} µs in the others, at copy bandwidths of {_span(copies[0], 3)} against "
                 f"{_span(copies[1], 3)} TB/s")
        if max(copies[0]) < min(copies[1]):
            text += (": the cards that copied slower decoded faster. A card's copy bandwidth does not rank how fast "
                     "it reads its weights (*Why H200s differ*).")
        elif max(copies[1]) >= min(copies[0]):
            text += ": the copy bandwidth does not tell those cards apart (*Why H200s differ*)."
        else:
            text += "."
    return Text(text)


def card_bandwidth_sentence() -> Text:
    """Why cards of one model differ in bf16's share of its roofline: copy against read bandwidth, and the decoder
    against a roofline of each (``card_bandwidth_*.json``), in one paragraph; or "not measured"."""
    runs = [r for _, r in card_bandwidth_runs()]
    if not runs:
        return not_measured("Copy and read bandwidth, card by card", "benchmarks/card_bandwidth.py")

    def span(key: str, scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
        values = [r[key] * scale for r in runs]
        return _span(values, digits), max(values) - min(values)

    copy, _ = span("copy_bandwidth_bytes_s", 1e-12, 3)
    read, _ = span("read_bandwidth_bytes_s", 1e-12, 3)
    ratio, _ = span("read_over_copy", 1.0, 3)
    of_copy, copy_points = span("fraction_of_copy_roofline", 100)
    of_read, read_points = span("fraction_of_read_roofline", 100)
    fastest_copy = max(runs, key=lambda r: r["copy_bandwidth_bytes_s"])
    fastest_read = max(runs, key=lambda r: r["read_bandwidth_bytes_s"])
    weight = " / ".join(f"{w / 1e9:.2f}" for w in sorted({r["read_weight_bytes"] for r in runs}))
    text = (f"A decode step only reads its weights; the roofline's yardstick, the copy bandwidth, reads and writes. "
            f"{_cards(runs)} ({_run_dates(runs)}, `card_bandwidth_*.json`): copy {copy} TB/s, read (glmkit's GEMV over "
            f"a {weight} GB weight) {read} TB/s, read / copy {ratio}; the bf16 fast path decoded "
            f"{span('best_tok_s')[0]} tok/s, {of_copy}% of the copy roofline ({copy_points:.1f} points apart) and "
            f"{of_read}% of the read roofline ({read_points:.1f} points apart).")
    if fastest_copy is not fastest_read:
        text += (f" The card whose copy measured fastest ({fastest_copy['copy_bandwidth_bytes_s'] / 1e12:.3f} TB/s) "
                 f"did not read fastest: it read at {fastest_copy['read_bandwidth_bytes_s'] / 1e12:.3f} TB/s, "
                 f"against {fastest_read['read_bandwidth_bytes_s'] / 1e12:.3f}.")
    if read_points < copy_points / 2:
        text += (" A share of the copy roofline is the share of the read one times read / copy: with the read "
                 "one's this close, the cards' share of the copy roofline moves with their read / copy, not with the "
                 "decoder.")
    return Text(text)


def fusion_sentence() -> Text:
    """Decode speed with the fused kernels against the roofline, the same step with norms apart and with cuBLAS, in
    one run (``decode_h200_fused.json``)."""
    def render(d: dict[str, Any]) -> str:
        rows = {json.dumps(r.get("fast_options", {}), sort_keys=True): r for r in d["batch1"] if r["path"] == "fast"}
        fused, apart = rows.get("{}"), rows.get(json.dumps({"fuse_norms": False}))
        cublas = rows.get(json.dumps({"gemv": False}))
        text = (f"On an {measured_on(d)} (`decode_h200_fused.json`, one run, bf16, batch 1): the fused step decodes "
                f"{fused['decode_tok_s']:.1f} tok/s, {100 * fused['fraction_of_roofline']:.1f}% of the roofline "
                f"measured in the same run ({d['roofline_tok_s']:.1f} tok/s: copy bandwidth / bytes a token reads)")
        if apart:
            text += (f"; with the norms apart (`fuse_norms=False`) {apart['decode_tok_s']:.1f} tok/s "
                     f"({fused['decode_tok_s'] / apart['decode_tok_s']:.2f}x)")
        if cublas:
            text += f"; with cuBLAS instead of the Triton GEMVs {cublas['decode_tok_s']:.1f} tok/s"
        return text + (". Folding the norm into a GEMV costs each of its programs a reload of the input and the norm's "
                       "weight: the fused launches needed their own launch shapes (`glmkit tune` times them as the "
                       "step runs them), and the GEMVs still take most of the step.")
    return from_result("decode_h200_fused", render, what="The fused decode step",
                       script="benchmarks/decode.py --fast-only --name decode_h200_fused")


def plot_profile(result: dict[str, Any]) -> Any:
    """GPU kernel time of one decode step per path by kernel kind (``profile_step.json``)."""
    import matplotlib.pyplot as plt

    colors = ["#1f77b4", "#ff7f0e", "#bbbbbb"]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    labels = list(result["paths"])
    for i, label in enumerate(labels):
        p = result["paths"][label]
        ms = step_breakdown(p)
        left = 0.0
        for kind, color in zip(KINDS, colors):
            ax.barh(i, ms[kind], left=left, color=color, label=kind if i == 0 else None)
            left += ms[kind]
        graph = "with" if "graph" in label.lower() else "without"
        ax.text(left + 0.1, i, f"{p['kernels_per_step']:.0f} kernels; {p['wall_ms']:.1f} ms wall {graph} a CUDA graph",
                va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("GPU kernel time per decode step (ms)")
    ax.set_xlim(0, max(p["gpu_kernel_ms"] for p in result["paths"].values()) * 3.0)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)  # below: the bars' notes fill the right
    fig.tight_layout()
    return fig


def attention_share_sentence() -> Text:
    """Attention's measured share of GPU time in prefill and in a decode step by context (``attention_share.json``)."""
    def render(r: dict[str, Any]) -> str:
        def shares(key: str) -> str:
            return ", ".join(f"{x['prompt_len']:,}: {100 * x[key]['attention_share']:.1f}%" for x in r["rows"])
        kernels = sorted({k for x in r["rows"] for k in x["prefill"]["attention_kernels"]})
        return (f"Measured on {measured_on(r)} (`attention_share.json`, plain forward, `sdpa`): attention's share of "
                f"GPU time in a prefill, by prompt length, {shares('prefill')}; in one decode step at that context, "
                f"{shares('decode_step')}. Attention kernels seen: {', '.join(f'`{k}`' for k in kernels) or 'none'}.")
    return from_result("attention_share", render, what="Attention's share of GPU time by context",
                       script="benchmarks/attention_share.py")


# ----------------------------------------------------------------------------------------------------------------
# Long prompts (long_context.json): notebook 05


def planned_long_context_bytes(row: dict[str, Any]) -> int:
    """The planner's total for one ``long_context.json`` run (GLM-4-9B, its setup, prompt + 4 new tokens), on the
    same terms as the measurement: no CUDA context (the cap covers PyTorch's allocator only), expandable segments.

    >>> row = {"setup": "nf4@12GiB", "mode": "chunked", "prompt_len": 98304, "chunk": 512}
    >>> round(planned_long_context_bytes(row) / 2**30, 2)
    10.93
    """
    precision, budget = row["setup"].split("@")
    dtype, quantization = PRECISIONS[precision]
    plan = plan_memory(glm4_9b_meta_model(), [budget], dtype=dtype, quantization=quantization,
                       context_len=row["prompt_len"] + 4, prefill_chunk=row.get("chunk"), cuda_context=0,
                       expandable_segments=True)
    return plan.devices[0].total


def long_context_table(result: dict[str, Any]) -> Table:
    """Which prompt lengths fit an emulated card, plain vs chunked prefill, with the planner's limit and error."""
    rows = []
    for r in result["runs"]:
        planned = planned_long_context_bytes(r)
        error = f"{_pct(planned / r['peak_reserved'] - 1)}" if r["ok"] else "-"
        rows.append([r["setup"], r["mode"] + (f", {r['chunk']}-token chunks" if "chunk" in r else ""),
                     str(r["prompt_len"]), "yes" if r["ok"] else "OOM", str(r["planner_max_context"]),
                     f"{planned / GiB:.2f}", f"{r['peak_reserved'] / GiB:.2f}", error])
    env = result["environment"]
    return table(["card", "prefill", "prompt tokens", "fits", "planner: longest that fits", "planned GiB",
                  "peak reserved GiB", "planner error"], rows,
                 caption=f"{env['device']} with PyTorch's allocator capped (set_per_process_memory_fraction); prompt + 4 "
                         "new tokens; planned on the same terms: no CUDA context, expandable segments")


def _run(result: dict[str, Any], setup: str, mode: str, chunk: int | None = None, ok: bool | None = None,
         ) -> list[dict[str, Any]]:
    return [r for r in result["runs"] if r["setup"] == setup and r["mode"] == mode
            and (chunk is None or r.get("chunk") == chunk) and (ok is None or r["ok"] == ok)]


def long_context_sentence() -> Text:
    """What fit on the capped cards, how close the planner came, and what the cap leaves out."""
    lc = load("long_context")
    if lc is None:
        return not_measured("Long prompts on capped cards", "benchmarks/long_context.py")
    runs = lc["runs"]

    def longest(setup: str, mode: str, chunk: int | None = None) -> str:
        ok = [r["prompt_len"] for r in _run(lc, setup, mode, chunk, ok=True)]
        bad = [r["prompt_len"] for r in _run(lc, setup, mode, chunk, ok=False)]
        text = f"{max(ok):,}" if ok else "nothing tried fit"
        return text + (f" ({min(bad):,} OOM)" if bad else " (the longest tried)")

    chunks = sorted({r["chunk"] for r in runs if r["setup"].startswith("nf4") and r["mode"] == "chunked"}, reverse=True)
    nf4_chunks = "; ".join(f"{c}-token chunks {longest('nf4@12GiB', 'chunked', c)}" for c in chunks)
    bf16_chunk = next(r["chunk"] for r in runs if r["setup"].startswith("bf16") and r["mode"] == "chunked")
    fitted = [(r, planned_long_context_bytes(r) / r["peak_reserved"] - 1) for r in runs if r["ok"]]
    static = [e for r, e in fitted if "DynamicCache" not in r["mode"]]
    dynamic = [e for r, e in fitted if "DynamicCache" in r["mode"]]
    grow = [d["peak_reserved"] - s["peak_reserved"] for d in runs if "DynamicCache" in d["mode"]
            for s in _run(lc, d["setup"], "chunked", d.get("chunk")) if s["prompt_len"] == d["prompt_len"]]
    top = max((r for r in runs if r["ok"] and r["setup"].startswith("nf4")), key=lambda r: r["prompt_len"])
    outside = [(_gib_in(r["oom"], "this process has") or 0) - (_gib_in(r["oom"], "allocated memory") or 0)
               - (_gib_in(r["oom"], "and") or 0) for r in runs if not r["ok"]]
    return Text(
        f"`benchmarks/long_context.py` capped PyTorch's allocator on an {lc['environment']['device']} at 24 GiB (bf16) "
        f"and 12 GiB (nf4) and tried prompt lengths with plain `generate()` and with "
        f"`glmkit.generation.chunked_prefill`. bf16 on 24 GiB: plain {longest('bf16@24GiB', 'plain')}, chunked "
        f"({bf16_chunk}-token chunks) **{longest('bf16@24GiB', 'chunked', bf16_chunk)}** tokens. nf4 on 12 GiB: plain "
        f"{longest('nf4@12GiB', 'plain')}; {nf4_chunks}. The cap covers PyTorch's allocator only: at the nf4 "
        f"{top['prompt_len']:,}-token peak it had reserved {top['peak_reserved'] / GiB:.2f} GiB, and the process used "
        f"another {_range(outside, 2)} GiB outside PyTorch (the CUDA context and libraries, read from the OOM "
        f"messages of the runs that failed), "
        f"so a real 12 GB card, which also shows CUDA less than 12 GiB, would not hold that run: plan it with the CUDA "
        f"context counted (below). The planner's totals are within {_range([100 * e for e in static], 1, '%')} of the "
        f"peak reserved memory of every run that fit with glmkit's static KV cache; the runs with transformers' "
        f"`DynamicCache` (a cache growing by concatenation) reserved {_range([g / GiB for g in grow], 2)} GiB more, "
        f"so the planner is off by {_range([100 * e for e in dynamic], 1, '%')} there.")


# ----------------------------------------------------------------------------------------------------------------
# Server load (server_load_*.json): notebook 07


def server_table() -> Table:
    """Tokens/s per number of concurrent clients for every committed ``server_load*`` result (HTTP clients; with
    ``mode`` and the share of the decoder's own speed for results of the continuous-batching script)."""
    rows = []
    for path in sorted(RESULTS_DIR.glob("server_load*.json")):
        r = load(path.stem)
        for level in r["levels"]:
            if level.get("via", "http") != "http":
                continue
            vs = (f"{level['vs_decoder']:.0%} of the decoder" if "vs_decoder" in level else
                  f"{level['tokens_per_s_vs_1_client']:.1f}x 1 client" if "tokens_per_s_vs_1_client" in level else "")
            device = r["environment"]["device"] + (f" x {len(r['environment'].get('gpus', []))}, --device-map "
                                                   f"{r['device_map']}" if r.get("device_map") else "")
            rows.append([path.stem, device, "yes" if r.get("fast_decode") else "no",
                         level.get("mode", "static"), level["clients"], f"{level['seconds']:.1f}",
                         f"{level['tokens_per_s']:.1f}", vs, level.get("largest_batch", "")])
    return table(["result", "device", "--fast-decode", "batching", "clients", "window s", "tokens/s", "compared",
                  "largest batch"], rows, caption="benchmarks/server_load.py: openai client threads on loopback")


def server_load_chart(names: tuple[str, ...] = ("server_load_cpu", "server_load_gpu_cb")) -> Any:
    """Tokens/s against clients (continuous vs static batching vs the decoder alone) and time to first token (idle vs
    during a long generation) for the continuous-batching results of ``benchmarks/server_load.py``."""
    import matplotlib.pyplot as plt

    runs = [r for r in (load(n) for n in names) if r and "decoder" in r]
    if not runs:
        return not_measured("Continuous batching", "benchmarks/server_load.py")
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.3 * len(runs)), squeeze=False)
    for (tput, ttft), run in zip(axes, runs):
        device = run["environment"]["device"]
        for mode in ("continuous", "static"):
            rows = [r for r in run["levels"] if r["mode"] == mode and r["via"] == "http"]
            tput.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=mode)
        tput.plot([d["batch"] for d in run["decoder"]], [d["decode_tok_s"] for d in run["decoder"]], "k--",
                  label="decoder alone")
        clients = sorted({r["clients"] for r in run["levels"]})
        tput.set(xscale="log", xlabel="clients", ylabel="tokens/s", title=f"{device}: throughput")
        tput.set_xticks(clients, [str(n) for n in clients], minor=False)
        tput.minorticks_off()
        tput.legend()
        modes = list(run["ttft"])
        names_ = [f"{m}\n{when}" for when in ("idle", "busy") for m in modes]
        ttft.bar(names_, [run["ttft"][m][f"{when}_p50_s"] for when in ("idle", "busy") for m in modes])
        long = next(iter(run["ttft"].values()))["long_tokens"] if modes else 0
        ttft.set(yscale="log", ylabel="seconds")
        ttft.set_title(f"time to first token (p50);\nbusy: while a {long}-token request runs", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def server_sentence() -> Text:
    """What the server gave on a GPU: continuous vs static batching against the decoder alone, and the time to first
    token idle vs busy (``server_load_gpu_cb.json``); before that file exists, the older static-batching runs."""
    r = load("server_load_gpu_cb")
    if r is None:
        return static_server_sentence()
    http = [x for x in r["levels"] if x.get("via", "http") == "http"]
    by = {m: {x["clients"]: x for x in http if x["mode"] == m} for m in ("continuous", "static")}
    clients = sorted(by["continuous"])
    decoder = {d["batch"]: d["decode_tok_s"] for d in r["decoder"]}

    def tps(mode: str) -> str:
        return " / ".join(f"{by[mode][c]['tokens_per_s']:.1f}" for c in clients)

    ratio = " / ".join(f"{by['continuous'][c]['tokens_per_s'] / by['static'][c]['tokens_per_s']:.2f}x" for c in clients)
    share = " / ".join(f"{100 * by['continuous'][c]['vs_decoder']:.0f}%" for c in clients)
    top = clients[-1]
    level = by["continuous"][top]
    where = " in a process of their own" if level.get("clients_in") else ""
    text = (f"`benchmarks/server_load.py` with `--fast-decode` on an {r['environment']['device']} "
            f"({r['environment']['date']}; GLM-4-9B-Chat architecture, random weights, bf16; "
            f"{level['tokens'] // level['requests']}-token requests from {' / '.join(map(str, clients))} openai client "
            f"threads on loopback{where}, windows of {_range([x['seconds'] for x in http])} s; `server_load_gpu_cb.json`): "
            f"continuous batching served **{tps('continuous')} tokens/s**, static batching {tps('static')} "
            f"(continuous over static: {ratio}).")
    if all(c in decoder for c in clients):
        text += (f" The decoder alone, in the same run, decodes {' / '.join(f'{decoder[c]:.1f}' for c in clients)} "
                 f"tok/s at batch {' / '.join(map(str, clients))}: the server reaches {share} of it. At {top} clients "
                 f"the engine ran {level['engine_steps_per_s']:.1f} steps/s where the decoder alone runs "
                 f"{decoder[top] / top:.1f}: the rest is the engine's own work (new prompts fed through the decode "
                 f"steps or prefilled, sampling, detokenizing, HTTP) where it does not overlap the device's.")
    ttft = r.get("ttft", {})
    if "continuous" in ttft and "static" in ttft:
        def when(m: str) -> str:
            t = ttft[m]
            return (f"{m} batching p50 {t['busy_p50_s']:.2f} s, p99 {t['busy_p99_s']:.2f} s ({_times(t['busy_p50_vs_idle'])} "
                    f"idle; {t['busy_first_token_before_long_ended']} of {t['samples']} before the long one ended)")
        c = ttft["continuous"]
        text += (f" Time to first token of a short streamed request: idle p50 {c['idle_p50_s']:.2f} s (p99 "
                 f"{c['idle_p99_s']:.2f} s); while a {c['long_tokens']:,}-token request generates, {when('continuous')}, "
                 f"{when('static')}: with continuous batching a new request joins at the next step instead of waiting "
                 f"for the running batch to end.")
    return Text(text)


def static_server_sentence() -> Text:
    """What the plain and the fast engine served on the GPU with static batching (``server_load_gpu.json``,
    ``server_load_gpu_fast.json``: the engine before continuous batching), with the measured windows."""
    plain, fast = load("server_load_gpu"), load("server_load_gpu_fast")
    if plain is None or fast is None:
        return not_measured("Server throughput on a GPU", "benchmarks/server_load.py")

    def levels(r: dict[str, Any]) -> str:
        return " / ".join(f"{x['tokens_per_s']:.1f}" for x in r["levels"])

    clients = " / ".join(str(x["clients"]) for x in plain["levels"])
    windows = [x["seconds"] for r in (plain, fast) for x in r["levels"]]
    top_plain = plain["levels"][-1]["tokens_per_s_vs_1_client"]
    gains = " / ".join(f"{x['tokens_per_s_vs_1_client']:.1f}x" for x in fast["levels"])
    decode = load("decode")
    batch16 = next((r["decode_tok_s"] for r in (decode or {}).get("batch_sweep", []) if r["batch_size"] == 16), None)
    text = (f"With GLM-4-9B-Chat (random weights, bf16) on an {plain['environment']['device']}, {clients} clients, "
            f"{plain['levels'][0]['tokens'] // plain['levels'][0]['requests']} tokens per request, windows of "
            f"{_range(windows)} s (at least 10 s, and a request that started runs to its end): the plain engine gave "
            f"{levels(plain)} tokens/s. It runs a Python-driven `forward` per token, so a step for a batch of "
            f"{plain['levels'][-1]['clients']} costs {plain['levels'][-1]['clients'] / top_plain:.1f}x a step for one: "
            f"{plain['levels'][-1]['clients']} clients got {top_plain:.1f}x one client's throughput. With "
            f"`--fast-decode` every prompt is prefilled into its own row of a static cache, then one CUDA graph per "
            f"token decodes all rows: **{levels(fast)} tokens/s** "
            f"({gains} one client), prefill, "
            f"HTTP and detokenizing included. Both sides are bound by the host and vary between machines.")
    if batch16 is not None:
        text += (f" The rest of the gap to the {batch16:.0f} tok/s that the fast path decodes at batch 16 "
                 f"(notebook 05) is host work per token and static batching (a new request waits for the running batch).")
    return Text(text)


# ----------------------------------------------------------------------------------------------------------------
# Two GPUs (two_gpu*.json, tensor_parallel.json, gpu_links.json): notebooks 02, 08, 09


def _longest_prompts(r: dict[str, Any]) -> str:
    """Per mode of a ``two_gpu`` result: the longest prompt that ran, the shortest that did not, the planner's limit."""
    parts = []
    for mode in dict.fromkeys(x["mode"] for x in r.get("longest", [])):
        runs = [x for x in r["longest"] if x["mode"] == mode]
        ok = [x["prompt_len"] for x in runs if x.get("ok")]
        bad = [x["prompt_len"] for x in runs if not x.get("ok")]
        limit = next((x["planner_max_context"] for x in runs if "planner_max_context" in x), None)
        notes = ([] if bad else ["the longest tried"]) + ([f"planner's longest for that map: {limit:,}"] if limit else [])
        parts.append(f"{mode}: " + ", ".join(([f"{max(ok):,} tokens ok"] if ok else [])
                                             + ([f"{min(bad):,} tokens OOM"] if bad else []))
                     + (f" ({'; '.join(notes)})" if notes else ""))
    return "; ".join(parts)


def two_gpu_sentence() -> Text:
    """Measured two-GPU memory per card against the plan, and the longest prompts, or the plain "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        maps = "; ".join(f"{m['map']}: peaks {' / '.join(f'{p / GiB:.2f}' for p in m['peak_reserved'])} GiB against "
                         f"{' / '.join(f'{p / GiB:.2f}' for p in m['planned'])} planned"
                         for m in r.get("maps", []) if "peak_reserved" in m and "planned" in m)
        return (f"On two {r['environment']['device']} ({r.get('method', 'each card capped at 12 GiB')}): {maps}. "
                f"Longest prompts: {_longest_prompts(r)}.")
    return from_result("two_gpu", render, what="Two-GPU memory per card against the plan",
                       script="benchmarks/two_gpu.py")


def two_gpu_longest_sentence() -> Text:
    """The longest prompt two 12 GiB-capped cards took: accelerate's auto map with plain ``generate()`` against the
    KV-aware map with chunked prefill (``two_gpu.json``), with the planner's limit for each; notebook 03."""
    return from_result("two_gpu", lambda r: f"Longest prompts on two {measured_on(r)}, each capped at 12 GiB: "
                                            f"{_longest_prompts(r)}. The cap covers PyTorch's allocator only, so "
                                            f"these limits were planned without the CUDA context "
                                            f"(`cuda_context=0`); a plan for a real card counts it and is shorter.",
                       what="The longest prompt on two 12 GiB cards", script="benchmarks/two_gpu.py")


def two_gpu_table() -> Table | Text:
    """The maps of notebooks 02 and 03 on two 12 GiB-capped cards: layers, planned and measured peak per card
    (``two_gpu.json``), or "not measured yet"."""
    def render(r: dict[str, Any]) -> Table:
        rows = [[m["map"], " / ".join(map(str, m.get("layers", []))), f"{m['context']:,}" if "context" in m else "-",
                 " / ".join(f"{p / GiB:.2f}" for p in m["planned"]),
                 " / ".join(f"{p / GiB:.2f}" for p in m["peak_reserved"]),
                 " / ".join(_pct(p / q - 1) for p, q in zip(m["peak_reserved"], m["planned"]))]
                for m in r.get("maps", []) if "peak_reserved" in m and "planned" in m]
        return table(["map", "layers per card", "context", "planned GiB per card", "measured peak GiB per card",
                      "measured vs planned"], rows,
                     caption=f"two {measured_on(r)}, each capped at 12 GiB; {r.get('method', '')}")
    return from_result("two_gpu", render, what="The maps on two 12 GiB cards", script="benchmarks/two_gpu.py")


def _times(x: float) -> str:
    """A ratio as ``"1.44x"``, or ``"94x"`` once it is 10 or more."""
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _split_cap_gib(mode: str) -> int | None:
    """The per-card cap a ``two_gpu_fast`` run's mode names (``"two GPUs, each capped at 12 GiB"`` -> 12)."""
    m = re.search(r"capped at (\d+) GiB", mode)
    return int(m.group(1)) if m else None


def largest_fast_split_batch(cap_gib: int, context: int, limit: int = 64) -> tuple[int, list[float]]:
    """The largest batch the planner fits on a 20/20 split of two ``cap_gib`` cards with the fast path's buffers
    budgeted (``plan_memory(..., fast_decode=True)``, CUDA context counted), and its GiB per card (0 and ``[]`` when
    not even batch 1 fits).

    >>> largest_fast_split_batch(12, 8192)[0]
    1
    """
    cfg = glm4_9b_meta_model()
    device_map = split_layers(cfg, layers_per_device=[20, 20])
    best: tuple[int, list[float]] = (0, [])
    for batch in range(1, limit + 1):
        plan = plan_memory(cfg, [f"{cap_gib}GiB"] * 2, device_map=device_map, context_len=context, batch_size=batch,
                           fast_decode=True)
        if not plan.fits:
            break
        best = (batch, [d.total / GiB for d in plan.devices])
    return best


def _two_gpu_fast_render(r: dict[str, Any]) -> str:
    split = [x for x in r["rows"] if x["path"] != "one GPU"]
    one = {x["batch_size"]: x for x in r["rows"] if x["path"] == "one GPU"}
    parts = []
    for x in split:
        b = x["batch_size"]
        if "decode_tok_s" not in x:
            parts.append(f"batch {b}: out of memory on the split")
            continue
        base = one.get(b, {}).get("decode_tok_s")
        cache = f" ({x['context']:,}-token cache)" if x.get("context", 8192) != 8192 else ""
        parts.append(f"batch {b}{cache}: {x['decode_tok_s']:.1f} tok/s"
                     + (f" against {base:.1f} on one GPU ({x['decode_tok_s'] / base:.2f}x)" if base else ""))
    same = {True: "the same greedy tokens on both",
            False: "greedy tokens differ from one GPU's on these random weights (near-tied logits flip between kernels)",
            }.get(r.get("greedy_tokens_identical"))
    text = (f"`FastDecoder` on the 20/20 layer split, measured on {measured_on(r)} ({r['mode']}; {r['method']}): "
            + "; ".join(parts) + "." + (f" {same[0].upper()}{same[1:]}." if same else ""))
    cap, plan = _split_cap_gib(r["mode"]), r.get("plan")
    if cap and plan:
        text += (f" The batches are the planner's (`plan_memory(..., fast_decode=True)`): "
                 f"{plan['largest_batch_at_8k']} is the largest it fits on two {cap} GiB cards at 8,192 tokens (the "
                 f"CUDA context not counted: the cap limits PyTorch's allocator), and batch 16 gets the longest cache "
                 f"it plans for it there in steps of 256 ({plan['batch16_context']:,} tokens).")
    if cap and any("decode_tok_s" not in x for x in split):
        batch, per_card = largest_fast_split_batch(cap, r.get("context", 8192))
        text += (f" The planner, with the fast path's buffers budgeted and the CUDA context counted "
                 f"(`plan_memory(..., fast_decode=True)`), fits batch {batch} at most on two {cap} GiB cards at "
                 f"{r.get('context', 8192):,} tokens"
                 + (f" ({' / '.join(f'{g:.2f}' for g in per_card)} GiB planned a card)" if per_card else "")
                 + ": the out-of-memory batches were planned not to fit.")
    return text


def two_gpu_fast_sentence(name: str = "two_gpu_fast") -> Text:
    """The fast decode path on the 20/20 split against one GPU (``two_gpu_fast.json``: two GPUs;
    ``two_gpu_fast_proxy.json``: the earlier one-GPU proxy, both halves on one card), or "not measured yet"."""
    return from_result(name, _two_gpu_fast_render, what="The fast decode path on a two-GPU layer split",
                       script="benchmarks/two_gpu_fast.py")


def two_gpu_fast_chart() -> Any:
    """Decode tok/s per batch size, one GPU against the split (``two_gpu_fast.json``, and the one-GPU proxy run
    ``two_gpu_fast_proxy.json`` labelled as such); ``None`` before ``two_gpu_fast.json`` exists."""
    r = load("two_gpu_fast")
    if r is None:
        return None
    series = {}
    for run, prefix in ((r, ""), (load("two_gpu_fast_proxy"), "proxy run: ")):
        rows = [x for x in (run or {"rows": []})["rows"] if "decode_tok_s" in x]
        for path in dict.fromkeys(x["path"] for x in rows):
            series[prefix + path] = ([x["batch_size"] for x in rows if x["path"] == path],
                                     [x["decode_tok_s"] for x in rows if x["path"] == path])
    return line_chart(series, xlabel="batch size", ylabel="decode tok/s (summed over the batch)", log=True,
                      title=f"FastDecoder, GLM-4-9B bf16, 8K cache, {r['environment']['device']}")


def gpu_links_sentence() -> Text:
    """The link between two GPUs: bandwidth and the time one token's hidden state takes (``gpu_links.json``)."""
    def render(r: dict[str, Any]) -> str:
        links = ", ".join(sorted({"NVLink" if x.get("nvlink") else f"PCIe ({x.get('pcie_path', '?')})"
                                  for x in r.get("links", [])})) or "not recorded"
        parts = []
        for d in r["directions"]:
            one = d["hidden_state_seconds"].get("1", d["hidden_state_seconds"].get(1))
            parts.append(f"GPU {d['from']} → {d['to']}: {d['bandwidth_bytes_s'] / 1e9:.0f} GB/s for large copies, "
                         f"one token's hidden state ({r['hidden_state_bytes'] // 1024} KiB) in {1e6 * one:.0f} µs")
        return f"Measured on two {r['environment']['device']} (link: {links}): " + "; ".join(parts) + "."
    return from_result("gpu_links", render, what="The time of one small transfer between two GPUs",
                       script="benchmarks/gpu_links.py")


def tensor_parallel_table() -> Table | Text:
    """``tensor_parallel.json`` as a table (plain ``generate()``: one GPU, layer split, tensor parallel; speed against
    one GPU at the same batch, peak memory per card), or "not measured yet"."""
    def render(r: dict[str, Any]) -> Table:
        base_mode = r["runs"][0]["mode"]  # benchmarks/tensor_parallel.py runs one GPU first
        base = {x["batch_size"]: x["decode_tok_s"] for x in r["runs"] if x["mode"] == base_mode and x.get("decode_tok_s")}
        rows = []
        for x in r["runs"]:
            tok = x.get("decode_tok_s")
            peaks = ([p for p in x["peak_allocated"].values() if p] if "peak_allocated" in x else
                     [p for rank in x.get("per_rank", []) for p in rank["peak_allocated"].values() if p])
            rows.append([x["mode"], x["batch_size"], f"{tok:.1f}" if tok else x.get("error", "failed"),
                         f"{tok / base[x['batch_size']]:.2f}x" if tok and x["batch_size"] in base else "-",
                         " / ".join(f"{p / GiB:.2f}" for p in peaks) or "-"])
        return table(["mode", "batch", "decode tok/s", f"x {base_mode}", "peak allocated GiB per card"], rows,
                     caption=f"{measured_on(r)}; {r['method']}")
    return from_result("tensor_parallel", render, what="One GPU vs a 2-GPU layer split vs 2-GPU tensor parallelism",
                       script="benchmarks/tensor_parallel.py")


def tensor_parallel_sentence() -> Text:
    """Each two-GPU mode's decode speed against one GPU's at the same batch, or "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        runs = [x for x in r["runs"] if x.get("decode_tok_s")]
        base_mode = r["runs"][0]["mode"]  # benchmarks/tensor_parallel.py runs one GPU first
        base = {x["batch_size"]: x["decode_tok_s"] for x in runs if x["mode"] == base_mode}
        parts = [f"{x['mode']} at batch {x['batch_size']}: {x['decode_tok_s']:.1f} tok/s"
                 + (f" ({x['decode_tok_s'] / base[x['batch_size']]:.2f}x {base_mode})" if x["batch_size"] in base else "")
                 for x in runs if x["mode"] != base_mode]
        failed = [f"{x['mode']} at batch {x['batch_size']}" for x in r["runs"] if not x.get("decode_tok_s")]
        one = " / ".join(f"{t:.1f}" for t in base.values())
        return (f"Measured on {measured_on(r)} ({r['method']}): {base_mode} {one} tok/s at batch "
                f"{' / '.join(map(str, base))}; " + "; ".join(parts) + "."
                + (f" Failed: {', '.join(failed)}." if failed else ""))
    return from_result("tensor_parallel", render, what="Tensor parallel decode speed against one GPU",
                       script="benchmarks/tensor_parallel.py")


# ----------------------------------------------------------------------------------------------------------------
# What bounds tensor parallelism (tp_bound.json, allreduce_latency*.json): notebook 08

ALLREDUCES_PER_TOKEN = PER_TOKEN  # GLM-4-9B on TPDecoder: the embedding's, and after o_proj and down_proj in 40 layers
NCCL_SCRIPT = "NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py"


def tp_bound_pairs(result: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """``{batch: (whole model tok/s, one rank's shard tok/s)}`` of a ``tp_bound`` result."""
    whole = {x["batch_size"]: x["decode_tok_s"] for x in result["runs"] if "whole" in x["path"]}
    shard = {x["batch_size"]: x["decode_tok_s"] for x in result["runs"] if "shard" in x["path"]}
    return {b: (whole[b], shard[b]) for b in sorted(whole) if b in shard}


def tp_bound_batch1(result: dict[str, Any] | None) -> tuple[float, float] | None:
    """``(whole model tok/s, one rank's shard tok/s)`` at batch 1 of a ``tp_bound`` result: what every two-card
    estimate starts from; ``None`` without the result or without a batch-1 pair in it (nothing to estimate from)."""
    return None if result is None else tp_bound_pairs(result).get(1)


def tp_estimate_tok_s(shard_tok_s: float, allreduce_us: float, batch_size: int = 1,
                      per_token: int = ALLREDUCES_PER_TOKEN) -> float:
    """Estimated tensor-parallel decode tok/s (summed over the batch): one rank's step, measured alone, plus the
    token's all-reduces paid one after another (none overlaps the work that needs its result).

    >>> round(tp_estimate_tok_s(250.0, 10.0, per_token=80), 1)  # 4 ms a step + 80 x 10 µs = 4.8 ms a token
    208.3
    """
    return batch_size / (batch_size / shard_tok_s + per_token * allreduce_us * 1e-6)


def break_even_allreduce_us(whole_tok_s: float, shard_tok_s: float, batch_size: int = 1,
                            per_token: int = ALLREDUCES_PER_TOKEN) -> float:
    """The all-reduce latency (µs) at which tensor parallelism only matches one GPU: the step time the shard saves,
    shared by the token's all-reduces.

    >>> round(break_even_allreduce_us(200.0, 250.0, per_token=80), 1)  # (5 ms - 4 ms) / 80
    12.5
    """
    return (batch_size / whole_tok_s - batch_size / shard_tok_s) / per_token * 1e6


def allreduce_us(result: dict[str, Any], batch_size: int) -> float | None:
    """One all-reduce's latency (µs) at ``batch_size`` from an ``allreduce_latency`` result: inside a CUDA graph
    where measured (as ``TPDecoder`` replays it), else eager."""
    row = next((x for x in result["runs"] if x["batch_size"] == batch_size), None)
    return None if row is None else row.get("in_cuda_graph_us", row["eager_us"])


def tp_bound_sentence() -> Text:
    """One TP=2 rank's shard alone against the whole model on one GPU (``tp_bound.json``), or "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        pairs = tp_bound_pairs(r)
        parts = [f"batch {b}: {s:.1f} tok/s against {w:.1f} for the whole model ({s / w:.2f}x)"
                 for b, (w, s) in pairs.items()]
        text = (f"One TP=2 rank's shard (16 query heads, 1 KV head, half the MLP, half the vocabulary) decoding alone, "
                f"with no all-reduce, against `FastDecoder` on the whole model in the same run, measured on "
                f"{measured_on(r)} (`tp_bound.json`): " + "; ".join(parts) + ".")
        if 1 in pairs:
            whole, shard = (1e3 / x for x in pairs[1])  # ms per token at batch 1
            text += (f" Half the weights did not halve the step: if a step is a fixed part plus a part that grows with "
                     f"the weights read, the batch-1 figures ({whole:.2f} and {shard:.2f} ms a token) put the fixed part "
                     f"at {2 * shard - whole:.2f} ms (work that does not shrink with the weights: norms, attention over "
                     f"the cache, the gaps between a step's many small kernels). So {pairs[1][1] / pairs[1][0]:.2f}x "
                     f"is the most TP=2 can give at batch 1 with these kernels, before it pays a single all-reduce.")
        return text
    return from_result("tp_bound", render, what="One tensor-parallel rank's share of a token on one GPU",
                       script="benchmarks/tp_bound.py")


def _allreduce_label(result: dict[str, Any], name: str) -> str:
    """``"NCCL between 2 GPUs"``, with how they talked when a run changed it (``*_no_p2p``: through the host)."""
    backend = result["runs"][0]["backend"]
    if backend == "gloo":
        return f"gloo between {result['world_size']} CPU processes"
    how = (" with peer-to-peer off (`NCCL_P2P_DISABLE=1`: the cards talk through host memory)"
           if name.endswith("no_p2p") else "")
    return f"{backend.upper()} between {result['world_size']} GPUs{how}"


def allreduce_sentence() -> Text:
    """Measured latency of one token's all-reduce per backend (``allreduce_latency*.json``); NCCL between two GPUs
    says "not measured yet" until ``allreduce_latency.json`` exists."""
    parts = []
    for path in sorted(RESULTS_DIR.glob("allreduce_latency*.json")):
        r = load(path.stem)
        rows = ", ".join(f"{x['bytes'] // 1024} KiB (batch {x['batch_size']}) {x['eager_us']:.0f} µs"
                         + (f" eager, {x['in_cuda_graph_us']:.1f} µs each inside a CUDA graph of "
                            f"{ALLREDUCES_PER_TOKEN}" if "in_cuda_graph_us" in x else "") for x in r["runs"])
        parts.append(f"{_allreduce_label(r, path.stem)}, {measured_on(r)}, `{path.name}`: {rows}")
    text = "One token's all-reduce, measured: " + ("; ".join(parts) + "." if parts else "nothing yet.")
    if load("allreduce_latency") is None:
        text += " " + not_measured("NCCL between two GPUs", NCCL_SCRIPT)
    return Text(text)


def _tp_fast_rows(result: dict[str, Any]) -> dict[int, tuple[float, float | None]]:
    """``{batch: (one GPU tok/s, TP=2 tok/s or None when it ran out of memory)}`` of a ``tp_fast`` result."""
    one = {x["batch_size"]: x["decode_tok_s"] for x in result["rows"] if x["path"].startswith("one GPU")}
    tp: dict[int, float | None] = {}
    rows = [x for x in result["rows"] if x["path"].startswith("TP=2")]
    with_auto = {x["batch_size"] for x in rows if x.get("allreduce") == "auto"}
    for x in rows:  # TPDecoder's default (allreduce="auto") where the batch has it, else the fastest that ran
        if x["batch_size"] in with_auto and x.get("allreduce") != "auto":
            continue
        tp[x["batch_size"]] = max(filter(None, (tp.get(x["batch_size"]), x.get("decode_tok_s"))), default=None)
    return {b: (one[b], tp[b]) for b in sorted(tp) if b in one}


def _tp_fast_latency_us(result: dict[str, Any]) -> dict[tuple[str, int], float]:
    """``{(all-reduce mode, batch): µs a call inside a CUDA graph}`` of a ``tp_fast`` result."""
    return {(x["allreduce"], x["batch_size"]): x["in_cuda_graph_us"] for x in result.get("allreduce_latency", [])}


def _tp_fast_allreduces(result: dict[str, Any]) -> str:
    """Per all-reduce that ``tp_fast.py`` compared: its latency in a CUDA graph and TP=2's tok/s with it."""
    lat = _tp_fast_latency_us(result)
    runs: dict[str, list[str]] = {}
    for x in result["rows"]:
        if x["path"].startswith("TP=2") and x.get("decode_tok_s") and "allreduce_ran" in x:
            us = lat.get((x["allreduce"], x["batch_size"]))
            name = x["allreduce_ran"]
            if x["allreduce"] == "auto":  # what the default chose, and the timings it chose by
                name = '`allreduce="auto"`, which kept the ' + name.replace("(measured, in_cuda_graph_us:",
                                                                               "(timed in a CUDA graph:")
            runs.setdefault(name, []).append(
                f"batch {x['batch_size']} {x['decode_tok_s']:.1f} tok/s" + (f" ({us:.1f} µs an all-reduce)" if us else ""))
    return "; ".join(f"{name}: " + ", ".join(parts) for name, parts in runs.items())


def tp_fast_sentence() -> Text:
    """``TPDecoder`` on two GPUs against ``FastDecoder`` on one, measured (``tp_fast*.json``), or "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        cap = next((x["path"].split(", ", 1)[1].rstrip(")") for x in r["rows"] if x["path"].startswith("TP=2")), "")
        parts = [f"batch {b}: " + (f"{tp:.1f} tok/s against {one:.1f} ({tp / one:.2f}x)" if tp is not None else
                                   f"out of memory ({cap})") for b, (one, tp) in _tp_fast_rows(r).items()]
        text = (f"`TPDecoder` (`--tp 2 --fast-decode`) on two {r['environment']['device']} ({measured_on(r).split(', ')[1]}"
                f"; {r['method']}; {cap}) against `FastDecoder` on one of them: " + "; ".join(parts) + ".")
        compared = _tp_fast_allreduces(r)
        if compared:
            text += (f" Each all-reduce, {ALLREDUCES_PER_TOKEN} a token, timed in a CUDA graph (`TPDecoder`'s "
                     f"`allreduce=\"auto\"` keeps the one of lower latency there): {compared}.")
        no_p2p = load("tp_fast_no_p2p")
        b1 = None if no_p2p is None else next((x for x in no_p2p["rows"] if x["batch_size"] == 1 and
                                               x["path"].startswith("TP=2") and "decode_tok_s" in x), None)
        if b1 is not None:
            one = _tp_fast_rows(no_p2p).get(1, (None, None))[0]  # one GPU in that run, if it ran one
            ratio = f" ({b1['decode_tok_s'] / one:.2f}x one GPU in that run)" if one else " (an earlier run)"
            text += (f" With peer-to-peer off (`NCCL_P2P_DISABLE=1`, the all-reduces through host memory; "
                     f"`tp_fast_no_p2p.json`): {b1['decode_tok_s']:.1f} tok/s at batch 1{ratio}, on a server's "
                     f"host path; a consumer board's may be slower: measure yours with "
                     f"`benchmarks/allreduce_latency.py`.")
        apart = r.get("batch1_adds_and_norms_apart") or {}
        if apart.get("decode_tok_s"):
            gain = f", the fused step {apart['fused_over_apart']:.2f}x that" if apart.get("fused_over_apart") else ""
            text += (f" Batch 1 with each residual add and RMSNorm a kernel of its own (`fuse_norms=False`; the step "
                     f"folds them into the GEMV after each all-reduce): {apart['decode_tok_s']:.1f} tok/s{gain}.")
        if r.get("greedy_tokens_identical_to_one_gpu") is False:
            text += (" Greedy tokens differ from one GPU's on these random weights (the two ranks sum in another "
                     "order and near-tied logits flip); on the trained tiny model they are identical "
                     "(`tests/test_tp_decode.py`).")
        return text
    return from_result("tp_fast", render, what="Tensor-parallel fast decode on two GPUs",
                       script="benchmarks/two_gpu_fast.py")


def tp_estimate_sentence() -> Text:
    """An *estimate* of TP=2's batch-1 speed: the shard's measured step plus the token's measured all-reduce latencies."""
    pair = tp_bound_batch1(load("tp_bound"))
    if pair is None:
        return not_measured("An estimate of TP=2's speed", "benchmarks/tp_bound.py")
    whole, shard = pair
    even = break_even_allreduce_us(whole, shard)
    text = (f"**Estimate, not a measurement** (batch 1, GLM-4-9B, two ranks): a token costs one rank's step "
            f"({1e3 / shard:.2f} ms, `tp_bound.json`) plus {ALLREDUCES_PER_TOKEN} all-reduces of 8 KiB one after another. "
            f"TP=2 beats one GPU's {whole:.1f} tok/s only while one all-reduce takes less than **{even:.1f} µs**; "
            f"with free all-reduces it would reach {shard:.1f} tok/s.")
    nccl = load("allreduce_latency")
    if nccl is None or allreduce_us(nccl, 1) is None:
        text += (" With NCCL's latency between two GPUs: not measured yet (run `" + NCCL_SCRIPT + "` on a two-GPU "
                 "machine; this sentence then computes the estimate).")
    else:
        lat = allreduce_us(nccl, 1)
        est = tp_estimate_tok_s(shard, lat)
        text += (f" With NCCL's measured {lat:.1f} µs inside a CUDA graph ({measured_on(nccl)}): about **{est:.0f} "
                 f"tok/s, {est / whole:.2f}x one GPU**.")
        measured = load("tp_fast")
        one, tp = _batch1(measured, "one GPU"), _batch1(measured, "TP=2", "nccl")
        if one and tp:
            side = "below" if est / whole < tp / one else "above"
            text += (f" Measured on two GPUs with NCCL's all-reduce (`tp_fast.json`): {tp:.1f} tok/s against {one:.1f} "
                     f"on one GPU in that run, {tp / one:.2f}x; the estimate's {est / whole:.2f}x is {side} it (it lets "
                     f"no all-reduce overlap any work, and each ratio is taken within its own run).")
    cpu = load("allreduce_latency_cpu")
    if cpu is not None and allreduce_us(cpu, 1) is not None:
        lat = allreduce_us(cpu, 1)
        est = tp_estimate_tok_s(shard, lat)
        text += (f" An all-reduce as slow as gloo's between two CPU processes here ({lat:.0f} µs) would make it "
                 f"{est:.0f} tok/s, {est / whole:.2f}x one GPU: a slow link turns TP into a slowdown.")
    return Text(text)


def tp_estimate_chart() -> Any:
    """Estimated TP=2 batch-1 tok/s against the all-reduce latency, with one GPU's measured speed and the measured
    latencies marked; ``None`` before ``tp_bound.json`` exists."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter  # optional (notebooks extra), as above

    bound = load("tp_bound")
    pair = tp_bound_batch1(bound)
    if pair is None:
        return None
    whole, shard = pair
    lats = [2 ** (i / 4) for i in range(0, 37)]  # 1 µs .. 512 µs
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(lats, [tp_estimate_tok_s(shard, x) for x in lats], "-",
            label=f"TP=2 estimate: shard step + {ALLREDUCES_PER_TOKEN} all-reduces")
    ax.axhline(whole, color="k", ls="--", lw=1, label=f"one GPU, FastDecoder ({whole:.0f} tok/s, measured)")
    ax.axvline(break_even_allreduce_us(whole, shard), color="grey", ls=":", lw=1, label="break-even latency")
    for name, marker in (("allreduce_latency", "o"), ("allreduce_latency_no_p2p", "^"), ("allreduce_latency_cpu", "s")):
        r = load(name)
        lat = None if r is None else allreduce_us(r, 1)
        if lat is not None:
            label = _allreduce_label(r, name).split(" (")[0].replace(" with peer-to-peer off", ", peer-to-peer off")
            ax.plot([lat], [tp_estimate_tok_s(shard, lat)], marker, label=f"{label}: {lat:.1f} µs (measured)")
    measured = load("tp_fast") or {}
    latency = _tp_fast_latency_us(measured)
    for mode, color in (("nccl", "#d62728"), ("symm", "#9467bd"), ("push", "#2ca02c")):
        tp, us = _batch1(measured, "TP=2", mode), latency.get((mode, 1))
        if tp is not None and us is not None:  # each measured TP=2 speed at its own all-reduce's latency
            ax.plot([us], [tp], "*", ms=11, color=color, label=f"TP=2 measured, {mode}: {tp:.0f} tok/s at {us:.1f} µs")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("one all-reduce of 8 KiB (µs)")
    ax.set_ylabel("decode tok/s, batch 1")
    ax.set_title(f"GLM-4-9B bf16, shard measured on {bound['environment']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Two cards behind the server (server_split_2gpu.json, server_tp_2gpu.json, server_load_2gpu.json): notebooks 02, 08

SERVERS = {"tp2": "TP=2 (--tp 2)", "split": "split 20/20 (--fast-decode)", "one": "one GPU (--fast-decode)",
           "plain": "split 20/20, plain generate()"}
SERVER_SCRIPT = "benchmarks/server_tp.py"


def _server_rows(result: dict[str, Any] | None) -> dict[str, dict[int, dict[str, Any]]]:
    """``{kind: {clients: level}}`` of a ``server_tp.py`` result (``rows`` of servers, each with ``kind``)."""
    return {row["kind"]: {lv["clients"]: lv for lv in row.get("levels", [])} for row in (result or {}).get("rows", [])}


def two_card_server_levels() -> dict[int, dict[str, float]]:
    """Tokens/s per number of clients for each server on two cards and one (``{clients: {server: tokens/s}}``, keys
    as in ``SERVERS``): the split and one GPU from ``server_split_2gpu.json``, TP=2 from ``server_tp_2gpu.json``, the
    plain split (static batching) from ``server_load_2gpu.json``; empty before the first of them exists."""
    split = _server_rows(load("server_split_2gpu"))
    tp = _server_rows(load("server_tp_2gpu"))
    plain = load("server_load_2gpu")
    levels: dict[int, dict[str, float]] = {}
    for kind, rows in (("tp2", tp.get("tp2", {})), ("split", split.get("split", {})), ("one", split.get("one", {}))):
        for clients, lv in rows.items():
            levels.setdefault(clients, {})[kind] = lv["tokens_per_s"]
    for lv in (plain or {}).get("levels", []):
        if lv.get("via", "http") == "http" and lv["clients"] in levels:
            levels[lv["clients"]]["plain"] = lv["tokens_per_s"]
    return dict(sorted(levels.items()))


def _rounds(*results: dict[str, Any] | None) -> str:
    """How many requests each client completed in a level's window, lowest–highest, over the given server results."""
    rounds = [lv["requests"] / lv["clients"] for r in results for rows in _server_rows(r).values() for lv in rows.values()]
    return _range(rounds, 0)


def two_card_server_table() -> Table | Text:
    """``glmkit serve`` on two cards against one, tokens/s per number of clients: TP=2, the 20/20 split with the fast
    path, one GPU, each two-card server's ratio to one GPU, and the plain split; or "not measured yet"."""
    def render(split: dict[str, Any]) -> Table:
        tp = load("server_tp_2gpu")
        def cells(t: dict[str, float], kind: str) -> list[str]:
            """tokens/s and the ratio to one GPU of one server at one level ("-" where not measured)."""
            one = t.get("one")
            return [f"{t[kind]:.1f}", f"{t[kind] / one:.2f}x" if one else "-"] if kind in t else ["-", "-"]

        rows = [[clients, *cells(t, "tp2"), *cells(t, "split"), f"{t['one']:.1f}" if "one" in t else "-",
                 f"{t['plain']:.1f}" if "plain" in t else "-"] for clients, t in two_card_server_levels().items()]
        env = split["environment"]
        caption = (f"glmkit serve on {len(env.get('gpus', [])) or 2} x {env['device']}, {env['date']}: tokens/s summed "
                   f"over the clients (openai client threads on loopback, 128-token requests). The split and one-GPU "
                   f"servers ran in one run (server_split_2gpu.json); "
                   + ("TP=2 in a separate run on the same machine minutes later (server_tp_2gpu.json), so its ratio "
                      "compares two runs" if tp else "TP=2: not measured yet (benchmarks/server_tp.py)")
                   + f"; the plain split with static batching in an earlier run (server_load_2gpu.json). Each client "
                     f"completed {_rounds(split, tp)} requests per window.")
        return table(["clients", "TP=2 tokens/s", "TP=2 / one GPU", "split tokens/s", "split / one GPU",
                      "one GPU tokens/s", "plain split tokens/s"], rows, caption=caption)
    return from_result("server_split_2gpu", render, what="The server on two cards", script=SERVER_SCRIPT)


def two_card_server_sentence() -> Text:
    """What the server on two cards gave against one GPU, level by level, and why TP=2's decoder gain can vanish
    behind the server (``server_*_2gpu.json``, ``tp_fast.json``), or "not measured yet"."""
    def render(split: dict[str, Any]) -> str:
        levels = two_card_server_levels()
        clients = [c for c, t in levels.items() if "one" in t]

        def series(kind: str) -> str:
            return " / ".join(f"{levels[c][kind]:.1f}" for c in clients)

        def ratios(kind: str) -> list[float]:
            return [levels[c][kind] / levels[c]["one"] for c in clients if kind in levels[c]]

        text = (f"`glmkit serve` on two {split['environment']['device']} ({split['environment']['date']}), tokens/s at "
                f"{' / '.join(map(str, clients))} clients: one GPU with `--fast-decode` **{series('one')}**; the 20/20 "
                f"split with `--fast-decode` **{series('split')}** ({_range(ratios('split'), 2)}x one GPU; each card "
                f"holds half the weights, so the pair has room for more KV cache than one card)")
        tp = ratios("tp2")
        if len(tp) == len(clients):
            more = sum(x > 1 for x in tp)
            text += (f"; tensor parallel (`--tp 2`) **{series('tp2')}** ({_range(tp, 2)}x one GPU, more tokens/s than "
                     f"one GPU at {more} of {len(tp)} levels). The split and one GPU ran in one run, TP=2 in a separate "
                     f"run on the same machine minutes later.")
            fast = load("tp_fast")
            row = None if fast is None else _tp_fast_rows(fast).get(1)
            if more < len(tp) and row and row[1]:
                text += (f" TP=2's decoder alone is {row[1] / row[0]:.2f}x one GPU at batch 1 (`tp_fast.json`); behind "
                         f"the server that gain is smaller than the host work each step adds (scheduling, sampling, "
                         f"detokenizing, HTTP, and for TP=2 sending every decoder call to the second process), which "
                         f"the second card does not share. Not profiled here: this is the likely cause, not a measured "
                         f"one.")
        else:
            text += ". " + not_measured("TP=2 behind the server", SERVER_SCRIPT)
        plain = [(c, t["plain"]) for c, t in levels.items() if "plain" in t]
        if plain:
            text += (f" The same split with plain `generate()` behind the server (static batching, an earlier run, "
                     f"`server_load_2gpu.json`): {' / '.join(f'{v:.1f}' for _, v in plain)} tokens/s at "
                     f"{' / '.join(str(c) for c, _ in plain)} clients.")
        return text
    return from_result("server_split_2gpu", render, what="The server on two cards", script=SERVER_SCRIPT)


def two_card_server_chart() -> Any:
    """Tokens/s per number of clients, TP=2 and the split against one GPU behind ``glmkit serve`` (log scale: the
    levels span 20x); ``None`` before ``server_split_2gpu.json`` exists."""
    split = load("server_split_2gpu")
    if split is None:
        return None
    groups = {f"{c} client{'s' if c > 1 else ''}": {SERVERS[k]: t[k] for k in ("tp2", "split", "one") if k in t}
              for c, t in two_card_server_levels().items()}
    return _grouped_bars(groups, ylabel="tokens/s (summed over the clients)", log=True,
                         title=f"glmkit serve, GLM-4-9B bf16, 2 x {measured_on(split)}; TP=2 in a separate run")


# ----------------------------------------------------------------------------------------------------------------
# Which two-card path for which link (two_gpu_fast*.json, tp_fast*.json, allreduce_latency*.json, gpu_links.json,
# tp_bound.json): notebooks 02 and 08


@dataclass(repr=False)
class TwoCardEstimate:
    """Estimated batch-1 decode tok/s on one GPU, a two-card layer split and TP=2, for one link."""

    one_gpu_tok_s: float
    split_tok_s: float
    tp_tok_s: float

    def as_table(self) -> Table:
        """The three paths as a ``Table``: estimated tok/s and the speed-up over one GPU."""
        return table(["path", "estimated tok/s", "x one GPU"],
                     [[name, f"{v:.1f}", f"{v / self.one_gpu_tok_s:.2f}x"] for name, v in
                      (("one GPU", self.one_gpu_tok_s), ("split 20/20", self.split_tok_s), ("TP=2", self.tp_tok_s))])

    def _repr_html_(self) -> str:
        return self.as_table()._repr_html_()

    def __str__(self) -> str:
        return str(self.as_table())

    __repr__ = __str__


def two_card_estimate(step_s_one_gpu: float, shard_step_s: float, allreduce_s: float, hop_s: float,
                      allreduces_per_token: int = ALLREDUCES_PER_TOKEN) -> TwoCardEstimate:
    """Estimate batch-1 decode speed on two cards for a link of given latencies (notebooks 02 and 08).

    A layer split runs the whole model's step, one card after the other, plus one hand-over of the hidden state
    per token; TP=2 runs one rank's shard plus the token's all-reduces, one after another (none overlaps the work
    that needs its result, so this is pessimistic).

    Args:
        step_s_one_gpu: seconds per token of the whole model on one GPU (``tp_bound.json``'s whole-model row).
        shard_step_s: seconds per token of one TP=2 rank's shard alone, no all-reduce (``tp_bound.json``).
        allreduce_s: one 8 KiB all-reduce inside a CUDA graph (``benchmarks/allreduce_latency.py``).
        hop_s: what the split's hand-over adds to a token (the 8 KiB copy that ``benchmarks/gpu_links.py`` times,
            plus the wait between the cards; measured here as the split's tok/s against one GPU).
        allreduces_per_token: 81 for GLM-4-9B on ``TPDecoder`` (2 per layer, 40 layers, and the embedding's).

    >>> e = two_card_estimate(5e-3, 3.6e-3, allreduce_s=15e-6, hop_s=100e-6, allreduces_per_token=80)  # 3.6 ms + 80 x 15 µs
    >>> round(e.one_gpu_tok_s), round(e.split_tok_s, 1), round(e.tp_tok_s, 1)
    (200, 196.1, 208.3)
    """
    return TwoCardEstimate(one_gpu_tok_s=1 / step_s_one_gpu, split_tok_s=1 / (step_s_one_gpu + hop_s),
                           tp_tok_s=1 / (shard_step_s + allreduces_per_token * allreduce_s))


@dataclass
class LinkMeasurement:
    """One link's measured batch-1 figures for both two-card paths, each ratio taken within its own run."""

    link: str
    split_tok_s: float | None = None
    split_one_gpu_tok_s: float | None = None  # one GPU in the split's run
    tp_tok_s: float | None = None
    tp_one_gpu_tok_s: float | None = None  # one GPU in tp_fast.json's run
    tp_same_run: bool = True  # False when TP's one-GPU figure comes from another run
    allreduce_s: float | None = None  # one 8 KiB all-reduce in a CUDA graph
    copy_s: float | None = None  # one bare 8 KiB copy, waited for (gpu_links.json; peer links only)

    @property
    def hop_s(self) -> float | None:
        """Seconds the split's hand-over adds to a token: the split's step minus one GPU's, in the same run."""
        if self.split_tok_s is None or self.split_one_gpu_tok_s is None:
            return None
        return 1 / self.split_tok_s - 1 / self.split_one_gpu_tok_s


def _batch1(result: dict[str, Any] | None, start: str, allreduce: str | None = None) -> float | None:
    """Batch 1's tok/s of the first row whose path starts with ``start`` (with ``allreduce``: a TP row summed by that
    mode; rows from before the modes were recorded were NCCL's)."""
    row = next((x for x in (result or {}).get("rows", []) if x["batch_size"] == 1 and x["path"].startswith(start)
                and "decode_tok_s" in x and (allreduce is None or x.get("allreduce", "nccl") == allreduce)), None)
    return None if row is None else row["decode_tok_s"]


def link_measurements() -> list[LinkMeasurement]:
    """The two links measured on the two-GPU machine: NVLink peer-to-peer, and through host memory (the split's
    hand-over staged in pinned host memory, ``FastDecoder(hop="host")``; NCCL with ``NCCL_P2P_DISABLE=1``)."""
    tp_fast, links = load("tp_fast"), load("gpu_links")
    tp_one = _batch1(tp_fast, "one GPU")
    out = []
    for link, split, tp, allreduce, same in (("NVLink, peer to peer", "two_gpu_fast", "tp_fast", "allreduce_latency", True),
                                             ("through host memory", "two_gpu_fast_host_hop", "tp_fast_no_p2p",
                                              "allreduce_latency_no_p2p", False)):
        s, t, a = load(split), load(tp), load(allreduce)
        m = LinkMeasurement(link, split_tok_s=_batch1(s, "split"), split_one_gpu_tok_s=_batch1(s, "one GPU"),
                            tp_tok_s=_batch1(t, "TP=2", "nccl"), tp_one_gpu_tok_s=_batch1(t, "one GPU") or tp_one,
                            tp_same_run=same or _batch1(t, "one GPU") is not None,
                            allreduce_s=None if a is None or allreduce_us(a, 1) is None else allreduce_us(a, 1) * 1e-6)
        if links is not None and same:
            m.copy_s = statistics.median(d["hidden_state_seconds"].get("1", d["hidden_state_seconds"].get(1))
                                         for d in links["directions"])
        out.append(m)
    return out


def _speed(tok_s: float | None, one: float | None, star: str = "") -> str:
    return "-" if tok_s is None else f"{tok_s:.1f}" + (f" ({tok_s / one:.2f}x{star})" if one else "")


def two_card_link_table() -> Table | Text:
    """Which path for which link, batch 1: each link's measured cost per token for the split (one hand-over) and
    TP=2 (``ALLREDUCES_PER_TOKEN``), the measured speeds against one GPU, and ``two_card_estimate`` from those latencies and
    ``tp_bound.json``'s steps; or "not measured yet"."""
    def render(bound: dict[str, Any]) -> Table:
        whole, shard = tp_bound_batch1(bound)
        rows = []
        for m in link_measurements():
            est = (two_card_estimate(1 / whole, 1 / shard, m.allreduce_s, m.hop_s)
                   if m.allreduce_s is not None and m.hop_s is not None else None)
            rows.append([m.link,
                         "-" if m.copy_s is None else f"{1e6 * m.copy_s:.0f}",
                         "-" if m.hop_s is None else f"{1e6 * m.hop_s:.0f}",
                         _speed(m.split_tok_s, m.split_one_gpu_tok_s),
                         "-" if m.allreduce_s is None else f"{1e6 * m.allreduce_s:.1f}",
                         "-" if m.allreduce_s is None else f"{1e3 * ALLREDUCES_PER_TOKEN * m.allreduce_s:.2f}",
                         _speed(m.tp_tok_s, m.tp_one_gpu_tok_s, "" if m.tp_same_run else "*"),
                         "-" if est is None else f"{est.split_tok_s / est.one_gpu_tok_s:.2f}x / "
                                                 f"{est.tp_tok_s / est.one_gpu_tok_s:.2f}x"])
        return table(["link", "8 KiB copy µs", "split: hand-over µs a token", "split tok/s (x one GPU)",
                      "all-reduce µs (in a graph)", f"TP=2: {ALLREDUCES_PER_TOKEN} all-reduces, ms a token",
                      "TP=2 tok/s (x one GPU)", "estimate: split / TP=2 (x one GPU)"], rows,
                     caption=f"Batch 1, GLM-4-9B bf16, two {_two_card_device()}. Hand-over: the split's step minus "
                             "one GPU's, in the same run. *: against one GPU in tp_fast.json's run. Estimate: "
                             f"two_card_estimate with the whole model's and one shard's steps on one "
                             f"{measured_on(bound)} (tp_bound.json). 'Through host memory' is this server's host path, "
                             "an approximation of cards without peer-to-peer (a desktop's PCIe and CPU are not an H200 "
                             "server's).")
    bound = load("tp_bound")
    if bound is not None and tp_bound_batch1(bound) is None:  # a tp_bound.json without batch 1: nothing to estimate
        return not_measured("Which two-card path for which link (batch 1 in tp_bound.json)", "benchmarks/tp_bound.py")
    return from_result("tp_bound", render, what="Which two-card path for which link", script="benchmarks/tp_bound.py")


def _two_card_device() -> str:
    """``"<device>, <date>"`` of the two-GPU fast runs (``two_gpu_fast.json``, else ``tp_fast.json``)."""
    r = load("two_gpu_fast") or load("tp_fast")
    return "GPUs (not measured yet)" if r is None else measured_on(r)


def link_guidance_sentence() -> Text:
    """One rendered sentence of guidance: which two-card path pays on which link, from the measured latencies and
    the break-even all-reduce latency, with how to measure your own link."""
    pair = tp_bound_batch1(load("tp_bound"))
    if pair is None:
        return not_measured("Which two-card path for which link", "benchmarks/tp_bound.py")
    whole, shard = pair
    even = break_even_allreduce_us(whole, shard)
    measured = [m for m in link_measurements() if m.allreduce_s is not None]
    parts = []
    for m in measured:
        tp = (f"TP=2 decoded {m.tp_tok_s / m.tp_one_gpu_tok_s:.2f}x one GPU"
              + ("" if m.tp_same_run else " (one GPU from `tp_fast.json`'s run)")
              if m.tp_tok_s and m.tp_one_gpu_tok_s else "TP=2 not measured")
        split = ("" if m.hop_s is None else
                 f", the split {m.split_tok_s / m.split_one_gpu_tok_s:.2f}x (its hand-over {1e6 * m.hop_s:.0f} µs a token)")
        parts.append(f"{m.link} (all-reduce {1e6 * m.allreduce_s:.1f} µs): {tp}{split}")
    peer = next((m for m in measured if m.copy_s is not None and m.hop_s is not None), None)
    text = (f"At batch 1, measured on two {_two_card_device()}: " + "; ".join(parts) + ". "
            f"By the estimate, TP=2 is faster than one card only while one 8 KiB all-reduce inside a CUDA graph takes "
            f"less than **{even:.1f} µs**; above that it is slower than one card, and the split is the two-card path "
            f"to take: one card's speed minus one hand-over a token, with both cards' memory.")
    est = {m.link: two_card_estimate(1 / whole, 1 / shard, m.allreduce_s, 0.0).tp_tok_s / whole for m in measured}
    beat = [m for m in measured if m.tp_tok_s and m.tp_one_gpu_tok_s and m.tp_tok_s / m.tp_one_gpu_tok_s > est[m.link]]
    if measured and len(beat) == len(measured):
        text += (" The estimate is cautious: it lets no all-reduce overlap any work, and the measured TP=2 beat it on "
                 f"{'both links' if len(measured) == 2 else 'every link'} here.")
    if peer is not None:
        text += (f" The split's hand-over cost {1e6 * peer.hop_s:.0f} µs a token over NVLink, where the bare 8 KiB copy "
                 f"takes {1e6 * peer.copy_s:.0f} µs: the rest is what the hand-over adds besides the copy (starting "
                 f"the second card's graph, waiting for it; not broken down here).")
    text += (" 'Through host memory' here is an H200 server's host path, only an approximation of two consumer cards "
             "without peer-to-peer: measure your own link with `torchrun --nproc-per-node 2 "
             "benchmarks/allreduce_latency.py` and `python benchmarks/gpu_links.py`, and give the latencies to "
             "`glmkit.results.two_card_estimate`.")
    return Text(text)


# ----------------------------------------------------------------------------------------------------------------
# Quantization (quantization_9b.json) and the monitor (monitor_check*.json): README


def quantization_sentence() -> Text:
    """Weights on the card per precision (measured next to planned) and plain ``generate()`` speed."""

    def render(q: dict[str, Any]) -> str:
        p = q["precisions"]
        diff = [(r["loaded_bytes"] - r["planned_bytes"]) / 2**20 for r in p]
        weights = ", ".join(f"{r['precision']} {r['loaded_bytes'] / GiB:.2f} GiB" for r in p)
        speeds = ", ".join(f"{r['precision']} {r['tok_s']['1']:.1f} / {r['tok_s']['8']:.1f}" for r in p)
        return (
            f"**Weights on the card** (measured on an {q['environment']['device']}; the planner's figure is "
            f"{_range(diff, 1)} MiB below it, bitsandbytes' small buffers): {weights} (`lm_head` and embeddings stay "
            f"16-bit). **Plain `generate()` decode** (32-token prompt, 32 new tokens, median of 3; "
            f"`quantization_9b.json`), batch 1 / batch 8 in tok/s summed over the batch: {speeds}.")
    return from_result("quantization_9b", render, what="GLM-4-9B in each precision", script="benchmarks/quantization.py")


PRECISION_ORDER = ("bf16", "fp16", "nf4")
NF4_DEFAULT_PATH = "nf4 fast (glmkit CUDA kernel)"  # nf4_decode.py's nf4 decoder with its default options
NF4_BF16_PRODUCTS_PATH = "nf4 fast (glmkit CUDA kernel, bf16 products)"  # the CUDA kernel as it was: bf16 code table


def nf4_decode_rows(result: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """``(precision, path, best tok/s, roofline tok/s)`` per decode path of an ``nf4_decode`` result."""
    rows = []
    for x in result["decode"]:
        precision = x["path"].split()[0]
        if precision not in PRECISION_ORDER:  # "generate() (bitsandbytes)": nf4_decode.py's plain path, its nf4 model
            precision = "nf4"
        rows.append((precision, x["path"], x["best_tok_s"], x["roofline_tok_s"]))
    return sorted(rows, key=lambda r: (PRECISION_ORDER.index(r[0]), "fast" in r[1]))  # plain generate() first


def _nf4_path(result: dict[str, Any], start: str) -> dict[str, Any] | None:
    return next((x for x in result["decode"] if x["path"].startswith(start)), None)


def fast_precisions_sentence() -> Text:
    """Batch-1 fast decode per precision in one run (``nf4_decode.json``), short, for notebook 05."""
    def render(r: dict[str, Any]) -> str:
        def tok(start: str) -> str:
            x = _nf4_path(r, start)
            return f"{x['best_tok_s']:.1f}" if x else "not measured"
        text = (f"Measured on {measured_on(r)} (`nf4_decode.json`, batch 1, in one run): the fast path decodes "
                f"{tok('bf16 fast')} tok/s in bf16 and {tok('fp16 fast')} in fp16, against {tok('generate()')} for "
                f"plain `generate()` in nf4.")
        if _nf4_path(r, NF4_DEFAULT_PATH):
            return text + (f" With bitsandbytes nf4 weights {tok(NF4_DEFAULT_PATH)} with glmkit's batch-1 4-bit CUDA "
                           f"kernel and {tok('nf4 fast (bnb')} with bitsandbytes' own kernel. Notebook 04 charts them "
                           f"against each precision's roofline.")
        newer = load("nf4_gemv")
        if newer is None:
            return text + (f" With bitsandbytes nf4 weights {tok('nf4 fast (Triton)')} with glmkit's Triton 4-bit "
                           f"kernel and {tok('nf4 fast (bnb')} with bitsandbytes' own kernel. Notebook 04 charts them.")
        ours, bnb = _nf4_gemv_decode(newer, "nf4 fast (glmkit"), _nf4_gemv_decode(newer, "nf4 fast (bnb")
        bf16 = _nf4_gemv_decode(newer, "bf16 fast")
        if ours and bnb and bf16:
            text += (f" With bitsandbytes nf4 weights, in another run ({measured_on(newer)}, `nf4_gemv.json`): "
                     f"{ours['best_tok_s']:.1f} tok/s with glmkit's 4-bit kernel and {bnb['best_tok_s']:.1f} with "
                     f"bitsandbytes' own, against {bf16['best_tok_s']:.1f} for bf16 in that run.")
        return text + " Notebook 04 charts them against each precision's roofline."
    return from_result("nf4_decode", render, what="The fast path in fp16 and nf4", script="benchmarks/nf4_decode.py")


def nf4_decode_sentence() -> Text:
    """The fast path per precision against each precision's roofline, glmkit's nf4 kernel against bitsandbytes', and
    nf4 at a long context on a capped card (``nf4_decode.json``)."""
    def render(r: dict[str, Any]) -> str:
        def path(x: dict[str, Any] | None, label: str) -> str:
            if x is None:
                return f"{label} not measured"
            return (f"{label} {x['best_tok_s']:.1f} tok/s ({100 * x['fraction_of_roofline']:.1f}% of its "
                    f"{x['roofline_tok_s']:.1f} tok/s roofline)")
        bf16, fp16 = _nf4_path(r, "bf16 fast"), _nf4_path(r, "fp16 fast")
        triton, eager = _nf4_path(r, "nf4 fast (Triton)"), _nf4_path(r, "nf4 fast (Triton, eager")
        bnb, plain = _nf4_path(r, "nf4 fast (bnb"), _nf4_path(r, "generate()")
        default = _nf4_path(r, NF4_DEFAULT_PATH)  # the runs since each fast path is timed with its defaults
        newer = load("nf4_gemv") if default is None else None
        if newer is not None:  # glmkit's 4-bit kernel was rewritten and measured again there: its figures, not these
            triton = eager = None
        text = (f"Batch-1 decode on {measured_on(r)} (`nf4_decode.json`; {r['method']}; copy bandwidth "
                f"{r['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s): {path(bf16, 'bf16 fast path')}; "
                f"{path(fp16, 'fp16 fast path')}; "
                + (f"{path(default, '**nf4 fast path** (glmkit`s batch-1 CUDA kernel, its default)')}; " if default
                   else "" if newer else f"{path(triton, 'nf4 fast path with glmkit`s Triton kernel')}; ") +
                f"{path(bnb, 'nf4 fast path with bitsandbytes` own kernel (`matmul_4bit`, eager layers)')}; "
                f"{path(plain, 'nf4 plain `generate()`')}." + (" glmkit's own 4-bit kernel: measured again after "
                "its rewrite, below (`nf4_gemv.json`)." if newer else "")).replace("glmkit`s", "glmkit's").replace(
                    "bitsandbytes` own", "bitsandbytes' own")
        if triton and bnb:
            faster = "slower" if triton["best_tok_s"] < bnb["best_tok_s"] else "faster"
            text += (f" **glmkit's nf4 Triton kernel is {faster} than bitsandbytes' own kernel on this card in this "
                     f"run**: {triton['best_tok_s']:.1f} against {bnb['best_tok_s']:.1f} tok/s")
            text += (f", and {eager['best_tok_s']:.1f} against {bnb['best_tok_s']:.1f} with both in eager layers"
                     if eager else "") + "."
            if not r.get("tuned_shapes_for_this_card"):
                text += " Its launch shapes were not tuned for this card (defaults)."
        if default and bf16 and bnb:
            text += (f" In this run nf4 decodes **{default['best_tok_s'] / bf16['best_tok_s']:.2f}x** bf16's fast path "
                     f"and {default['best_tok_s'] / bnb['best_tok_s']:.2f}x the same fast path on bitsandbytes' own "
                     f"kernel; a 4-bit token reads {default['roofline_tok_s'] / bf16['roofline_tok_s']:.2f}x fewer bytes "
                     f"({r['nf4_model_bytes'] / GiB:.2f} GiB of weights and quantization states).")
            old = _nf4_path(r, NF4_BF16_PRODUCTS_PATH)
            if old:
                text += (f" Its tensor cores multiply in fp16; in bf16, as they once did (less accurately: the "
                         f"accuracy sentence below), it decoded {old['best_tok_s']:.1f} tok/s, so fp16 products run at "
                         f"{default['best_tok_s'] / old['best_tok_s']:.3f}x that speed.")
        if triton and bf16:
            best = max((x for x in (triton, bnb) if x), key=lambda x: x["best_tok_s"])
            text += (f" The faster nf4 fast path reached {best['best_tok_s'] / bf16['best_tok_s']:.2f}x bf16's fast path, "
                     f"though a 4-bit token reads {best['roofline_tok_s'] / bf16['roofline_tok_s']:.2f}x fewer bytes "
                     f"({r['nf4_model_bytes'] / GiB:.2f} GiB of weights and quantization states): on this card 4-bit "
                     f"saves memory, not time.")
        if "nf4_triton_vs_bnb_logits_rel_diff" in r and not newer:
            ours = "glmkit's batch-1 CUDA kernel" if default else "Triton"
            text += (f" nf4 logits, {ours} against bitsandbytes' kernel: {100 * r['nf4_triton_vs_bnb_logits_rel_diff']:.1f}% "
                     f"relative difference; greedy tokens equal on {r['nf4_triton_vs_bnb_greedy_equal_of_64']} of 64 "
                     f"steps (random weights: near-tied logits flip once the two sum in another order).")
        text += " " + nf4_long_context_clause()
        return text
    return from_result("nf4_decode", render, what="The fast path in fp16 and nf4", script="benchmarks/nf4_decode.py")


def _nf4_best(x: dict[str, Any]) -> dict[str, Any]:
    """A projection's fastest launch of glmkit's 4-bit kernel in ``nf4_gemv.json`` (its best over both lookups)."""
    return x.get("best") or min(x["best_by_lookup"].values(), key=lambda b: b["us"])


def _nf4_gemv_decode(r: dict[str, Any], start: str) -> dict[str, Any] | None:
    return next((x for x in r["decode"] if x["path"].startswith(start)), None)


def nf4_kernel_sentence() -> Text:
    """glmkit's 4-bit kernel per projection and per token against bitsandbytes' and bf16, and its accuracy against
    fp32, all from one run (``nf4_gemv.json``), or "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        ours, bnb = _nf4_gemv_decode(r, "nf4 fast (glmkit"), _nf4_gemv_decode(r, "nf4 fast (bnb")
        bf16 = _nf4_gemv_decode(r, "bf16 fast")
        per = "; ".join(f"{x['projection']}{' (double quantization)' if x['double_quant'] else ''} "
                        f"{_nf4_best(x)['us']:.1f} µs, {_nf4_best(x)['tb_s']:.2f} TB/s ({x['speedup_vs_bnb']:.2f}x bitsandbytes' "
                        f"`matmul_4bit`, {x['speedup_vs_bf16_cublas']:.2f}x bf16 cuBLAS)" for x in r["projections"])
        text = (f"glmkit's 4-bit kernel (`glmkit.gemv4bit`) on {measured_on(r)} (`nf4_gemv.json`, one run; "
                f"{r['method'].split('; ')[0]}). Per projection, batch 1"
                + (f" (from the run of {r['projections_from_earlier_run']} on the same card)"
                   if r.get("projections_from_earlier_run") else "") + f": {per}.")
        if ours and bnb and bf16:
            text += (f" A whole token, batch 1: the nf4 fast path decodes **{ours['best_tok_s']:.1f} tok/s** with this "
                     f"kernel against {bnb['best_tok_s']:.1f} with bitsandbytes' ({ours['best_tok_s'] / bnb['best_tok_s']:.2f}x) "
                     f"and {bf16['best_tok_s']:.1f} for the bf16 fast path ({ours['best_tok_s'] / bf16['best_tok_s']:.2f}x), "
                     f"{100 * ours['fraction_of_roofline']:.0f}% of nf4's roofline against bf16's "
                     f"{100 * bf16['fraction_of_roofline']:.0f}% of its own.")
            layers = glm4_9b_meta_model().config.num_hidden_layers
            gemv_ms = layers * sum(_nf4_best(x)["us"] for x in r["projections"] if not x["double_quant"]) / 1e3
            text += (f" The 4-bit projections take {gemv_ms:.2f} ms of the token's {1e3 / ours['best_tok_s']:.2f} ms "
                     f"({layers} layers)")
            rest = 1e3 / ours["best_tok_s"] - gemv_ms
            text += (f"; the other {rest:.2f} ms go to everything else (the 16-bit `lm_head`, and the rest of each "
                     f"layer run uncompiled as many small kernels: compiling the layers around this kernel failed "
                     f"here)." if not ours.get("compiled") else
                     f"; the other {rest:.2f} ms go to the 16-bit `lm_head` and the rest of each layer, compiled around "
                     f"the kernel (a PyTorch op, `torch.ops.glmkit.gemv_4bit*`).")
            eager = _nf4_gemv_decode(r, "nf4 fast (glmkit Triton, eager layers)")
            if eager and eager is not ours and ours.get("compiled"):
                text += (f" With those layers left uncompiled the same kernel gives {eager['best_tok_s']:.1f} tok/s: "
                         f"compiling them is {ours['best_tok_s'] / eager['best_tok_s']:.2f}x.")
            elif eager and eager is not ours:
                text += f" (Built with `compile=False`: {eager['best_tok_s']:.1f} tok/s.)"
            if ours["best_tok_s"] < bf16["best_tok_s"] and rest > gemv_ms:
                text += " That rest, not reading the weights, keeps a 4-bit token slower than a bf16 one here."
        acc = r.get("accuracy", {})
        if all(k in acc for k in ("bf16", "nf4_triton", "nf4_bnb")):
            text += (f" Logits against fp32 decoders on the same weights ({acc['bf16']['steps']} teacher-forced steps, "
                     f"relative error, median): bf16 {100 * acc['bf16']['rel_err_median']:.1f}%, nf4 with this kernel "
                     f"{100 * acc['nf4_triton']['rel_err_median']:.1f}%, with bitsandbytes' "
                     f"{100 * acc['nf4_bnb']['rel_err_median']:.1f}%")
            ours_err, bnb_err = acc["nf4_triton"]["rel_err_median"], acc["nf4_bnb"]["rel_err_median"]
            text += (": this kernel's error is below bitsandbytes'." if ours_err < bnb_err else
                     ": this kernel's error is not below bitsandbytes'.")
        fp16 = _nf4_gemv_decode(r, "fp16 fast")
        if fp16 and bf16:
            text += (f" fp16 (for cards without bf16) through the same fast path, in the same run: "
                     f"{fp16['best_tok_s']:.1f} tok/s ({fp16['best_tok_s'] / bf16['best_tok_s']:.2f}x bf16)")
            if "fp16" in acc and "bf16" in acc:
                f16, b16 = acc["fp16"]["rel_err_median"], acc["bf16"]["rel_err_median"]
                text += (f"; its logits against the same fp32 decoder: {100 * f16:.2f}% (bf16: {100 * b16:.1f}%), "
                         f"{acc['fp16']['argmax_equal']} of {acc['fp16']['steps']} greedy tokens equal"
                         + (": within bf16's error." if f16 <= b16 else ": above bf16's error."))
            else:
                text += "."
        return text
    return from_result("nf4_gemv", render, what="glmkit's 4-bit kernel", script="benchmarks/nf4_gemv.py")


def _nf4_batch_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in r.get("rows", []) if all(k in row for k in ("nf4_bitsandbytes", "bf16"))
            and ("nf4_rows" in row or "nf4_tensor_cores" in row)]


_NF4_KERNELS = (("nf4_rows", "per row"), ("nf4_tensor_cores", "on tensor cores"))


def _tok_s(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def nf4_limits_sentence() -> Text:
    """What holds glmkit's batch-1 4-bit kernel back: Nsight Compute's view of it and of the bf16 kernel on GLM-4-9B's
    gate_up (``nf4_ncu.json``), and two other designs measured slower on the same card (``nf4_four_rows.json``,
    ``nf4_lookups.json``), or "not measured yet"."""
    def render(r: dict[str, Any]) -> str:
        rows = {(x["weights"], x["projection"]): x for x in r["rows"]}
        nf4, bf16 = rows[("nf4", "gate_up (SwiGLU)")], rows[("bf16", "gate_up (SwiGLU)")]
        text = (f"What holds the 4-bit kernel back, read with Nsight Compute on {measured_on(r)} (`nf4_ncu.json`): on "
                f"gate_up, the 4-bit kernel keeps the SM's L1/TEX unit {nf4['L1/TEX Cache Throughput %']:.0f}% busy "
                f"while memory (DRAM) is {nf4['DRAM Throughput %']:.0f}% busy, and each scheduler issues "
                f"{nf4['Issued Warp Per Scheduler']:.2f} instructions a cycle (at most 1); the bf16 kernel on the same "
                f"projection keeps DRAM {bf16['DRAM Throughput %']:.0f}% busy and L1/TEX "
                f"{bf16['L1/TEX Cache Throughput %']:.0f}%. A 4-bit token is bound by the work on each packed byte "
                f"inside the SM (find its two values, scale, multiply), not by the bytes it reads: that is why it "
                f"is not three times faster than bf16, though it reads a third of the bytes.")
        four, lookups = load("nf4_four_rows"), load("nf4_lookups")
        if four and lookups:
            us = {(x["projection"], x["four_rows_warps"]): x["us"] for x in four["projections"]}
            best = lookups["best_us"]
            rows_us = min(v for (p, w), v in us.items() if p == "gate_up" and w)
            text += (f" Two other designs were slower on gate_up: threads that read x once for four weight rows "
                     f"({rows_us:.1f} against {us[('gate_up', 0)]:.1f} µs, `nf4_four_rows.json`), and nibbles "
                     f"looked up by byte permutes on the integer units instead of warp shuffles "
                     f"({best['gate_up prmt']:.1f} µs; half the bytes each way {best['gate_up mixed']:.1f}, against "
                     f"{best['gate_up shuffle']:.1f}, `nf4_lookups.json`).")
        return text
    return from_result("nf4_ncu", render, what="What holds the 4-bit kernel back",
                       script="ncu ... python3 benchmarks/nf4_ncu_target.py")


def nf4_batch_sentence() -> Text:
    """A 4-bit model's decode speed by batch size, glmkit's two 4-bit kernels against bitsandbytes' and bf16, in one
    run (``nf4_batch.json``), and which kernel ``gemv="auto"`` takes at which batch size."""
    def render(r: dict[str, Any]) -> str:
        rows = _nf4_batch_rows(r)
        per = "; ".join(f"batch {x['batch']}: " + " / ".join(f"{x[key]:.1f} {how}" for key, how in _NF4_KERNELS
                                                             if key in x)
                        + f" against {x['nf4_bitsandbytes']:.1f} tok/s ({x['glmkit_over_bitsandbytes']:.2f}x; bf16 "
                          f"{x['bf16']:.1f})" for x in rows)
        text = (f"A 4-bit model by batch size on {measured_on(r)} (`nf4_batch.json`, one run; "
                f"{r['method'].split(';')[0]}): GLM-4-9B in nf4 through glmkit's per-row kernel (a program per row: "
                f"every row pays its own lookups) and its tensor-core kernel (each weight looked up once for all rows, "
                f"the products on the tensor cores), the layers compiled around them, against bitsandbytes' "
                f"`matmul_4bit` (its one-token kernel at batch 1, dequantize-then-GEMM above; eager layers): {per}.")
        both = [x for x in rows if "nf4_rows" in x and "nf4_tensor_cores" in x]
        overtakes = next((x["batch"] for x in both if x["nf4_tensor_cores"] > x["nf4_rows"]), None)
        if overtakes is not None:
            text += (f" The tensor-core kernel is faster from batch {overtakes}: the per-row kernel runs up to "
                     f"{ROW_KERNEL_MAX_VECTORS} rows (`ROW_KERNEL_MAX_VECTORS`) and the tensor-core kernel above (on "
                     f"GPUs where glmkit's CUDA kernel runs, 2-{MMA_MAX_VECTORS} rows take that instead: next).")
        if rows and all(x["glmkit_over_bitsandbytes"] > 1 for x in rows):
            text += (f" glmkit's kernels are faster than bitsandbytes' at every size measured; `FastDecoder` uses them "
                     f"up to {FOUR_BIT_MAX_BATCH} rows (`FOUR_BIT_MAX_BATCH`).")
        if rows:
            last = rows[-1]
            text += f" At batch {last['batch']} nf4 decodes at {_triton_best(last) / last['bf16']:.2f}x bf16's speed."
        return text
    return from_result("nf4_batch", render, what="A 4-bit model by batch size", script="benchmarks/nf4_batch.py")


def nf4_batch_table() -> Table | Text:
    """``nf4_batch.json`` as a table: tok/s per batch size for each path."""
    r = load("nf4_batch")
    if r is None or not _nf4_batch_rows(r):
        return Text("A 4-bit model by batch size: not measured yet (run benchmarks/nf4_batch.py on a GPU).")
    rows = [[x["batch"], _tok_s(x, "nf4_rows"), _tok_s(x, "nf4_tensor_cores"), f"{x['nf4_bitsandbytes']:.1f}",
             f"{x['glmkit_over_bitsandbytes']:.2f}x", f"{x['bf16']:.1f}"] for x in _nf4_batch_rows(r)]
    return table(["batch", "nf4, glmkit per row (tok/s)", "nf4, glmkit tensor cores (tok/s)",
                  "nf4, bitsandbytes' (tok/s)", "glmkit's best / bitsandbytes", "bf16 (tok/s)"], rows,
                 caption=f"GLM-4-9B decode by batch size, {measured_on(r)}, `nf4_batch.json`")


def _mma_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in _nf4_batch_rows(r) if "nf4_mma" in row]


def _triton_best(row: dict[str, Any]) -> float:
    return max(row.get("nf4_rows", 0.0), row.get("nf4_tensor_cores", 0.0))


def nf4_mma_sentence() -> Text:
    """2-8 rows of a 4-bit model through glmkit's CUDA tensor-core kernel (``glmkit.gemv4bit_mma``) against the Triton
    kernels and bf16, decoding in one run (``nf4_batch_mma.json``), and per projection (``nf4_mma.json``)."""
    def render(r: dict[str, Any]) -> str:
        rows = _mma_rows(r)
        per = "; ".join(f"batch {x['batch']}: {x['nf4_mma']:.0f} tok/s against {_triton_best(x):.0f} "
                        f"({x['nf4_mma'] / _triton_best(x):.2f}x; bf16 {x['bf16']:.0f})" for x in rows)
        text = (f"On GPUs of compute capability 8.0+, 2 to {MMA_MAX_VECTORS} rows of a 4-bit model take a CUDA kernel "
                f"(`glmkit.gemv4bit_mma`, compiled at run time by NVRTC) that looks each packed byte up once, into a "
                f"register of a tensor-core operand, for all rows; GLM-4-9B in nf4 on {measured_on(r)} "
                f"(`nf4_batch_mma.json`, one run, tok/s summed over the batch) against the Triton kernels' best: "
                f"{per}.")
        if rows and all(x["nf4_mma"] > x["bf16"] for x in rows):
            text += (" From 2 rows, nf4 now decodes faster than bf16 "
                     f"({min(x['nf4_mma'] / x['bf16'] for x in rows):.2f}-"
                     f"{max(x['nf4_mma'] / x['bf16'] for x in rows):.2f}x).")
        proj = load("nf4_mma")
        if proj:
            ratios = {x["vectors"]: [] for x in proj["projections"]}
            for x in proj["projections"]:
                ratios[x["vectors"]].append(x["mma_over_triton"])
            many = [v for k, vs in ratios.items() if k > 1 for v in vs]
            text += (f" Per projection (`nf4_mma.json`, same card): {min(many):.2f}-{max(many):.2f}x the Triton "
                     f"kernels at 2-8 vectors, but {min(ratios[1]):.2f}-{max(ratios[1]):.2f}x at one vector: batch 1 "
                     f"stays on the Triton kernel.")
        ncu = load("nf4_mma_ncu")
        if ncu:
            one = next(x for x in ncu["rows"] if x["vectors"] == 1)
            stalls = one["stalls per issued instruction"]
            text += (f" At one vector its gate_up keeps DRAM {one['DRAM Throughput %']:.0f}% busy, and its warps "
                     f"({one['Achieved Active Warps Per SM warp']:.0f} an SM) wait mostly on their loads from memory "
                     f"({stalls['long_scoreboard']:.1f} cycles per issued instruction; Nsight Compute, "
                     f"`nf4_mma_ncu.json`).")
        stream = load("nf4_stream")
        if stream:
            last = list(stream["versions"].values())[-1]
            one = last["projections_1_vector"]
            text += (" A layout for one vector that keeps every SM busy to the end, each warp streaming its own share "
                     "of the weight through shared memory, was slower still over a layer (`nf4_stream.json`, another "
                     f"run, each projection at its best launch shape): "
                     f"{sum(p['stream_best_us'] for p in one.values()):.1f} against "
                     f"{sum(p['triton_us'] for p in one.values()):.1f} µs; reading alone, it took "
                     f"{_fixed_us(last['pieces_of_4_8_16_blocks']):.1f} µs a launch that does not grow with the weight "
                     "(the line through the smallest and the largest projection's times).")
        return text
    return from_result("nf4_batch_mma", render, what="4-bit decoding of 2-8 rows on the tensor cores",
                       script="benchmarks/nf4_batch.py --sizes 1 2 4 8 16 --name nf4_batch_mma")


FUSED_LABELS = {"fused": "nf4, norms folded (Triton kernel)", "fused, PDL": "nf4, norms folded, with PDL",
                "compiled layer": "nf4, compiled layer, norms apart", "bf16": "bf16 (the default)"}


def _rows_by_variant(r: dict[str, Any], key: str = "rows") -> dict[str, dict[str, Any]]:
    return {row["variant"]: row for row in r[key]}


def _less(new: float, old: float) -> str:
    return f"{(1 - new / old) * 100:.1f}%"


def nf4_fused_sentence() -> Text:
    """One sequence in 4 bits: the step with its norms and residual adds folded into the 4-bit GEMVs and two tiles of
    rows a program, against the compiled layer and bf16, in one run (``nf4_fused_paired.json``); with what each
    change gave in its own run (``nf4_fused.json``, ``nf4_paired.json``, ``nf4_paired_gate_up.json``)."""
    def render(r: dict[str, Any]) -> str:
        v = _rows_by_variant(r)
        fused, compiled, pdl, bf16 = v["fused"], v["compiled layer"], v["fused, PDL"], v["bf16"]
        saved = _less(fused["best_replay_us"], compiled["best_replay_us"])
        text = (f"One sequence of GLM-4-9B in nf4 on {measured_on(r)} (`nf4_fused_paired.json`, one run, best of "
                f"{r['rounds']} rounds taking turns): the batch-1 step through glmkit's Triton kernel, with each "
                f"RMSNorm and residual add folded into the 4-bit GEMVs (`gemv_4bit_residual` writes the next norm's "
                f"`x·g` and sums of `x²`, "
                f"`gemv_4bit_normed` multiplies its sums by `1/rms`), uncompiled, decodes **{fused['best_tok_s']:.1f} "
                f"tok/s**, {fused['over_bf16']:.2f}x bf16's fast path ({bf16['best_tok_s']:.1f}) and "
                f"{fused['fraction_of_roofline'] * 100:.0f}% of nf4's roofline; the CUDA graph of a step takes "
                f"{fused['best_replay_us']:.0f} µs against {compiled['best_replay_us']:.0f} for the layer compiled "
                f"around the 4-bit ops with its norms as kernels of their own ({saved} "
                f"less). Programmatic dependent launch made it slower "
                f"({pdl['best_replay_us']:.0f} µs), so a 4-bit decoder leaves it off on this path (the batch-1 CUDA "
                f"kernel, next, takes it). Its logits after one step differ "
                f"from the compiled layer's by {fused['step_logits_rel_diff'] * 100:.1f}% (relative), and "
                f"{fused['tokens_as_compiled']} of its {fused['of']} greedy tokens equal the compiled layer's.")
        accuracy = _bf16_accuracy()
        if accuracy:
            text += (f" For scale, bf16's own logits differ from fp32's by "
                     f"{accuracy['rel_diff_to_fp32_median'] * 100:.1f}% (median of {accuracy['steps']} steps; "
                     "`gemv_accuracy.json`, another run, random weights of the same architecture). On the trained "
                     "tiny model the folded step gives `generate()`'s greedy tokens "
                     "(`tests/test_fast_decode_quantized.py`, and on the GPU `benchmarks/gpu_smoke_4bit.py`).")
        paired = load("nf4_paired")
        if paired:
            best = {(x["projection"], x["paired"]): x["best"]["us"] for x in paired["projections"]}
            per = ", ".join(f"{name} {best[(name, 0)]:.1f} → {best[(name, 1)]:.1f} µs"
                            for name in dict.fromkeys(n for n, _ in best))
            d = _rows_by_variant(paired, "decode")
            text += (f" Two tiles of rows a program, half the weight apart, share each thread's x (the 4-bit kernel "
                     f"had been held back by x's reads through L1, above): in their own run (`nf4_paired.json`, the "
                     f"best of ten launch shapes each) {per}, and the step "
                     f"{_less(d['paired']['best_replay_us'], d['one tile']['best_replay_us'])} less time.")
        gate_up = load("nf4_paired_gate_up")
        if gate_up:
            d = _rows_by_variant(gate_up, "decode")
            b = {x["paired"]: x["best"]["us"] for x in gate_up["projections"]}
            text += (f" The SwiGLU kernel already shares x between its gate and up rows; a second pair of them was no "
                     f"faster ({b[1]:.1f} against {b[0]:.1f} µs, `nf4_paired_gate_up.json`) and the step slower "
                     f"({d['four tiles']['best_replay_us']:.0f} against {d['two tiles']['best_replay_us']:.0f} µs).")
        return text
    return from_result("nf4_fused_paired", render, what="One sequence in 4 bits",
                       script="benchmarks/nf4_fused.py --name nf4_fused_paired")


def nf4_fused_table() -> Table | Text:
    """``nf4_fused_paired.json`` as a table: per variant of the batch-1 step, µs a step, tok/s, against bf16 and the
    roofline, and greedy tokens against the compiled layer's."""
    r = load("nf4_fused_paired")
    if r is None:
        return nf4_fused_sentence()
    rows = [[FUSED_LABELS.get(x["variant"], x["variant"]), f"{x['best_replay_us']:.0f}", f"{x['best_tok_s']:.1f}",
             f"{x['over_bf16']:.2f}x", f"{x['fraction_of_roofline'] * 100:.0f}%",
             f"{x['tokens_as_compiled']} of {x['of']}" if "tokens_as_compiled" in x else "-"] for x in r["rows"]]
    return Table(["batch-1 step", "µs a step (CUDA graph)", "tok/s", "/ bf16", "of its roofline",
                  "greedy tokens as the compiled layer's"], rows,
                 caption=f"GLM-4-9B, one sequence, {measured_on(r)}, `nf4_fused_paired.json` (one run)")


def nf4_fused_chart() -> Any:
    """Batch-1 tok/s per variant of the step (``nf4_fused_paired.json``), with each precision's roofline as a dashed
    line; ``None`` before the file exists."""
    return _step_variants_chart("nf4_fused_paired", FUSED_LABELS)


def _step_variants_chart(name: str, labels: dict[str, str]) -> Any:
    """Batch-1 tok/s per variant of a one-sequence step run (``nf4_fused.py``, ``nf4_one_step.py``: rows by variant,
    bf16's among them), nf4's and bf16's side by side, each precision's roofline dashed; ``None`` before it exists."""
    r = load(name)
    if r is None:
        return None
    groups = {"nf4": {labels[x["variant"]]: x["best_tok_s"] for x in r["rows"] if x["precision"] == "nf4"},
              "bf16": {labels["bf16"]: _rows_by_variant(r)["bf16"]["best_tok_s"]}}
    return _grouped_bars(groups, ylabel="decode tok/s, batch 1", references=r["roofline_tok_s"],
                         reference_label="roofline (copy bandwidth / bytes a token reads)",
                         title=f"GLM-4-9B, one sequence, {measured_on(r)}")


ONE_LABELS = {"CUDA kernel": "nf4, CUDA kernel (the default: PDL)",
              "CUDA kernel, plain launches": "nf4, CUDA kernel, plain launches", "Triton kernel": "nf4, Triton kernel",
              "CUDA kernel, compiled layer": "nf4, CUDA kernel, compiled layer", "bf16": "bf16 (the default)"}


def nf4_one_sentence() -> Text:
    """One sequence in 4 bits through the batch-1 CUDA kernel (``glmkit.gemv4bit_one``): the step against the same
    kernel launched plainly, the Triton kernel and bf16 in one run (``NF4_ONE_RUN``), the four projections in
    another (``nf4_one.json``, with what bounds them), and what Nsight Compute saw (``nf4_one_ncu.json``)."""
    def render(r: dict[str, Any]) -> str:
        v = _rows_by_variant(r)
        one, plain, tri = v["CUDA kernel"], v["CUDA kernel, plain launches"], v["Triton kernel"]
        compiled, bf16 = v["CUDA kernel, compiled layer"], v["bf16"]
        text = (f"One sequence of GLM-4-9B in nf4 on {measured_on(r)} (`{NF4_ONE_RUN}.json`, one run, best of "
                f"{r['rounds']} rounds taking turns): through glmkit's batch-1 CUDA kernel (`glmkit.gemv4bit_one`: "
                f"each warp copies its rows into shared memory with `cp.async`, one shared-memory load, at an address "
                f"that one byte permute forms, turns a byte into an operand of the tensor cores' `mma`, x held in "
                f"registers for rows of 4096 columns, norms and residual adds folded in as before), each launch "
                f"started with programmatic dependent launch (it "
                f"fetches its first weights and writes its lookup table while the kernel before ends, then waits "
                f"for it and reads x once a CTA), the step decodes **{one['best_tok_s']:.1f} tok/s**, "
                f"{one['over_bf16']:.3f}x bf16's fast path ({bf16['best_tok_s']:.1f} tok/s, "
                f"{bf16['fraction_of_roofline'] * 100:.0f}% of its roofline"
                f"{', its MLP one CUDA kernel' if bf16.get('mlp_kernel') else ''}) and "
                f"{one['fraction_of_roofline'] * 100:.0f}% of nf4's roofline, against {plain['best_tok_s']:.1f} tok/s "
                f"({plain['over_bf16']:.2f}x) with the same kernels launched plainly and "
                f"{tri['best_tok_s']:.1f} tok/s ({tri['over_bf16']:.2f}x) through the Triton kernel; a step's CUDA "
                f"graph takes {one['best_replay_us']:.0f} µs against {plain['best_replay_us']:.0f} plainly "
                f"({_less(one['best_replay_us'], plain['best_replay_us'])} less) and {tri['best_replay_us']:.0f} "
                f"through the Triton kernel (the layer compiled around the 4-bit ops: "
                f"{compiled['best_replay_us']:.0f}). Launched plainly its logits are the same bits "
                f"(difference {plain['step_logits_rel_diff_to_default']:.1g}); they differ from the Triton kernel's "
                f"by {one['step_logits_rel_diff_to_triton'] * 100:.1f}% and {one['tokens_as_triton']} of {one['of']} "
                f"greedy tokens are the same (random weights{_bf16_scale()}); on the trained tiny model it gives "
                f"`generate()`'s greedy tokens (`benchmarks/gpu_smoke_4bit.py`), and split over two GPUs the same "
                f"tokens as on one (`benchmarks/gpu_smoke_split2.py`). " + _twice_bf16(one, bf16))
        text += _x_regs_sentence() + _leave_sms_sentence() + _other_cards()
        proj = load("nf4_one")
        if proj:
            keys = _one_variants(proj)
            per = ", ".join(f"{p['projection']} " + " → ".join(f"{p[key]['us']:.1f}" for key in keys) + " µs "
                            f"({p[keys[-1]]['fraction_of_copy_bandwidth'] * 100:.0f}% of copy bandwidth)"
                            for p in proj["projections"])
            layer = proj["layer_us"]
            order = "the Triton kernel → the CUDA kernel launched plainly" + \
                (" → with programmatic dependent launch, back to back" if len(keys) == 3 else "")
            four = " → ".join(f"{layer[key]:.1f}" for key in keys)
            text += (f" Per projection, folded as the step runs them (`nf4_one.json`, another run; {order}): {per}; a "
                     f"layer's four {four} µs.")
            bounds = next((e["bounds_us"] for e in proj.get("earlier_versions", []) if "bounds_us" in e), None)
            if bounds:
                text += (f" For scale, in launches of their own a plain read of the same bytes takes "
                         f"{sum(b['plain_read'] for b in bounds.values()):.1f} µs a layer, and the kernel's copies "
                         f"alone (its sums skipped, an earlier version) "
                         f"{sum(b['copies_only'] for b in bounds.values()):.1f}.")
        ncu = load("nf4_one_ncu")
        if ncu:
            g = {x["projection"]: x for x in ncu["rows"]}["gate_up"]
            stall, per_issue = next(iter(g["stalls per issued instruction"].items()))
            text += (f" Nsight Compute on gate_up (`nf4_one_ncu.json`, an earlier version: x copied with "
                     f"each stage, plain launches): DRAM {g['DRAM Throughput %']:.0f}% busy, "
                     f"{g['Issued Warp Per Scheduler']:.2f} instructions issued per scheduler a cycle, and its warps "
                     f"wait most on `{stall}` ({per_issue:.2f} cycles per issued instruction), the queue of "
                     f"shared-memory instructions: its shared-memory loads, mostly the lookups, are "
                     f"{g['smsp__inst_executed_op_shared_ld.sum inst'] / g['smsp__inst_executed.sum inst'] * 100:.0f}% "
                     f"of its instructions." + _ncu_x_regs(g))
        return text

    return from_result(NF4_ONE_RUN, render, what="One sequence in 4 bits through the batch-1 CUDA kernel",
                       script="benchmarks/nf4_one_step.py")


# what a warp waits on, per Nsight Compute stall reason
STALLS = {"mio_throttle": "the queue of shared-memory instructions",
          "wait": "the fixed latency of an instruction it depends on",
          "long_scoreboard": "a load through L1TEX, from global memory",
          "short_scoreboard": "a shared-memory load's data",
          "barrier": "the other warps of its group", "math_pipe_throttle": "the tensor cores"}


def _ncu_x_regs(before: dict[str, Any]) -> str:
    """Nsight Compute on gate_up with x held in registers (``nf4_one_ncu_x_regs.json``) against ``before`` (the
    earlier version's gate_up row), or ''."""
    r = load("nf4_one_ncu_x_regs")
    if r is None:
        return ""
    g = {x["projection"]: x for x in r["rows"]}["gate_up"]
    stalls = g["stalls per issued instruction"]
    top = sorted((name for name in stalls if name not in ("selected", "not_selected")), key=stalls.get,
                 reverse=True)[:2]  # (a warp issuing, or eligible but another issued: not waits)
    waits = " and ".join(f"`{name}` ({stalls[name]:.2f}" + (f", {STALLS[name]}" if name in STALLS else "") + ")"
                         for name in top)
    wavefronts = "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"
    return (f" The same profile of the kernel as it is now, x held in registers (`nf4_one_ncu_x_regs.json`), against "
            f"that earlier version (two changes before: the version between read x into shared memory once a CTA "
            f"and from there at every stage): {g[wavefronts] / 1e6:.2f} M shared-memory load wavefronts on gate_up against "
            f"{before[wavefronts] / 1e6:.2f} M, DRAM {g['DRAM Throughput %']:.0f}% busy against "
            f"{before['DRAM Throughput %']:.0f}%, `mio_throttle` {stalls['mio_throttle']:.2f} cycles per issued "
            f"instruction against {before['stalls per issued instruction']['mio_throttle']:.2f}; its warps now wait "
            f"most on {waits}.")


def _twice_bf16(one: dict[str, Any], bf16: dict[str, Any]) -> str:
    """How the step stands against twice bf16's speed, in decode tok/s and in the step's CUDA graph."""
    margin = bf16["best_replay_us"] / 2 - one["best_replay_us"]
    where = "under" if margin >= 0 else "over"
    return (f"Against twice bf16's speed: {one['over_bf16']:.3f}x in decode tok/s, and the step's graph "
            f"{abs(margin):.0f} µs {where} half of bf16's ({bf16['best_replay_us'] / 2 / 1e3:.2f} ms, "
            f"{one['replay_over_bf16']:.3f}x).")


LEAVE_LABELS = {"nf4, before": "the version before those", "nf4, SMs left to the attention": "q/k/v leaving SMs",
                "nf4, SMs left, early tiles": "+ the attention's tiles of 256",
                "nf4 (default): also the first stream in one kernel": "+ the first norm's stream in one kernel"}
LEAVE_DEFAULT = "nf4 (default): also the first stream in one kernel"


X_REGS_NOW, X_REGS_BEFORE = "nf4, x in registers", "nf4"  # nf4_x_regs.json's variants: the kernel now, and before


def _x_regs_sentence() -> str:
    """What holding x in registers gave (``nf4_x_regs.json``, variants taking turns), or ''."""
    r = load("nf4_x_regs")
    if r is None:
        return ""
    v = _rows_by_variant(r)
    now, before = v[X_REGS_NOW], v[X_REGS_BEFORE]
    alone = {(a["projection"], a["x_regs"]): a["us_pdl"] for a in r["alone"]}
    gate_up = [min(us for (p, x), us in alone.items() if p == "gate_up" and x == held) for held in (True, False)]
    return (f" Holding x in registers (`nf4_x_regs.json`, another run, variants taking turns): each lane keeps its "
            f"part of a chunk of x in registers, the four lanes of a column holding its 64 values, one column of the "
            f"tensor cores' operand for each chunk, so for rows of 4096 columns no stage reads x from shared memory, "
            f"whose queue held the kernel back; a step's graph takes {now['best_replay_us']:.0f} µs against "
            f"{before['best_replay_us']:.0f} with x read from shared memory at every stage "
            f"({_less(now['best_replay_us'], before['best_replay_us'])} less; gate_up alone {gate_up[0]:.1f} against "
            f"{gate_up[1]:.1f} µs), nf4 {now['best_tok_s']:.1f} tok/s against {before['best_tok_s']:.1f} "
            f"({now['over_bf16']:.3f}x against {before['over_bf16']:.3f}x bf16's {v['bf16']['best_tok_s']:.1f}). "
            f"Its sums are added in another order: {now['tokens_as_shipped']} of {now['of']} greedy tokens agree with "
            f"the kernel before's on the random weights (logits {now['first_logits_rel_diff'] * 100:.1f}% apart).")


def _leave_sms_sentence() -> str:
    """What each of the step's last three changes gave (``nf4_leave_sms.json``, variants taking turns), or ''."""
    r = load("nf4_leave_sms")
    if r is None:
        return ""
    v = _rows_by_variant(r)
    steps = " → ".join(f"{label} {v[name]['best_tok_s']:.1f}" for name, label in LEAVE_LABELS.items())
    return (f" Earlier steps to it (`nf4_leave_sms.json`, another run, variants taking turns; tok/s): {steps}"
            f", against bf16's {v['bf16']['best_tok_s']:.1f} ({v['nf4, before']['over_bf16']:.2f}x → "
            f"{v[LEAVE_DEFAULT]['over_bf16']:.2f}x). With programmatic dependent launch q/k/v leaves an SM to each of "
            f"the decode attention's few programs, which then start while it runs and read their cache tiles "
            f"meanwhile; bf16's q/k/v, then the Triton GEMV, left none, and the tiles of 256 alone made its step "
            f"slower ({v['bf16, tiles of 256']['best_tok_s']:.1f} tok/s); it now leaves them too, through a CUDA "
            f"kernel of its own (*bf16 q/k/v and o_proj on the tensor cores*).")


def _card_run(run: dict[str, Any], where: str) -> str:
    """One card's run of the 4-bit step (a ``bf16_nf4_runs`` row): bf16's tok/s and share of its roofline, nf4's
    tok/s and the ratio."""
    mlp = ", its MLP one kernel" if run["bf16_mlp"] == MLP_ONE else ""
    return (f"bf16 {run['bf16_tok_s']:.1f} tok/s ({run['bf16_share'] * 100:.1f}% of its roofline{mlp}), "
            f"nf4 {run['nf4_tok_s']:.1f}: **{run['ratio']:.3f}x** {where}")


def _other_cards() -> str:
    """The same kernels in the other runs of the kernel as it is now (``bf16_nf4_runs``: ``X_IN_REGISTERS`` but
    ``NF4_ONE_RUN``), those that exist; or ''."""
    here = set(_gpu_uuids(NF4_ONE_RUN))

    def where(name: str) -> str:  # another card only where both runs name theirs and none is shared
        cards = set(_gpu_uuids(name))
        return "another H200" if here and cards and not here & cards else "another run"

    runs = [_card_run(r, f"(`{r['name']}.json`, {where(r['name'])})")
            for r in bf16_nf4_runs() if r["kernel"] == KERNEL_NOW and r["name"] != NF4_ONE_RUN]
    if not runs:
        return ""
    why = " (bf16's share also with each card's read / copy bandwidth: *Why H200s differ*)" if card_bandwidth_runs() \
        else ""
    return (f" The ratio and bf16's share of its roofline move from run to run and card to card{why}; the same "
            "kernels in other runs: " + "; ".join(runs) + "; the runs of the kernel before are in *bf16 and nf4 in "
            "the same run, run after run*.")


def _gpu_uuids(name: str) -> list[str]:
    """The cards a result names (``gpu_uuids``, read with nvidia-smi where the run was made), or []."""
    return (load(name) or {}).get("gpu_uuids", [])


GREEDY_BEFORE, GREEDY_IN_STEP = "argmax after the step", "greedy in the step"  # greedy_tail.json's two loops


def _greedy_rows(r: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``greedy_tail.json``'s rows by (precision, loop)."""
    return {(row["precision"], row["loop"]): row for row in r["rows"]}


def _gain(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.1f}%"


def greedy_tail_table() -> Table | Text:
    """``greedy_tail.json`` as a table: per precision, greedy decode tok/s with the argmax after the step and with
    the pick inside it (``glmkit.greedy``), without and with an end-token check every token; or "not measured"."""
    def render(r: dict[str, Any]) -> Table:
        g = _greedy_rows(r)

        def gain(p: str, loop: str, key: str) -> str:
            return "-" if loop == GREEDY_BEFORE else _gain(g[(p, loop)][key], g[(p, GREEDY_BEFORE)][key])

        rows = [[p, loop, f"{row['best_tok_s']:.1f}", gain(p, loop, "best_tok_s"),
                 f"{row['best_tok_s_eos_check']:.1f}", gain(p, loop, "best_tok_s_eos_check"),
                 f"{row['fraction_of_roofline'] * 100:.1f}%", f"{row['tokens_as_argmax_after']}/{row['of']}"]
                for (p, loop), row in g.items()]
        return table(["precision", "greedy loop", "tok/s", "gain", "tok/s, end-token check", "gain",
                      "of roofline", "same tokens"], rows,
                     caption=f"One run, {measured_on(r)} (`greedy_tail.json`, variants taking turns, best of "
                             f"{r['rounds']}): GLM-4-9B at batch 1, {r['prompt']}-token prompt, {r['new_tokens']} "
                             f"new tokens")

    return from_result("greedy_tail", render, what="The greedy pick inside the step", script="benchmarks/greedy_tail.py")


def greedy_tail_sentence() -> Text:
    """What picking the greedy token inside the step gave (``greedy_tail.json``), in one paragraph; or "not
    measured"."""
    def render(r: dict[str, Any]) -> str:
        g = _greedy_rows(r)
        nf4, bf16 = g[("nf4", GREEDY_IN_STEP)], g[("bf16", GREEDY_IN_STEP)]

        def gains(key: str) -> str:
            return ", ".join(f"{p} {g[(p, GREEDY_BEFORE)][key]:.1f} → {g[(p, GREEDY_IN_STEP)][key]:.1f} tok/s "
                             f"({_gain(g[(p, GREEDY_IN_STEP)][key], g[(p, GREEDY_BEFORE)][key])})"
                             for p in ("nf4", "bf16"))

        return (f"Greedy decoding used to take each token's argmax after the step's CUDA graph, then write the token "
                f"and its position for the next step: five small kernels between two graphs. The step now picks the "
                f"token itself, in one kernel at its end (`glmkit.greedy`: each program the largest logit of a block "
                f"of the vocabulary, the last to finish the row's token and position), and `FastDecoder.decode_greedy`"
                f" replays the next step at once. On {measured_on(r)} (`greedy_tail.json`, one run, variants taking "
                f"turns): {gains('best_tok_s')}; the same {nf4['tokens_as_argmax_after']} of {nf4['of']} greedy "
                f"tokens. With an end-token check every token, as `generate()` and a chat do (it waits for the "
                f"token; the loop before queued the next step only after it, the loop now before it): "
                f"{gains('best_tok_s_eos_check')}. There nf4 decodes {nf4['over_bf16_same_loop']:.3f}x bf16, "
                f"which reaches {bf16['fraction_of_roofline'] * 100:.1f}% of its roofline.")

    return from_result("greedy_tail", render, what="The greedy pick inside the step", script="benchmarks/greedy_tail.py")


def _bf16_accuracy() -> dict[str, Any] | None:
    """How far the bf16 fast path's logits are from fp32's (``gemv_accuracy.json``'s bf16 row), or None before it
    exists: the scale the 4-bit steps' logit differences are given against."""
    accuracy = load("gemv_accuracy")
    return accuracy["variants"][0] if accuracy else None


def _bf16_scale() -> str:
    """For scale: how far bf16's own logits are from fp32's, or nothing before it is measured."""
    bf16 = _bf16_accuracy()
    if not bf16:
        return ""
    return (f"; for scale, bf16's logits differ from fp32's by {bf16['rel_diff_to_fp32_median'] * 100:.1f}%, "
            f"`gemv_accuracy.json`")


def nf4_one_table() -> Table | Text:
    """``nf4_one.json`` as a table: per projection at one token, folded as the step runs it, the Triton kernel
    against the batch-1 CUDA kernel launched plainly and with programmatic dependent launch (µs, fraction of copy
    bandwidth)."""
    r = load("nf4_one")
    if r is None:
        return nf4_one_sentence()
    keys = _one_variants(r)
    last = "CUDA kernel, PDL" if len(keys) == 3 else "CUDA kernel"
    rows = [[p["projection"], f"{p['rows']}×{p['columns']}", f"{p['packed_bytes'] / 1e6:.1f}",
             *[f"{p[key]['us']:.1f}" for key in keys], f"{p['triton_folded']['us'] / p[keys[-1]]['us']:.2f}x",
             f"{p[keys[-1]]['fraction_of_copy_bandwidth'] * 100:.0f}%"] for p in r["projections"]]
    return table(["projection", "weight", "packed MB", "Triton kernel (µs)", "CUDA kernel (µs)",
                  *(["CUDA kernel, PDL (µs)"] if len(keys) == 3 else []),
                  "speed-up (PDL)" if len(keys) == 3 else "speed-up", f"{last}, of copy bandwidth"], rows,
                 caption=f"GLM-4-9B nf4 at one token, {measured_on(r)}, `nf4_one.json` (CUDA graphs, one run)")


def _one_variants(r: dict[str, Any]) -> list[str]:
    """The folded timings of ``nf4_one.json``'s projections, slowest kernel first: the Triton kernel, the CUDA kernel
    launched plainly, and with programmatic dependent launch where the GPU that ran it has it."""
    pdl = all("one_folded_pdl" in p for p in r["projections"])
    return ["triton_folded", "one_folded", *(["one_folded_pdl"] if pdl else [])]


def nf4_one_chart() -> Any:
    """Batch-1 tok/s of the step per kernel (``NF4_ONE_RUN``), with each precision's roofline dashed; ``None``
    before the file exists."""
    return _step_variants_chart(NF4_ONE_RUN, ONE_LABELS)


def _fixed_us(rows: list[dict[str, Any]]) -> float:
    """The time of a launch that does not grow with the weight: the line through the stream layout's reads-only
    times (its first launch shape) of the smallest and the largest projection, against their roofline times."""
    key = next(k for k in rows[0] if k.endswith("reads only"))
    small, large = min(rows, key=lambda r: r["roofline_us"]), max(rows, key=lambda r: r["roofline_us"])
    slope = (large[key] - small[key]) / (large["roofline_us"] - small["roofline_us"])
    return small[key] - slope * small["roofline_us"]


def nf4_mma_table() -> Table | Text:
    """``nf4_batch_mma.json`` as a table: tok/s per batch size, the CUDA kernel against the Triton kernels and bf16."""
    r = load("nf4_batch_mma")
    if r is None or not _mma_rows(r):
        return Text("4-bit decoding of 2-8 rows on the tensor cores: not measured yet (run benchmarks/nf4_batch.py "
                    "--sizes 1 2 4 8 16 --name nf4_batch_mma on a GPU).")
    rows = [[x["batch"], f"{x['nf4_mma']:.1f}", f"{_triton_best(x):.1f}", f"{x['nf4_mma'] / _triton_best(x):.2f}x",
             f"{x['bf16']:.1f}", f"{x['nf4_mma'] / x['bf16']:.2f}x"] for x in _mma_rows(r)]
    return table(["batch", "nf4, CUDA kernel (tok/s)", "nf4, Triton kernels' best (tok/s)", "CUDA / Triton",
                  "bf16 (tok/s)", "nf4 CUDA / bf16"], rows,
                 caption=f"GLM-4-9B decode of 2-8 rows, {measured_on(r)}, `nf4_batch_mma.json`")


def nf4_mma_chart() -> Any:
    """Decode tok/s of 2-8 rows (``nf4_batch_mma.json``): nf4 through the CUDA tensor-core kernel, through the Triton
    kernels' best, and bf16, a group per batch size; ``None`` before the file exists."""
    r = load("nf4_batch_mma")
    if r is None or not _mma_rows(r):
        return None
    groups = {f"batch {x['batch']}": {"nf4, CUDA tensor-core kernel": x["nf4_mma"],
                                      "nf4, Triton kernels' best": _triton_best(x), "bf16": x["bf16"]}
              for x in _mma_rows(r)}
    return _grouped_bars(groups, ylabel="decode tok/s, summed over the batch",
                         title=f"GLM-4-9B, 2-8 sequences at once, {measured_on(r)}")


def _grouped_bars(groups: dict[str, dict[str, float]], *, ylabel: str, title: str,
                  references: dict[str, float] | None = None, reference_label: str = "", log: bool = False) -> Any:
    """Bars ``{group: {bar: value}}`` side by side per group, with an optional dashed line over each group
    (``log=True``: a log scale, for groups of very different sizes)."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(b for bars in groups.values() for b in bars))
    width = 0.8 / max(max(len(bars) for bars in groups.values()), 1)
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2))
    for i, bars in enumerate(groups.values()):  # each group's bars centred on it
        for j, (name, value) in enumerate(bars.items()):
            bar = ax.bar(i + (j - (len(bars) - 1) / 2) * width, value, width=width, color=colors[name],
                         label=name if name not in ax.get_legend_handles_labels()[1] else None)
            ax.bar_label(bar, fmt="%.1f", fontsize=7)
    for i, group in enumerate(groups):
        if references and group in references:
            ax.hlines(references[group], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                      label=reference_label if i == 0 else None)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below: the bars fill the top
    fig.tight_layout()
    return fig


def nf4_decode_chart() -> Any:
    """Batch-1 decode tok/s per precision, plain ``generate()`` vs the fast path's kernels, with each precision's
    roofline (``nf4_decode.json``); ``None`` before it exists."""
    r = load("nf4_decode")
    if r is None:
        return None
    groups: dict[str, dict[str, float]] = {}
    roofs: dict[str, float] = {}
    for precision, path, tok_s, roof in nf4_decode_rows(r):
        how = path.split(" ", 1)[1] if path.startswith(precision) else "plain generate()"
        groups.setdefault(precision, {})[how.replace("fast ", "fast path ")] = tok_s
        roofs[precision] = roof
    return _grouped_bars(groups, ylabel="decode tok/s, batch 1", references=roofs,
                         reference_label="roofline (copy bandwidth / bytes read per token)",
                         title=f"GLM-4-9B per precision, {measured_on(r)}; plain generate() measured for nf4")


def _nf4_projections() -> dict[str, Any] | None:
    """The newest per-projection nf4 timings in one format: ``nf4_decode.json`` where it timed glmkit's default kernel
    (its batch-1 CUDA kernel) beside the Triton one, else ``nf4_gemv.json`` (the Triton kernel; its best
    launch shape's time as ``nf4_triton_*``, bf16 Triton's bandwidth from its time and bytes, double quantization
    named), else ``nf4_decode.json`` (the earlier kernel); ``None`` before either exists."""
    today = load("nf4_decode")
    if today is not None and any("nf4_glmkit_us" in x for x in today.get("projections") or []):
        return today
    r = load("nf4_gemv")
    if r is not None and r.get("projections"):
        rows = []
        for x in r["projections"]:
            row = {**x, "projection": x["projection"] + (" (dq)" if x.get("double_quant") else ""),
                   "nf4_triton_us": _nf4_best(x)["us"], "nf4_triton_tb_s": _nf4_best(x)["tb_s"],
                   "nf4_bnb_matmul_4bit_us": x["bnb_matmul_4bit_us"], "nf4_bnb_matmul_4bit_tb_s": x["bnb_matmul_4bit_tb_s"]}
            if "bf16_triton_us" in x:
                row["bf16_triton_tb_s"] = x["bf16_bytes"] / (x["bf16_triton_us"] * 1e-6) / 1e12
            rows.append(row)
        return {**r, "projections": rows}
    r = load("nf4_decode")
    return r if r is not None and r.get("projections") else None


# the per-projection columns: key in the result, label
PROJECTION_KEYS = [("nf4_glmkit", "nf4 glmkit (default)"), ("nf4_triton", "nf4 glmkit Triton"),
                   ("nf4_bnb_matmul_4bit", "nf4 bitsandbytes"), ("bf16_cublas", "bf16 cuBLAS"),
                   ("bf16_triton", "bf16 glmkit Triton")]


def nf4_projection_table() -> Table | Text:
    """One token's matrix-vector product per projection: nf4 (glmkit's Triton, bitsandbytes) against bf16 (cuBLAS,
    glmkit's Triton), in µs and TB/s of bytes read (``nf4_gemv.json``, else ``nf4_decode.json``)."""
    r = _nf4_projections()
    if r is None:
        return not_measured("nf4 projections against bitsandbytes and bf16", "benchmarks/nf4_gemv.py")
    keys = PROJECTION_KEYS
    keys = [(k, label) for k, label in keys if any(k + "_us" in x for x in r["projections"])]
    rows = [[x["projection"], f"{x['rows']}x{x['columns']}", f"{x['nf4_bytes'] / 2**20:.1f}"]
            + [f"{x[k + '_us']:.1f} µs, {x[k + '_tb_s']:.2f} TB/s" if k + "_us" in x else "-" for k, _ in keys]
            for x in r["projections"]]
    ran = {x["projection"]: x.get("nf4_glmkit_kernel") for x in r["projections"]}
    default = ("" if keys[0][0] != "nf4_glmkit" else
               "; nf4 glmkit (default): what a one-token product runs, "
               + ("glmkit's batch-1 CUDA kernel on each" if set(ran.values()) == {"CUDA"} else
                  ", ".join(f"{name}: {kernel}" for name, kernel in ran.items())))
    return table(["projection", "shape", "nf4 MiB"] + [label for _, label in keys], rows,
                 caption=f"{measured_on(r)}: one token, TB/s of the bytes each reads (nf4: packed weights and states; "
                         f"each projection alone, in a CUDA graph over 1 GiB of copies{default})")


def nf4_projection_chart() -> Any:
    """Bandwidth each projection's one-token product reaches: nf4 (glmkit, bitsandbytes) vs bf16 (``nf4_gemv.json``,
    else ``nf4_decode.json``)."""
    r = _nf4_projections()
    if r is None:
        return None
    keys = PROJECTION_KEYS
    groups = {x["projection"]: {label: x[k + "_tb_s"] for k, label in keys if k + "_tb_s" in x} for x in r["projections"]}
    return _grouped_bars(groups, ylabel="bytes read, TB/s", title=f"one token's projections, {measured_on(r)}",
                         references={g: r["copy_bandwidth_bytes_s"] / 1e12 for g in groups},
                         reference_label="copy bandwidth")


SWEEPS = ("max_len_spans", "max_len_sweep")  # max_len_sweep.py's runs: its default name, then the run before spans


def _newest(names: Sequence[str], key: str | None = None) -> dict[str, Any] | None:
    """The committed run of ``names`` (with ``key``, if given) measured on the latest date; on the same date, the
    first named. None where there is none.

    >>> _newest(["never_measured", "decode"])["name"]
    'decode'
    """
    runs = [r for _, r in _committed(names) if key is None or r.get(key)]
    return max(runs, key=lambda r: r["environment"]["date"], default=None)  # (max keeps the first of equals)


def _sweep() -> dict[str, Any] | None:
    """The newest cache-length sweep (``SWEEPS``), or None."""
    return _newest(SWEEPS)


def _sweep_lines(r: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(precision, decoder, rows)`` per line of a sweep: with cache spans (the default since) and with one graph
    for the whole cache where the run timed both, else its default decoders."""
    if "cache_spans" not in r:  # a run from before cache spans: its decoders had one graph for the whole cache
        return [(p, "one graph for the whole cache", rows) for p, rows in r["precisions"].items()]
    return [line for p in r["precisions"] for line in ((p, "cache spans (default)", r["cache_spans"][p]),
                                                       (p, "one graph for the whole cache", r["precisions"][p]))]


def _sweep_best(lines: list[tuple[str, str, list[dict[str, Any]]]]) -> dict[str, float]:
    """Each precision's best tok/s over all its lines of a sweep (``_sweep_lines``)."""
    return {p: max(x["best_tok_s"] for q, _, rows in lines if q == p for x in rows) for p, _, _ in lines}


def max_len_table() -> Table | Text:
    """Batch-1 decode tok/s by the cache length a decoder is built for, bf16 and nf4, at the same short context,
    with cache spans and with one graph for the whole cache (``max_len_spans.json``, notebook 05); or "not
    measured"."""
    r = _sweep()
    if r is None:
        return not_measured("Speed by cache length", "benchmarks/max_len_sweep.py")
    lines = _sweep_lines(r)
    best = _sweep_best(lines)
    lengths = [x["max_len"] for x in lines[0][2]]
    rows = [[f"{n:,}"] + [f"{x['best_tok_s']:.1f} ({x['best_tok_s'] / best[p]:.0%})" for p, _, xs in lines for x in xs
                          if x["max_len"] == n] for n in lengths]
    return table(["max_len"] + [f"{p}, {d}: tok/s (of {p}'s best)" for p, d, _ in lines], rows,
                 caption=f"{measured_on(r)}: GLM-4-9B at batch 1, a decoder built for each cache length, the same "
                         f"{r['prompt']}-token prompt and {r['new_tokens']} new tokens (`{r['name']}.json`)")


def max_len_sentence() -> Text:
    """What ``max_len_table`` shows, in words: how far below its best each precision decodes at the worst cache
    length, with cache spans and with one graph for the whole cache; and the earlier sweep's worst, where there is
    one."""
    r = _sweep()
    if r is None:
        return not_measured("Speed by cache length", "benchmarks/max_len_sweep.py")
    lines = _sweep_lines(r)
    best = _sweep_best(lines)
    parts = []
    for p, decoder, rows in lines:
        worst = min(rows, key=lambda x: x["best_tok_s"])
        parts.append(f"{p} with {decoder}: {_range([x['best_tok_s'] for x in rows])} tok/s, at worst "
                     f"{worst['best_tok_s'] / best[p]:.0%} of {p}'s best ({worst['max_len']:,} positions)")
    text = (f"On {measured_on(r)} (`{r['name']}.json`), the same {r['new_tokens']} tokens after a {r['prompt']}-token "
            f"prompt, with decoders built for {lines[0][2][0]['max_len']:,} to {lines[0][2][-1]['max_len']:,} "
            f"positions: " + "; ".join(parts) + ". The decode attention's launch is chosen from the cache length (a "
            "CUDA graph replays one launch for every token); with cache spans a decoder captures its one-row step "
            "for 512, 2,048, 8,192 ... positions and its `max_len`, and each token replays the shortest that holds "
            "it.")
    engine = load("engine_spans")
    if engine is not None:
        def pair(p: str) -> str:
            on, off = (next(x for x in engine["precisions"][p] if x["cache_spans"] is spans) for spans in (True, False))
            return (f"{p} {on['best_tok_s']:.1f} tok/s with cache spans against {off['best_tok_s']:.1f} with one graph "
                    f"({on['best_tok_s'] / off['best_tok_s']:.2f}x)")
        text += (f" Through the server's engine, built for {engine['context']:,} positions, a lone request of "
                 f"{engine['new_tokens']} tokens (`engine_spans.json`, {measured_on(engine)}): "
                 + "; ".join(pair(p) for p in engine["precisions"]) + ".")
    earlier = load("max_len_sweep") if r["name"] != "max_len_sweep" else None
    if earlier is not None:
        worst = {p: min(rows, key=lambda x: x["best_tok_s"]) for p, rows in earlier["precisions"].items()}
        text += (" An earlier sweep, before two changes to that attention's launches for the shortest and the "
                 f"longest caches (`max_len_sweep.json`, {measured_on(earlier)}), fell to " + " and ".join(
                     f"{100 * x['best_tok_s'] / max(y['best_tok_s'] for y in earlier['precisions'][p]):.0f}% of its "
                     f"best in {p} ({x['max_len']:,} positions)" for p, x in worst.items()) + ".")
    return Text(text)


def max_len_chart() -> Any:
    """Decode tok/s against the cache length a decoder is built for, one line a precision and decoder (the newest
    sweep); ``None`` before one exists."""
    r = _sweep()
    if r is None:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for p, decoder, rows in _sweep_lines(r):
        ax.plot([x["max_len"] for x in rows], [x["best_tok_s"] for x in rows], "o-" if "one graph" not in decoder
                else "s--", label=f"{p}, {decoder}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("max_len (cache positions the decoder is built for)")
    ax.set_ylabel("decode tok/s, batch 1")
    ax.set_title(f"Same prompt, same tokens, {measured_on(r)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


# nf4_decode.py's runs: _newest picks one with the stage read (nf4_accuracy: its accuracy stage alone, 16 prompts)
NF4_DECODE_RUNS = ("nf4_accuracy", "nf4_decode", "nf4_decode_run2")


def nf4_long_context_clause() -> str:
    """nf4 fast decode after a 32K prompt on a card capped at 12 GiB: speed and peak memory against the planner's
    (the newest of ``NF4_DECODE_RUNS`` with that stage), and glmkit's 4-bit CUDA kernel against its Triton kernel there
    (``nf4_long_cuda.json``, ``nf4_long_triton.json``: one call, one card)."""
    r = _newest(NF4_DECODE_RUNS, "long_context")
    if r is None:
        return ("nf4 at a 32K context under a 12 GiB cap: not measured yet (run `benchmarks/nf4_decode.py --stages "
                "long_context`).")
    lc = r["long_context"]
    text = (f"nf4 fast decode after a {lc['context']:,}-token prompt on a card capped at {lc['cap_gib']:g} GiB "
            f"({lc['prefill_chunk']}-token chunks; {measured_on(r)}, `{r['name']}.json`): ")
    if not lc.get("ok"):
        return text + "out of memory."
    over = lc["peak_reserved"] / lc["planned_bytes"] - 1
    text += (f"it ran, decoding at {lc['decode_tok_s']:.1f} tok/s, with a peak of {lc['peak_reserved'] / GiB:.2f} GiB "
             f"reserved against the planner's {lc['planned_bytes'] / GiB:.2f} GiB (no CUDA context: the cap covers "
             f"PyTorch's allocator only), " + (f"{_pct(over)}: inside the cap, but above the plan." if over > 0 else
                                               f"{_pct(over)}: within the plan."))
    cuda, triton = load("nf4_long_cuda"), load("nf4_long_triton")
    if cuda and triton and cuda.get("long_context", {}).get("ok") and triton.get("long_context", {}).get("ok"):
        a, b = cuda["long_context"]["decode_tok_s"], triton["long_context"]["decode_tok_s"]
        card = "".join(f" ({u[:12]})" for u in cuda.get("gpu_uuids", [])[:1])
        text += (f" In one call on an {cuda['environment']['device']}{card}, the same stage decoded {a:.1f} tok/s with "
                 f"glmkit's batch-1 4-bit CUDA kernel and {b:.1f} with its Triton kernel: {a / b:.2f}x "
                 f"(`nf4_long_cuda.json`, `nf4_long_triton.json`).")
    return text


ACCURACY_YARDSTICK = "bf16 fast on the nf4 weights"  # nf4_decode.py's bf16 arithmetic on the nf4 weights
ACCURACY_YARDSTICK_CUBLAS = "bf16 cuBLAS on the nf4 weights"  # the same through cuBLAS (bf16 rounding in another order)
BF16_CUBLAS_PATH = "bf16 cuBLAS (eager layers)"  # nf4_decode.py's bf16 checkpoint through cuBLAS, PyTorch's roundings


NF4_TRITON_PATH = "nf4 fast (glmkit Triton kernel)"  # its nf4 decoder with the batch-1 CUDA kernel switched off


def _accuracy_run() -> dict[str, Any] | None:
    """The newest ``nf4_decode`` run with an accuracy stage (``NF4_DECODE_RUNS``), or None."""
    return _newest(NF4_DECODE_RUNS, "accuracy")


def fast_path_accuracy_table() -> Table | Text:
    """Each fast path's logits against an fp32 decoder on the same weights over teacher-forced steps (the newest
    ``nf4_decode`` run's accuracy, ``_accuracy_run``): bf16 and fp16 against the checkpoint in fp32, nf4 against its weights
    dequantized in fp32, with bf16 arithmetic on those nf4 weights as the yardstick (notebook 04); or "not measured"."""
    r = _accuracy_run()
    if r is None:
        return not_measured("The fast paths' logits against fp32", "benchmarks/nf4_decode.py --stages accuracy")
    acc = r["accuracy"]
    rows = [[path, x["against"], f"{100 * x['rel_err_median']:.2f}%",
             "–".join(f"{100 * q:.2f}%" for q in x["rel_err_quartiles"]) if "rel_err_quartiles" in x else "",
             f"{100 * x['rel_err_max']:.2f}%", f"{x['argmax_equal']} of {x['steps']}"] for path, x in acc["rows"].items()]
    prompts = acc["rows"][next(iter(acc["rows"]))]["steps"] // acc["forced_steps"]
    return table(["decoder", "against an fp32 decoder on", "logits' error, median", "middle half", "max",
                  "same greedy token"], rows,
                 caption=f"{measured_on(r)}: GLM-4-9B (random weights), {prompts} prompt(s) of {acc['forced_steps']} "
                         f"teacher-forced steps, relative L2 error of the logits (`{r['name']}.json`)")


def fast_path_accuracy_sentence() -> Text:
    """What ``fast_path_accuracy_table`` shows: nf4's error against bf16's on the same weights and against bf16's on
    its own weights, said only as the figures hold it; the Triton kernel's beside the CUDA kernel's, and why they
    differ (``nf4_code_rounding.json``)."""
    r = _accuracy_run()
    acc = (r or {}).get("accuracy", {}).get("rows")
    if not acc or ACCURACY_YARDSTICK not in acc:
        return not_measured("The fast paths' logits against fp32", "benchmarks/nf4_decode.py --stages accuracy")
    nf4, yard, triton = acc.get(NF4_DEFAULT_PATH), acc[ACCURACY_YARDSTICK], acc.get(NF4_TRITON_PATH)
    bf16 = next((x for path, x in acc.items() if path.startswith("bf16 fast (")), None)
    bnb = next((x for path, x in acc.items() if path.startswith("nf4 fast (bnb")), None)
    if nf4 is None or bf16 is None:
        return not_measured("nf4 and bf16 logits against fp32", "benchmarks/nf4_decode.py")
    med = {k: 100 * x["rel_err_median"] for k, x in (("nf4", nf4), ("yard", yard), ("bf16", bf16))}
    text = (f"On {measured_on(r)} (`{r['name']}.json`), the nf4 fast path's logits are {med['nf4']:.2f}% from an "
            f"fp32 decoder on the same nf4 weights (median of {nf4['steps']} steps), against {med['bf16']:.2f}% "
            f"for the bf16 fast path from fp32 on the checkpoint. The two run different weights, so nf4's "
            f"yardstick is bf16 arithmetic on the same nf4 weights, through bf16's fast path: {med['yard']:.2f}%. ")
    if med["nf4"] <= med["yard"]:
        text += "nf4's kernels add no error beyond what bf16 arithmetic on those weights has."
    else:
        text += f"nf4's kernels are {med['nf4'] / med['yard']:.2f}x that ({med['nf4'] - med['yard']:.2f} points more)"
        text += (f"; bitsandbytes' own kernel in the same fast path: {100 * bnb['rel_err_median']:.2f}%."
                 if bnb else ".")
    text += _paired_clause(nf4, yard)
    cublas_yard, cublas = acc.get(ACCURACY_YARDSTICK_CUBLAS), acc.get(BF16_CUBLAS_PATH)
    if cublas_yard is not None:
        text += (f" bf16 arithmetic as PyTorch rounds it (cuBLAS in eager layers, each norm's output rounded too) is "
                 f"{100 * cublas_yard['rel_err_median']:.2f}% from fp32 on the same nf4 weights")
        text += f" and {100 * cublas['rel_err_median']:.2f}% on the checkpoint." if cublas is not None else "."
    if triton is not None:
        t = 100 * triton["rel_err_median"]
        text += (f" With glmkit's Triton 4-bit kernel in place of its CUDA kernel (`GLMKIT_4BIT_KERNEL=triton`, "
                 f"slower): {t:.2f}%, {t / med['yard']:.2f}x the yardstick.")
    old = acc.get(NF4_BF16_PRODUCTS_PATH)
    if old is not None:
        t = 100 * old["rel_err_median"]
        text += (f" The CUDA kernel multiplies in fp16 (a bf16 token converted as it is staged); with its products in "
                 f"bf16, as it did before: {t:.2f}%, {t / med['yard']:.2f}x the yardstick.")
    return Text(text + _code_rounding_clause() + _layer_errors_clause())


def _layer_errors_clause() -> str:
    """Layer by layer (``nf4_layer_errors.json``): what each nf4 and bf16 layer adds given the fp32 decoder's inputs,
    and the prompt's keys after the decoder's own prefill, with q/k/v as one GEMM and as three (the run before,
    ``nf4_layer_errors_three_gemms.json``); empty where not measured."""
    run, before = load("nf4_layer_errors"), load("nf4_layer_errors_three_gemms")
    if run is None:
        return ""
    rows = run["rows"]
    nf4, bf16 = rows.get("nf4 fast, fed"), rows.get(f"{ACCURACY_YARDSTICK}, fed")
    nf4_free, bf16_free = rows.get("nf4 fast, free"), rows.get(f"{ACCURACY_YARDSTICK}, free")
    if not (nf4 and bf16 and nf4_free and bf16_free):
        return ""

    def pct(row: dict[str, Any]) -> str:
        return _range([100 * x for x in row["layer_rel_err"]], 2, "%")
    text = (f" Layer by layer ({measured_on(run)}, `nf4_layer_errors.json`), given the fp32 decoder's inputs and "
            f"cache, an nf4 layer's output is {pct(nf4)} from fp32's and a bf16 layer's on the same weights {pct(bf16)}; "
            f"after the decoder's own prefill, the prompt's keys are {100 * nf4_free['prompt_keys_rel_err']:.2f}% from "
            f"fp32 in nf4 and {100 * bf16_free['prompt_keys_rel_err']:.2f}% in bf16")
    old = (before or {}).get("rows", {}).get("nf4 fast, free")
    if old is None:
        return text + "."
    return text + (f": the prefill multiplies a 4-bit model's q, k and v as one GEMM, as a 16-bit model's fused q/k/v "
                   f"(as three GEMMs, `nf4_layer_errors_three_gemms.json`: {100 * old['prompt_keys_rel_err']:.2f}%, and "
                   f"that run's logits {100 * old['logits_rel_err']:.2f}% against "
                   f"{100 * nf4_free['logits_rel_err']:.2f}% with one).")


def _paired_clause(nf4: dict[str, Any], yard: dict[str, Any]) -> str:
    """Step by step, how often nf4's error is below the yardstick's and their median ratio (runs that kept each step's
    error), else empty."""
    if "rel_err_steps" not in nf4 or "rel_err_steps" not in yard:
        return ""
    pairs = [(a, b) for a, b in zip(nf4["rel_err_steps"], yard["rel_err_steps"]) if b > 0]
    if not pairs:
        return ""
    return (f" Step by step, nf4's error is the smaller on {sum(a < b for a, b in pairs)} of {len(pairs)} steps; "
            f"the median of the per-step ratios is {statistics.median(a / b for a, b in pairs):.3f}.")


def _code_rounding_clause() -> str:
    """Per projection, the batch-1 CUDA kernel's error with fp16 and bf16 products (``nf4_code_rounding.json``)."""
    rounding = load("nf4_code_rounding")
    if rounding is None:
        return ""
    rows = rounding["rows"]

    def pct(key: str) -> str:
        return _range([100 * x[key] for x in rows], 2, "%")
    where = f" Per projection ({measured_on(rounding)}, `nf4_code_rounding.json`)"
    return (f"{where}, the CUDA kernel's outputs are {pct('cuda_vs_exact')} from float64 on the exact weights with "
            f"fp16 products (Triton's: {pct('triton_vs_exact')}; bf16 rounding of the weights alone, in float64 with "
            f"no output rounding, costs {pct('bf16_weights_vs_exact_fp64')}), against "
            f"{pct('cuda_bf16_products_vs_exact')} with bf16 products, whose code table in bf16 puts every weight of "
            f"a code off the same way ({pct('bf16_code_vs_exact_fp64')} on its own; fp16's table: "
            f"{pct('fp16_code_vs_exact_fp64')}). A token 10^5 times larger, past fp16's 65504: "
            f"{pct('cuda_large_x_vs_exact')}, as the kernel scales x by a power of two before converting it.")


def _one_shape(x: dict[str, Any]) -> str:
    """A batch-1 4-bit CUDA kernel shape as the tables keep it, in words: ``4x4 warps, 2 stages, wide``."""
    return f"{x['groups']}x{x['warps']} warps, {x['depth']} stages, {'wide' if x['wide'] else 'narrow'}"


def one_shapes_table() -> Table | Text:
    """``glmkit tune``'s shapes for the batch-1 4-bit CUDA kernel on the card it ran on (``one_shapes_tune.json``):
    per GLM-4-9B launch the untuned default and the fastest shape, each in µs (notebook 05)."""
    def render(r: dict[str, Any]) -> Table:
        rows = [[p["projection"], f"{p['rows']} x {p['columns']}", str(len(p["tried"])), _one_shape(p["default"]),
                 f"{p['default']['us']:.1f}", _one_shape(p["best"]), f"{p['best']['us']:.1f}",
                 f"{p['default']['us'] / p['best']['us']:.3f}x"]
                for p in r["projections"] if p["best"] and "us" in (p["default"] or {})]  # (a default that ran)
        return table(["launch", "rows x columns", "shapes timed", "untuned default", "µs", "fastest", "µs",
                      "default / fastest"], rows,
                     caption=f"{measured_on(r)}: the batch-1 4-bit CUDA kernel's launch shapes, each launched plainly "
                             f"over ~1 GiB of nf4 weight copies in one CUDA graph (`one_shapes_tune.json`)")
    return from_result("one_shapes_tune", render, what="The 4-bit CUDA kernel's tuned shapes",
                       script="benchmarks/one_shapes_tune.py")


def one_shapes_sentence() -> Text:
    """What tuning the batch-1 4-bit CUDA kernel's shapes gave a decoder on that card (``one_shapes_tune.json``)."""
    def render(r: dict[str, Any]) -> str:
        d = r["decode"]
        default, tuned = d["best_tok_s"]["default shapes"], d["best_tok_s"]["tuned shapes"]
        kept = [p["projection"] for p in r["projections"] if p["best"] and "us" in (p["default"] or {})
                and beats_default(p["best"]["us"], p["default"]["us"])]
        same = "the same" if d["same_tokens"] else "different"
        rounds = d["tok_s"]["default shapes"]
        kept_by = "the shapes the tune kept" if "margin" in r else "each launch's fastest shape"  # (runs before it)
        return (f"On {measured_on(r)}, GLM-4-9B in nf4 (random weights, batch 1, {d['prompt']}-token prompt, "
                f"{d['new_tokens']} new tokens, best of 3 rounds taking turns in one process) decoded {tuned:.1f} "
                f"tok/s with {kept_by} and {default:.1f} with the untuned defaults "
                f"({tuned / default:.3f}x), with {same} tokens; the defaults' own rounds spread "
                f"{100 * (max(rounds) / min(rounds) - 1):.1f}%. So a tune keeps a shape other than the default only "
                f"where it is {100 * MARGIN:.0f}% faster (`glmkit.gemv_tuning.MARGIN`); here " + (
                    "none is, and the defaults stay." if not kept else f"{', '.join(kept)} would take another shape."))
    return from_result("one_shapes_tune", render, what="The 4-bit CUDA kernel's tuned shapes",
                       script="benchmarks/one_shapes_tune.py")


def _mma_shape(x: dict[str, Any]) -> str:
    """A 2-8-row 4-bit CUDA kernel shape as the tables keep it, in words: ``8 warps, 2 chunks at a time, 2 an SM``."""
    return f"{x['warps']} warps, {x['unroll']} chunk{'s' if x['unroll'] > 1 else ''} at a time, {x['min_blocks']} an SM"


def mma_shapes_table() -> Table | Text:
    """``glmkit tune``'s shapes for the 2-8-row 4-bit CUDA kernel on the card it ran on (``mma_shapes_tune.json``): per
    GLM-4-9B launch the untuned default and the kept shape, each in µs summed over the rows it was timed at
    (notebook 05)."""
    def render(r: dict[str, Any]) -> Table:
        at = " + ".join(map(str, r["timed_at_rows"]))
        rows = [[p["projection"], f"{p['rows']} x {p['columns']}", str(len(p["tried"])), _mma_shape(p["default"]),
                 f"{sum(p['default']['us'].values()):.1f}", _mma_shape(p["best"]), f"{p['best']['us_summed']:.1f}",
                 f"{sum(p['default']['us'].values()) / p['best']['us_summed']:.3f}x"]
                for p in r["projections"] if p["best"] and "us" in (p["default"] or {})]  # (a default that ran)
        return table(["launch", "rows x columns", "shapes timed", "untuned default", f"µs ({at} rows)", "kept",
                      f"µs ({at} rows)", "default / kept"], rows,
                     caption=f"{measured_on(r)}: the 2-8-row 4-bit CUDA kernel's launch shapes, each launched plainly "
                             f"over ~1 GiB of nf4 weight copies in one CUDA graph (`mma_shapes_tune.json`)")
    return from_result("mma_shapes_tune", render, what="The 2-8-row 4-bit CUDA kernel's tuned shapes",
                       script="benchmarks/mma_shapes_tune.py")


def mma_shapes_sentence() -> Text:
    """What the tuned shapes of the 2-8-row 4-bit CUDA kernel gave a decoder of several sequences on that card
    (``mma_shapes_tune.json``)."""
    def render(r: dict[str, Any]) -> str:
        d = r["decode"]
        kept = [p["projection"] for p in r["projections"] if p["best"] and "us" in (p["default"] or {})
                and _mma_shape(p["best"]) != _mma_shape(p["default"])]
        runs = "; ".join(f"{b} sequences {x['best_tok_s']['tuned shapes']:.1f} tok/s against "
                         f"{x['best_tok_s']['default shapes']:.1f} ({x['tuned_over_default']:.3f}x), the defaults' "
                         f"rounds {100 * (max(x['tok_s']['default shapes']) / min(x['tok_s']['default shapes']) - 1):.1f}% "
                         f"apart" for b, x in d["batches"].items())
        same = all(x["same_tokens"] for x in d["batches"].values())
        return (f"On {measured_on(r)}, the tune kept another shape than the default for "
                f"{', '.join(kept) if kept else 'no launch'} (at least {100 * r['margin']:.0f}% faster). GLM-4-9B in "
                f"nf4 (random weights, {d['prompt']}-token prompts, {d['new_tokens']} new tokens, best of 3 rounds "
                f"taking turns in one process) decoded with the kept shapes against the defaults: {runs}. " + (
                    "The tokens were the same." if same else
                    "The tokens differ: another warp count sums each row in another order, and on random weights "
                    "a bf16 rounding apart turns a greedy token; each shape was checked against float64 first."))
    return from_result("mma_shapes_tune", render, what="The 2-8-row 4-bit CUDA kernel's tuned shapes",
                       script="benchmarks/mma_shapes_tune.py")


def step_shapes_table() -> Table | Text:
    """``glmkit tune``'s shapes for the 16-bit CUDA kernels, tuned in the decode step on the card it ran on
    (``step_shapes_tune.json``): per knob the untuned default and the kept shape, each with the step's µs (notebook 05)."""
    def render(r: dict[str, Any]) -> Table:
        def shape(t: dict[str, Any]) -> str:
            if "ring" in t:
                return f"ring of {t['ring']}"
            return f"{t['groups']}x{t['warps']} warps, {t['depth']} stages, {t['early']} early"
        rows = [[p["projection"], f"{p['rows']} x {p['columns']}", str(len(p["tried"])), shape(p["default"]),
                 f"{p['default']['step_us']:.0f}", shape(p["best"]), f"{p['best']['step_us']:.0f}",
                 f"{p['best']['over_default']:.3f}x"]
                for p in r["projections"] if p["best"] and "step_us" in (p["default"] or {})]
        return table(["knob", "rows x columns", "shapes timed", "untuned default", "µs a step", "kept", "µs a step",
                      "kept's step / default's, in turns"], rows,
                     caption=f"{measured_on(r)}: the 16-bit CUDA kernels' launch shapes, each timed in the decode step "
                             f"of {r['step_layers']} GLM-4-9B layers (random weights, bf16; `step_shapes_tune.json`)")
    return from_result("step_shapes_tune", render, what="The 16-bit CUDA kernels' tuned shapes",
                       script="benchmarks/step_shapes_tune.py")


def step_shapes_sentence() -> Text:
    """What tuning the 16-bit CUDA kernels' shapes in the step kept on that card, and what the kept shapes gave the
    whole model against the defaults (``step_shapes_tune.json``)."""
    def render(r: dict[str, Any]) -> str:
        d = r["decode"]
        default, tuned = d["best_tok_s"]["default shapes"], d["best_tok_s"]["tuned shapes"]
        kept = [p["projection"] for p in r["projections"] if p["best"] and p["best"]["over_default"] != 1.0]
        spread = [t["over_default"] for p in r["projections"] for t in p["tried"] if "over_default" in t]
        text = (f"On {measured_on(r)} the tuning took {r['tuning_seconds']:.0f} s; in turns with the default's, the "
                f"candidates' steps took {_range(spread, 3, 'x')} the default's time. ")
        whole = (f"GLM-4-9B in bf16 (random weights, all layers, batch 1, {d['prompt']}-token prompt, "
                 f"{d['new_tokens']} new tokens, best of 3 rounds taking turns in one process)")
        if not kept:
            return text + (f"None was {100 * r['margin']:.0f}% faster, so the defaults stay. {whole}, in two decoders "
                           f"with those same shapes, built apart: {tuned:.1f} and {default:.1f} tok/s ({tuned / default:.3f}x), "
                           f"with {'the same' if d['same_tokens'] else 'different'} tokens: what the margin is for.")
        same = "the same tokens" if d["same_tokens"] else (
            "different tokens (another warp layout sums each row in another order: on random weights a bf16 rounding "
            "apart turns a greedy token)")
        return text + (f"It kept another shape for {', '.join(kept)} (at least {100 * r['margin']:.0f}% faster). {whole} "
                       f"then decoded {tuned:.1f} tok/s with the kept shapes and {default:.1f} with the defaults "
                       f"({tuned / default:.3f}x), with {same}.")
    return from_result("step_shapes_tune", render, what="The 16-bit CUDA kernels' tuned shapes",
                       script="benchmarks/step_shapes_tune.py")


def monitor_sentence() -> Text:
    """How well the monitor agrees with nvidia-smi and what polling costs (``monitor_check*.json``)."""
    m, fast = load("monitor_check"), load("monitor_check_fast")
    if m is None:
        return not_measured("The monitor's accuracy and cost", "benchmarks/monitor_check.py")
    r = fast or m
    agree = max(a["relative_difference"] for a in r["agreement"])
    duty = " / ".join(f"{100 * v:.2f}%" for v in r["poll_duty_cycle"].values())
    text = (f"**Monitor**: `snapshot()` agrees with `nvidia-smi` to {100 * agree:.3f}%. A poll of the live widget takes "
            f"{_range(list(r['ms_per_poll'].values()))} ms, so polling every {' / '.join(r['poll_duty_cycle'])} keeps "
            f"its thread busy {duty} of the time.")
    if fast is not None:
        cost = max(abs(v) for v in fast["paired_overhead"].values())
        text += (f" Decoding with the fast path ({fast['median_tok_s']['none']:.1f} tok/s), "
                 f"{len(fast['decode_tok_s']['none'])} rotated runs per setting: median cost under "
                 f"{max(100 * cost, 0.01):.2f}% at every interval (`monitor_check_fast.json`).")
    return Text(text)


def precision_quality_sentence(report: Any) -> Text:
    """Perplexity and greedy agreement per precision against the first (bf16) from a live
    ``glmkit.quantization.compare_precisions`` report (notebook 04)."""
    base = report.results[0]
    ppl = ", ".join(f"{r.precision} {r.perplexity:.4f}"
                    + ("" if r is base else f" ({_pct(r.perplexity / base.perplexity - 1, 2)})") for r in report.results)
    agree = ", ".join(f"{r.precision} {100 * r.agreement:.0f}%" for r in report.results[1:])
    return Text(f"Measured here ({report.device}): held-out perplexity {ppl}. Greedy tokens that agree with "
                f"{base.precision}'s: {agree}.")


# ----------------------------------------------------------------------------------------------------------------
# The README's measured section


def _proxy_clause() -> str:
    """The earlier one-GPU proxy run of the split, labelled, for the README's two-GPU bullet (empty when absent)."""
    return "" if load("two_gpu_fast_proxy") is None else " Before that run, a one-GPU proxy: " + two_gpu_fast_sentence(
        "two_gpu_fast_proxy")


README_BEGIN = ("<!-- measured: rendered by `python -m glmkit.results --update-readme` from benchmarks/results; "
                "do not edit by hand -->")
README_END = "<!-- end of measured -->"


def readme_measured_section() -> str:
    """The README's measured figures, as Markdown bullets, from the committed results (``python -m glmkit.results``
    prints it, ``--update-readme`` writes it; ``tests/test_results.py`` fails when the README's copy differs)."""
    decode = load("decode")
    bullets = [quantization_sentence(), "**Planner vs measured peak**: " + planner_sentence(),
               "**A real OOM**: " + oom_sentence(), monitor_sentence(),
               "**Fast decode path**: " + decode_sentence().replace("\n\n", " "),
               "**The fast path in fp16 and nf4**: " + nf4_decode_sentence(),
               "**glmkit's 4-bit kernel**: " + nf4_kernel_sentence(),
               "**What holds 4-bit back**: " + nf4_limits_sentence(),
               "**4-bit by batch size**: " + nf4_batch_sentence(),
               "**4-bit, 2-8 rows on the tensor cores**: " + nf4_mma_sentence(),
               "**4-bit, one sequence**: " + nf4_fused_sentence(),
               "**4-bit, one sequence on the tensor cores**: " + nf4_one_sentence(),
               "**Triton GEMVs**: " + gemv_sentence(), "**Profile**: " + profile_sentence(),
               "**Fewer kernels per step**: " + str(fusion_sentence()) + " " + pdl_sentence() + " "
               + str(attention_tile_sentence()),
               "**What attention costs a step**: " + str(attention_cost_sentence()),
               "**The next token inside the step**: " + str(greedy_tail_sentence()),
               "**The fast path today**: " + str(fast_path_today_sentence()),
               "**bf16 q/k/v and o_proj on the tensor cores**: " + str(gemv16_sentence()),
               "**The MLP as one kernel**: " + str(mlp16_sentence()),
               "**The bf16 step now, card by card**: " + str(bf16_now_sentence()),
               "**Why H200s differ**: " + str(card_bandwidth_sentence()),
               "**Speed by cache length**: " + str(max_len_sentence()),
               "**Logits against fp32**: " + str(fast_path_accuracy_sentence()),
               "**bf16 and nf4 in the same run, run after run**: " + str(bf16_nf4_sentence()),
               "**Long prompts**: " + long_context_sentence(),
               "**Server**: " + server_sentence(), "**Two GPUs**: " + two_gpu_sentence(),
               "**Fast path on two GPUs**: " + two_gpu_fast_sentence() + _proxy_clause(),
               "**Tensor parallel**: " + tensor_parallel_sentence(),
               "**Fast tensor parallel**: " + tp_fast_sentence(),
               "**What bounds tensor parallelism**: " + tp_bound_sentence() + " " + tp_estimate_sentence(),
               "**Link between two GPUs**: " + gpu_links_sentence(), "**All-reduce**: " + allreduce_sentence(),
               "**The server on two cards**: " + two_card_server_sentence(),
               "**Which two-card path for which link**: " + link_guidance_sentence()]
    head = "Measured"
    if decode:
        v = decode["environment"]["versions"]
        head = (f"Measured on an {decode['environment']['device']} (torch {v['torch']}, transformers {v['transformers']}, "
                f"bitsandbytes {v['bitsandbytes']}; {decode['environment']['date']})")
    server = two_card_server_table()
    tables = ["", "The server on two cards, per number of clients: " + server.markdown()] if isinstance(server, Table) else []
    if load("server_load_gpu_cb") is not None:
        tables += ["", f"![Server load: tokens/s and time to first token against clients, continuous vs static batching, "
                       f"from benchmarks/results/server_load_*.json]({README_CHART.as_posix()})"]
    return "\n".join([README_BEGIN, f"{head} (GLM-4-9B-Chat architecture, random weights; raw results in "
                      "`benchmarks/results/`):", ""] + [f"- {b}" for b in bullets] + tables + [README_END])


README_CHART = Path("docs") / "server_load.svg"  # the load chart the README shows, beside it in the repository


def write_readme_chart(path: str | Path = RESULTS_DIR.parents[1] / README_CHART) -> Path | None:
    """Save ``server_load_chart()`` as an SVG with its text kept as text (searchable, diffable) and no timestamp, so
    the same results give the same file; ``None`` before any continuous-batching run exists."""
    import matplotlib.pyplot as plt

    fig = server_load_chart()
    if isinstance(fig, Text):
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "glmkit"}):
        fig.savefig(path, format="svg", metadata={"Date": None})
    return path


def update_readme(path: str | Path = RESULTS_DIR.parents[1] / "README.md") -> bool:
    """Replace the README's measured section with a fresh rendering (and its chart, ``write_readme_chart``);
    ``True`` when the text changed."""
    path = Path(path)
    write_readme_chart(path.parent / README_CHART)
    text = path.read_text()
    start, end = text.index("<!-- measured:"), text.index(README_END) + len(README_END)  # any earlier marker text
    new = text[:start] + readme_measured_section() + text[end:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:  # python -m glmkit.results --update-readme
        print("README.md updated" if update_readme() else "README.md already matches the results")
    else:
        print(readme_measured_section())
