"""JupyterLab widgets: the live memory monitor (``notebooks/01_single_gpu_oom.ipynb``), the decode tuner
(``notebooks/05_tuning.ipynb``) and the chat (``notebooks/06_chat.ipynb``). ipywidgets is imported with this module;
IPython and matplotlib only inside the functions that draw, and ``glmkit.quantization`` only where the tuner loads
another precision.

``decode_tuner(model, checkpoint=...)`` shows a precision menu (the model's own, then the others of
``glmkit.vocabulary.PRECISIONS``: bf16, fp16, int8, nf4, nf4-dq, fp4, fp4-dq, each loaded from ``checkpoint`` on
first use, where the model is, and kept), sliders for batch size, prompt length and new tokens, menus for the
attention implementation, the decode path and the fast path's projection kernels, and a run button. Each run calls
``glmkit.bench.measure_decode`` and adds a point to the throughput / latency / memory charts, one line per
precision and path, so the batch-size trade-off and what a precision buys show up as you click:

>>> from glmkit.loading import load_model
>>> from glmkit.models import TRAINED_TINY_DIR
>>> model = load_model(TRAINED_TINY_DIR, device_map="cpu", dtype=torch.float32)
>>> tuner = decode_tuner(model, checkpoint=TRAINED_TINY_DIR, precisions=["bf16", "nf4"])
>>> tuner.precision.options
('fp32', 'bf16', 'nf4')
>>> tuner.prompt.value, tuner.new_tokens.value = 8, 4
>>> tuner.run()["precision"], list(tuner.series())
('fp32', ['fp32 generate'])

``chat_widget(model, tokenizer, fast_decode=True)`` answers through the engine's fast path (notebook 06).
"""

from __future__ import annotations

import html
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ipywidgets as w
import torch

from glmkit.bench import PATHS, measure_decode
from glmkit.engine import Engine
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import triton_available
from glmkit.generation import model_device
from glmkit.loading import resolve_checkpoint
from glmkit.monitor import DeviceMemory, Snapshot, snapshot
from glmkit.tables import gib
from glmkit.vocabulary import PRECISIONS, dtype_name, quantization_setting


class DecodeTuner:
    """Precision menu + sliders + run button + charts around ``measure_decode``; ``run()`` also works without clicking.

    Args:
        model: the model to measure, whose own precision (``model_precision``: ``"bf16"``, ``"nf4"``...) is the
            menu's first entry; or several already loaded, as ``{"bf16": m1, "nf4": m2}`` (the menu lists the keys).
        checkpoint: the folder ``model`` was loaded from: the menu then lists ``precisions`` too, each loaded from it
            at its first run (``glmkit.quantization.load_precision``) and kept, so switching back measures at once.
            Without it the menu lists only the model(s) given.
        precisions: names of ``glmkit.vocabulary.PRECISIONS`` to offer (default: all of them); needs ``checkpoint``.
        device_map: where those load (default: where ``model`` is: its device, or its ``hf_device_map`` when split).

    A precision that cannot load here (bitsandbytes missing or unable to run on this machine, not enough memory)
    says so in the status line and what to do; the results so far and the other precisions stay. ``unload(name)``
    frees a precision loaded from the checkpoint. Taught in ``notebooks/05_tuning.ipynb``.
    """

    def __init__(self, model: torch.nn.Module | dict[str, torch.nn.Module], checkpoint: Any = None,
                 precisions: Sequence[str] | None = None, device_map: Any = None) -> None:
        given = dict(model) if isinstance(model, dict) else {model_precision(model): model}
        if not given:
            raise ValueError("decode_tuner needs a model (or a dict of at least one).")
        if precisions is not None and checkpoint is None:
            raise ValueError("precisions are loaded from a checkpoint: pass checkpoint= (the folder the model came "
                             "from), or give the models loaded yourself as {'bf16': m1, 'nf4': m2}.")
        unknown = [p for p in precisions or () if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"Unknown precision {', '.join(map(repr, unknown))}: use {', '.join(PRECISIONS)}.")
        if checkpoint is not None:
            checkpoint = resolve_checkpoint(checkpoint)  # a missing folder: said now, not at the first run
        self.model = next(iter(given.values()))
        self.given = tuple(given)  # menu names of the models given (never unloaded)
        self.models: dict[str, torch.nn.Module] = given  # the precisions given or loaded so far, by menu name
        self.checkpoint = checkpoint
        self.device_map = device_map if device_map is not None else _device_map_of(self.model)
        offered = list(PRECISIONS if precisions is None else precisions) if checkpoint is not None else []
        self.results: list[dict[str, Any]] = []
        self.precision = w.Dropdown(options=list(dict.fromkeys([*given, *offered])), value=next(iter(given)),
                                    description="precision")
        self.batch = w.IntSlider(value=1, min=1, max=64, description="batch")
        self.prompt = w.IntSlider(value=32, min=8, max=2048, step=8, description="prompt")
        self.new_tokens = w.IntSlider(value=32, min=4, max=256, step=4, description="new tokens")
        self.attn = w.Dropdown(options=["sdpa", "eager"], value="sdpa", description="attention")
        self.path = w.Dropdown(options=list(PATHS), value="generate", description="path")
        kernels = [("auto", "auto"), ("cuBLAS", False)] + ([("Triton", "triton")] if triton_available() else [])
        self.projections = w.Dropdown(options=kernels, value="auto", description="fast: GEMV")  # FastDecoder(gemv=)
        self.button = w.Button(description="run", icon="play", button_style="primary")
        self.status = w.HTML()
        self.chart = w.Output()
        self.button.on_click(lambda _: self.run())
        controls = w.VBox([self.precision, self.batch, self.prompt, self.new_tokens, self.attn, self.path,
                           self.projections, self.button, self.status])
        self.widget = w.HBox([controls, self.chart])

    def model_for(self, precision: str) -> torch.nn.Module:
        """The model measured for ``precision``: one given, else loaded from the checkpoint now (then kept).
        Raises ``RuntimeError`` saying what failed and what to do when it cannot load here."""
        if precision not in self.models:
            if self.checkpoint is None or precision not in PRECISIONS:
                raise ValueError(f"No model for '{precision}': the tuner has {', '.join(self.models)}; with a checkpoint "
                                 f"it loads {', '.join(PRECISIONS)}.")
            from glmkit.quantization import load_precision  # only here: loading needs transformers' loaders

            try:
                self.models[precision] = load_precision(self.checkpoint, precision, device_map=self.device_map)
            except Exception as exc:  # bitsandbytes missing or unusable here, out of memory, a bad checkpoint
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # what a half-loaded model held
                raise RuntimeError(_load_error(precision, exc, self.checkpoint, list(self.models))) from exc
        return self.models[precision]

    def unload(self, precision: str) -> None:
        """Drop a precision loaded from the checkpoint (it loads again at its next run) and free its memory."""
        if precision in self.given:
            raise ValueError(f"'{precision}' is a model you gave the tuner: only precisions it loaded can be unloaded.")
        self.models.pop(precision, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self) -> dict[str, Any]:
        """Measure the current settings (loading the precision first, at its first run), add the result to the charts
        and return it. Raises what failed, after saying it in the status line; the results so far stay."""
        precision = self.precision.value
        self.status.value = (f"<i>loading {html.escape(precision)}…</i>" if precision not in self.models
                             else "<i>measuring…</i>")
        try:
            model = self.model_for(precision)
        except Exception as exc:  # e.g. bitsandbytes missing: model_for's one line says what to do
            self.status.value = _error_html(str(exc))
            raise
        self.status.value = "<i>measuring…</i>"
        try:
            row = measure_decode(model, self.path.value, self.batch.value, self.prompt.value,
                                 self.new_tokens.value, self.attn.value,
                                 fast_options={"gemv": self.projections.value})
        except Exception as exc:  # e.g. out of memory at a large batch: say so, keep the widget alive
            self.status.value = _error_html(f"{type(exc).__name__}: {exc}")
            raise
        row = {"precision": precision, **row}
        self.results.append(row)
        self.status.value = (f"{_label(row)}, batch {row['batch_size']}: {row['decode_tok_s']:.1f} tok/s, "
                             f"TTFT {1000 * row['ttft_s']:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB")
        self._draw()
        return row

    def series(self) -> dict[str, list[dict[str, Any]]]:
        """The charts' lines: label (``_label``: precision, path, fast kernels) -> its results by batch size."""
        labels = dict.fromkeys(_label(r) for r in self.results)
        return {label: sorted((r for r in self.results if _label(r) == label), key=lambda r: r["batch_size"])
                for label in labels}

    def _draw(self) -> None:
        import matplotlib.pyplot as plt  # optional (notebooks extra): only the chart needs it
        from IPython import get_ipython

        shown = get_ipython() is not None  # in Jupyter; in a script or a test the figure is drawn, then closed
        if shown:
            self.chart.clear_output(wait=True)  # (outside IPython this would print terminal codes)
        with self.chart:
            fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
            for label, rows in self.series().items():
                bs = [r["batch_size"] for r in rows]
                axes[0].plot(bs, [r["decode_tok_s"] for r in rows], "o-", label=label)
                axes[1].plot(bs, [1000 * r["batch_size"] / r["decode_tok_s"] for r in rows], "o-", label=label)
                axes[2].plot(bs, [r["peak_bytes"] / 2**30 for r in rows], "o-", label=label)
            for ax, title in zip(axes, ["tok/s (summed over batch)", "ms per token per sequence", "peak GiB"]):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("batch")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            if shown:
                plt.show()
            else:
                plt.close(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display  # notebook-only: a widget shows itself in Jupyter

        display(self.widget)


def model_precision(model: torch.nn.Module) -> str:
    """A loaded model's precision by ``glmkit.vocabulary.PRECISIONS``' names: the bitsandbytes quantization it was
    loaded with (``"nf4"``, ``"fp4-dq"``, ``"int8"``), else its weights' dtype (``"bf16"``, ``"fp16"``, ``"fp32"``).

    >>> from glmkit.loading import load_model
    >>> model_precision(load_model(device_map="cpu", dtype=torch.float32))
    'fp32'
    """
    get = quantization_setting(model)
    if get is not None:
        if get("load_in_8bit", False):
            return "int8"
        if get("load_in_4bit", False):
            return f"{get('bnb_4bit_quant_type', 'fp4')}{'-dq' if get('bnb_4bit_use_double_quant', False) else ''}"
        return str(get("quant_method", "quantized"))
    dtype = model.get_input_embeddings().weight.dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, dtype_name(dtype))


def _device_map_of(model: torch.nn.Module) -> Any:
    """Where the tuner loads other precisions: the model's device (``"cuda:0"``, ``"cpu"``), or its device map when
    accelerate split it over several."""
    placed = getattr(model, "hf_device_map", None) or {}
    return dict(placed) if len(set(map(str, placed.values()))) > 1 else str(model_device(model))


def _load_error(precision: str, exc: BaseException, checkpoint: Any, loaded: list[str]) -> str:
    """One line for the tuner's status: what failed loading ``precision`` and what to do.

    >>> _load_error("nf4", ImportError("requires bitsandbytes"), "/ckpt", ["bf16"])[:64]
    'nf4 needs bitsandbytes, which is not installed here: pip install'
    """
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    others = f"pick {', '.join(loaded)} (loaded) or another precision"
    if isinstance(exc, ImportError) and "bitsandbytes" in str(exc):
        return (f"{precision} needs bitsandbytes, which is not installed here: pip install -U bitsandbytes and "
                f"restart the kernel, or {others}.")
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return (f"Not enough memory to load {precision} next to {', '.join(loaded)}: free one with "
                f"tuner.unload(name), or {others}.")
    if "bitsandbytes" in str(exc).lower():
        return (f"bitsandbytes cannot load {precision} on this machine ({type(exc).__name__}: {first}): "
                f"{others}, or update it (pip install -U bitsandbytes).")
    return f"Could not load {precision} from {checkpoint} ({type(exc).__name__}: {first}): {others}."


def _error_html(text: str) -> str:
    """An error for a widget's status line: its first line, escaped, in red."""
    return f'<b style="color:#c00">{html.escape((text.splitlines() or [""])[0][:300])}</b>'


def _label(row: dict[str, Any]) -> str:
    """A measurement's line in the tuner's charts: its precision (when recorded), the path, and for the fast path
    the kernels it used: glmkit's Triton kernels, else cuBLAS (bitsandbytes' ``matmul_4bit`` for 4-bit weights).

    >>> _label({"precision": "nf4", "path": "fast", "gemv": False}), _label({"path": "generate"})
    ('nf4 fast (bitsandbytes)', 'generate')
    """
    precision = row.get("precision")
    four_bit = PRECISIONS.get(precision, (None, None))[1] in ("nf4", "nf4-dq", "fp4", "fp4-dq")
    kernels = "Triton" if row.get("gemv") == "triton" else "bitsandbytes" if four_bit else "cuBLAS"
    path = f"fast ({kernels})" if row["path"] == "fast" else row["path"]
    return f"{precision} {path}" if precision else path


def decode_tuner(model: torch.nn.Module | dict[str, torch.nn.Module], checkpoint: Any = None,
                 precisions: Sequence[str] | None = None, device_map: Any = None) -> DecodeTuner:
    """The decode tuner for ``model`` (display it as a cell's last line); with ``checkpoint``, a precision menu
    (``DecodeTuner``)."""
    return DecodeTuner(model, checkpoint, precisions, device_map)


class ChatWidget:
    """A chat in JupyterLab: history, system prompt, temperature / top-p / max-tokens controls, tokens streaming
    into the reply, a stop button that stops generation, clear, and a status line with tok/s and memory.

    Every turn goes through GLM-4's chat template with the whole history. ``send_message(text, wait=True)``
    does what the send button does (used by tests and to script a demo). Taught in ``notebooks/06_chat.ipynb``.

    Args:
        engine: a ``glmkit.engine.Engine`` to answer through (e.g. one shared with a server); default: one made at
            the first message, ``Engine(model, tokenizer, max_batch_size=1, fast_decode=fast_decode)``.
        fast_decode: answer through the engine's fast path (``glmkit.fast_decode.FastDecoder``: GLM in 16/32-bit or
            bitsandbytes nf4/fp4, on one device or a layer split). On a GPU it decodes several times faster, at a
            cost: the first message waits for the decoder to compile and capture its CUDA graphs, and it holds a
            static KV cache for the model's whole context (5 GiB for GLM-4-9B's 131072 tokens in bf16) plus, in 16
            bit, a fused q/k/v copy (1.4 GiB). Off by default; a model the fast path does not run (int8, offloaded,
            not GLM) is refused here, with what to load instead.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, system_prompt: str = "", max_new_tokens: int = 128,
                 engine: Any = None, fast_decode: bool = False) -> None:
        if fast_decode and engine is not None:
            raise ValueError("fast_decode= builds the chat's own engine: pass fast_decode=True to the Engine you give "
                             "instead (Engine(model, tokenizer, fast_decode=True)), or leave engine out.")
        if fast_decode:
            FastDecoder.check(model)  # an int8 or offloaded model: said now, not at the first message
        self.model, self.tokenizer, self.fast_decode = model, tokenizer, fast_decode
        self._engine, self._req = engine, None  # engine: share one with a server (glmkit.engine.Engine)
        self.history: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = w.HTML(layout=w.Layout(width="100%", min_height="120px", border="1px solid #ddd", padding="6px"))
        self.log.add_class("glmkit-chat-log")
        self.system = w.Textarea(value=system_prompt, placeholder="system prompt (optional)", rows=2,
                                 layout=w.Layout(width="100%"))
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature")
        self.top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p")
        self.max_tokens = w.IntSlider(value=max_new_tokens, min=8, max=1024, step=8, description="max tokens")
        self.input = w.Text(placeholder="Ask something and press Enter", layout=w.Layout(width="60%"))
        self.input.add_class("glmkit-chat-input")
        self.send_button = w.Button(description="send", icon="paper-plane", button_style="primary")
        self.stop_button = w.Button(description="stop", icon="stop", button_style="warning")
        self.clear_button = w.Button(description="clear", icon="trash")
        self.send_button.add_class("glmkit-chat-send")
        self.stop_button.add_class("glmkit-chat-stop")
        self.status = w.HTML()
        self.status.add_class("glmkit-chat-status")
        self.send_button.on_click(lambda _: self._send_from_input())
        self.input.on_submit(lambda _: self._send_from_input())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.widget = w.VBox([self.system, w.HBox([self.temperature, self.top_p, self.max_tokens]), self.log,
                              w.HBox([self.input, self.send_button, self.stop_button, self.clear_button]), self.status])
        self.widget.add_class("glmkit-chat")
        self._render()

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        return system + self.history

    def _render(self, partial: str | None = None) -> None:
        rows = [(m["role"], m["content"]) for m in self.history] + ([("assistant", partial)] if partial is not None else [])
        self.log.value = "".join(
            f'<div class="glmkit-msg glmkit-{role}"><b>{"you" if role == "user" else "GLM"}:</b> '
            f"{html.escape(text)}</div>" for role, text in rows) or "<i>no messages yet</i>"

    def _send_from_input(self) -> None:
        text = self.input.value.strip()
        self.input.value = ""
        if text:
            self.send_message(text)

    def send_message(self, text: str, wait: bool = False) -> None:
        """Add a user message and stream the reply into the log (in a background thread)."""
        if self._thread is not None and self._thread.is_alive():
            self.status.value = "<i>still answering: press stop first</i>"
            return
        self.history.append({"role": "user", "content": text})
        self._stop.clear()
        self._thread = threading.Thread(target=self._answer, name="glmkit-chat", daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def _answer(self) -> None:
        reply, start = "", time.perf_counter()
        self._render(reply)
        engine = self.engine()
        pieces: queue.Queue[str | None] = queue.Queue()
        try:
            req = engine.submit(engine.encode(self.messages()), max_tokens=self.max_tokens.value,
                                temperature=self.temperature.value, top_p=self.top_p.value, on_text=pieces.put,
                                on_done=lambda _: pieces.put(None))
        except ValueError as exc:  # e.g. the conversation no longer fits the context
            req = None
            error = f"{type(exc).__name__}: {exc}"
        if req is not None:
            self._req = req
            if self._stop.is_set():
                req.cancel()
            while (piece := pieces.get()) is not None:
                reply += piece
                self._render(reply + " ▌")
                n = len(req.tokens)
                self.status.value = f"generating… {n} tokens, {n / (time.perf_counter() - start):.1f} tok/s"
            error = req.error
        if error:  # e.g. out of memory: show it, keep the history usable
            self.status.value = f'<b style="color:#c00">{html.escape(error[:200])}</b>'
            self.history.pop()
            self._render()
            return
        seconds = time.perf_counter() - start
        self.history.append({"role": "assistant", "content": req.text})
        self._render()
        n = len(req.tokens)
        memory = " · ".join(f"{d.device} {d.used / 2**30:.1f}/{d.total / 2**30:.0f} GiB" for d in snapshot().devices)
        stopped = " (stopped)" if self._stop.is_set() else ""
        self.status.value = f"{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tok/s{stopped} · {memory}"

    def engine(self) -> Any:
        """The ``glmkit.engine.Engine`` the replies come from (the one given, else one made at the first message)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=1, fast_decode=self.fast_decode)
        return self._engine

    def stop(self) -> None:
        """Stop the reply being generated (at the next token)."""
        self._stop.set()
        if self._req is not None:
            self._req.cancel()

    def clear(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.history.clear()
        self.status.value = ""
        self._render()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def chat_widget(model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> ChatWidget:
    """The chat widget for ``model`` (display it as a cell's last line); ``fast_decode=True`` answers through the
    engine's fast path (``ChatWidget``)."""
    return ChatWidget(model, tokenizer, **kwargs)


# ------------------------------------------------------------------------------ live memory monitor


class MemoryPoller:
    """Calls ``callback(snapshot)`` every ``interval`` seconds from a daemon thread until ``stop()``.

    The part of the live monitor that does the work, usable without Jupyter.
    """

    def __init__(self, callback: Callable[[Snapshot], None], interval: float = 1.0, include_host: bool = True):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}.")
        self.callback, self.interval, self.include_host = callback, interval, include_host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.busy_seconds = 0.0  # time spent polling and redrawing: the monitor's cost
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemoryPoller:
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="glmkit-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.callback(snapshot(self.include_host))
                self.polls += 1
            except Exception as exc:  # keep the kernel alive; show the error in the widget
                self.error = exc
            self.busy_seconds += time.perf_counter() - t0
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None


_LIVE: weakref.WeakValueDictionary[str, LiveMonitor] = weakref.WeakValueDictionary()


def _sparkline(values: Iterator[float] | list[float], width: int = 160, height: int = 28) -> str:
    """An inline SVG line of fractions in [0, 1] (the history plot; no plotting library in the poll thread)."""
    vals = list(values)
    if len(vals) < 2:
        return f'<svg width="{width}" height="{height}"></svg>'
    step = width / (len(vals) - 1)
    pts = " ".join(f"{i * step:.1f},{height - v * (height - 2) - 1:.1f}" for i, v in enumerate(vals))
    return (f'<svg width="{width}" height="{height}" class="glmkit-spark"><polyline points="{pts}" '
            'fill="none" stroke="#1f77b4" stroke-width="1.5"/></svg>')


class LiveMonitor:
    """A JupyterLab dashboard: one bar per device (used / total, PyTorch share, peak), a history line,
    and a warning when a GPU runs hot or near its power limit. Polls in a background thread.

    Re-running the cell that creates it stops the previous one (same ``key``); ``stop()`` ends the
    thread; closing the widget stops it too.

    Args:
        interval: seconds between polls.
        history: polls kept for the history line.
        temperature_limit: degrees C above which a GPU is flagged.
        power_fraction: fraction of the power limit above which a GPU is flagged.
    """

    def __init__(self, interval: float = 1.0, history: int = 120, temperature_limit: float = 83.0,
                 power_fraction: float = 0.95, include_host: bool = True, key: str = "default") -> None:
        if key in _LIVE:
            _LIVE[key].stop()
        _LIVE[key] = self
        self.temperature_limit, self.power_fraction = temperature_limit, power_fraction
        self.history: dict[str, deque[float]] = {}
        self.peaks: dict[str, int] = {}
        self.warnings: list[str] = []
        self._history_len = history
        self._rows: dict[str, tuple[Any, Any, Any]] = {}
        self.status = w.HTML("<i>starting…</i>")
        self.box = w.VBox([], layout=w.Layout(width="100%"))
        self.start_button = w.Button(description="start", icon="play", layout=w.Layout(width="90px"))
        self.stop_button = w.Button(description="stop", icon="stop", layout=w.Layout(width="90px"))
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.widget = w.VBox([w.HBox([self.start_button, self.stop_button, self.status]), self.box],
                             layout=w.Layout(border="1px solid #ddd", padding="6px"))
        self.widget.add_class("glmkit-monitor")
        self.widget.observe(self._closed, names="comm")
        self.poller = MemoryPoller(self.update, interval, include_host)
        self.update(snapshot(include_host))
        self.start()

    def _closed(self, change: dict[str, Any]) -> None:
        if change.get("new") is None:
            self.stop()

    def _row(self, d: DeviceMemory) -> tuple[Any, Any, Any]:
        if d.device not in self._rows:
            label = w.HTML(layout=w.Layout(width="230px"))
            bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="40%"))
            bar.add_class("glmkit-bar")
            info = w.HTML()
            self._rows[d.device] = (label, bar, info)
            self.box.children = tuple(w.HBox(list(r)) for r in self._rows.values())
        return self._rows[d.device]

    def update(self, snap: Snapshot) -> None:
        """Redraw from one snapshot (the poll thread calls this)."""
        warnings = []
        for d in snap.devices:
            label, bar, info = self._row(d)
            frac = d.used / d.total if d.total else 0.0
            hist = self.history.setdefault(d.device, deque(maxlen=self._history_len))
            hist.append(frac)
            mine = d.torch_allocated if d.torch_allocated is not None else d.process
            self.peaks[d.device] = max(self.peaks.get(d.device, 0), mine or 0)
            hot = d.temperature is not None and d.temperature >= self.temperature_limit
            power_high = (d.power is not None and d.power_limit and d.power >= self.power_fraction * d.power_limit)
            if hot:
                warnings.append(f"{d.device} at {d.temperature:.0f} C (limit {self.temperature_limit:.0f} C)")
            if power_high:
                warnings.append(f"{d.device} draws {d.power:.0f} W of {d.power_limit:.0f} W")
            bar.value = frac
            bar.bar_style = "danger" if frac > 0.95 or hot else "warning" if frac > 0.85 else "success"
            label.value = f"<b>{d.device}</b> {d.name}"
            share = f"PyTorch {gib(d.torch_allocated)}" if d.torch_allocated is not None else (
                f"this process {gib(d.process)}" if d.process is not None else "")
            extra = " ".join(x for x in (f"{d.temperature:.0f} C" if d.temperature is not None else "",
                                         f"{d.power:.0f} W" if d.power is not None else "") if x)
            info.value = (f"{gib(d.used)} / {gib(d.total)} · {share} · peak {gib(self.peaks[d.device])} {extra} "
                          + _sparkline(hist))
        self.warnings = warnings
        when = time.strftime("%H:%M:%S", time.localtime(snap.time))
        state = "polling" if self.running else "stopped"
        alert = "".join(f'<br><b style="color:#c00">⚠ {w}</b>' for w in warnings)
        self.status.value = f"{state} · last update {when}{alert}"

    @property
    def running(self) -> bool:
        return self.poller.running

    def start(self) -> LiveMonitor:
        self.poller.start()
        return self

    def stop(self) -> None:
        self.poller.stop()
        self.status.value = self.status.value.replace("polling", "stopped")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def live_monitor(interval: float = 1.0, **kwargs: Any) -> LiveMonitor:
    """Start (or restart) the live memory dashboard and return it; display it as a cell's last line."""
    return LiveMonitor(interval, **kwargs)
