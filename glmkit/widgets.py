"""JupyterLab widgets: the decode tuner (``notebooks/05_tuning.ipynb``).

``decode_tuner(model)`` shows sliders for batch size, prompt length and new tokens, menus for the attention
implementation and the decode path, and a run button. Each run calls ``glmkit.bench.measure_decode`` and
adds a point to the throughput / latency / memory charts, so the batch-size trade-off shows up as you click.
"""

from __future__ import annotations

from typing import Any

import torch

from glmkit.bench import PATHS, measure_decode


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
        self.button = w.Button(description="run", icon="play", button_style="primary")
        self.status = w.HTML()
        self.chart = w.Output()
        self.button.on_click(lambda _: self.run())
        controls = w.VBox([self.batch, self.prompt, self.new_tokens, self.attn, self.path, self.button, self.status])
        self.widget = w.HBox([controls, self.chart])

    def run(self) -> dict[str, Any]:
        """Measure the current settings, add the result to the charts and return it."""
        self.status.value = "<i>measuring…</i>"
        try:
            row = measure_decode(self.model, self.path.value, self.batch.value, self.prompt.value,
                                 self.new_tokens.value, self.attn.value)
        except Exception as exc:  # e.g. out of memory at a large batch: say so, keep the widget alive
            self.status.value = f'<b style="color:#c00">{type(exc).__name__}: {str(exc)[:200]}</b>'
            raise
        self.results.append(row)
        self.status.value = (f"{row['path']}, batch {row['batch_size']}: {row['decode_tok_s']:.1f} tok/s, "
                             f"TTFT {1000 * row['ttft_s']:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB")
        self._draw()
        return row

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        self.chart.clear_output(wait=True)
        with self.chart:
            fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
            for path in PATHS:
                rows = sorted((r for r in self.results if r["path"] == path), key=lambda r: r["batch_size"])
                if not rows:
                    continue
                bs = [r["batch_size"] for r in rows]
                axes[0].plot(bs, [r["decode_tok_s"] for r in rows], "o-", label=path)
                axes[1].plot(bs, [1000 * r["batch_size"] / r["decode_tok_s"] for r in rows], "o-", label=path)
                axes[2].plot(bs, [r["peak_bytes"] / 2**30 for r in rows], "o-", label=path)
            for ax, title in zip(axes, ["tok/s (summed over batch)", "ms per token per sequence", "peak GiB"]):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("batch")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            plt.show()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def decode_tuner(model: torch.nn.Module) -> DecodeTuner:
    """The decode tuner for ``model`` (display it as a cell's last line)."""
    return DecodeTuner(model)
