"""JupyterLab widgets: the decode tuner (``notebooks/05_tuning.ipynb``) and the chat (``notebooks/06_chat.ipynb``).

``decode_tuner(model)`` shows sliders for batch size, prompt length and new tokens, menus for the attention
implementation, the decode path and the fast path's projection kernels, and a run button. Each run calls
``glmkit.bench.measure_decode`` and adds a point to the throughput / latency / memory charts, so the batch-size
trade-off shows up as you click.
"""

from __future__ import annotations

from typing import Any

import torch

from glmkit.bench import PATHS, measure_decode
from glmkit.gemv import triton_available


class DecodeTuner:
    """Sliders + run button + charts around ``measure_decode``; ``run()`` also works without clicking."""

    def __init__(self, model: torch.nn.Module) -> None:
        import ipywidgets as w

        self.model = model
        self.results: list[dict[str, Any]] = []
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
        controls = w.VBox([self.batch, self.prompt, self.new_tokens, self.attn, self.path, self.projections, self.button,
                           self.status])
        self.widget = w.HBox([controls, self.chart])

    def run(self) -> dict[str, Any]:
        """Measure the current settings, add the result to the charts and return it."""
        self.status.value = "<i>measuring…</i>"
        try:
            row = measure_decode(self.model, self.path.value, self.batch.value, self.prompt.value,
                                 self.new_tokens.value, self.attn.value,
                                 fast_options={"gemv": self.projections.value})
        except Exception as exc:  # e.g. out of memory at a large batch: say so, keep the widget alive
            self.status.value = f'<b style="color:#c00">{type(exc).__name__}: {str(exc)[:200]}</b>'
            raise
        self.results.append(row)
        self.status.value = (f"{_label(row)}, batch {row['batch_size']}: {row['decode_tok_s']:.1f} tok/s, "
                             f"TTFT {1000 * row['ttft_s']:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB")
        self._draw()
        return row

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        self.chart.clear_output(wait=True)
        with self.chart:
            fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
            for label in dict.fromkeys(_label(r) for r in self.results):  # one line per path (and fast kernels)
                rows = sorted((r for r in self.results if _label(r) == label), key=lambda r: r["batch_size"])
                bs = [r["batch_size"] for r in rows]
                axes[0].plot(bs, [r["decode_tok_s"] for r in rows], "o-", label=label)
                axes[1].plot(bs, [1000 * r["batch_size"] / r["decode_tok_s"] for r in rows], "o-", label=label)
                axes[2].plot(bs, [r["peak_bytes"] / 2**30 for r in rows], "o-", label=label)
            for ax, title in zip(axes, ["tok/s (summed over batch)", "ms per token per sequence", "peak GiB"]):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("batch")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            plt.show()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _label(row: dict[str, Any]) -> str:
    """A measurement's line in the tuner's charts: the path, and for the fast path the kernels it used."""
    if row["path"] != "fast":
        return row["path"]
    return f"fast ({'Triton' if row.get('gemv') == 'triton' else 'cuBLAS'})"


def decode_tuner(model: torch.nn.Module) -> DecodeTuner:
    """The decode tuner for ``model`` (display it as a cell's last line)."""
    return DecodeTuner(model)


class ChatWidget:
    """A chat in JupyterLab: history, system prompt, temperature / top-p / max-tokens controls, tokens streaming
    into the reply, a stop button that stops generation, clear, and a status line with tok/s and memory.

    Every turn goes through GLM-4's chat template with the whole history. ``send_message(text, wait=True)``
    does what the send button does (used by tests and to script a demo).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, system_prompt: str = "", max_new_tokens: int = 128,
                 engine: Any = None) -> None:
        import threading

        import ipywidgets as w

        self.model, self.tokenizer = model, tokenizer
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
        import html

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
        import threading

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
        import html
        import queue
        import time

        from glmkit.monitor import snapshot

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
            from glmkit.engine import Engine

            self._engine = Engine(self.model, self.tokenizer, max_batch_size=1)
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
    """The chat widget for ``model`` (display it as a cell's last line)."""
    return ChatWidget(model, tokenizer, **kwargs)
