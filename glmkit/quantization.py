"""What quantization buys and costs: memory (planned and measured), speed, and quality, side by side.

``compare_precisions(path)`` loads the same checkpoint in bf16, fp16, int8 and 4-bit (nf4/fp4, with and
without double quantization) through bitsandbytes, and measures for each: the bytes of every tensor
it allocated (quantization states included) next to the planner's figure, decode speed, perplexity
on held-out text, and how often its greedy tokens agree with the bf16 model's. Introduced in
``notebooks/04_quantization.ipynb``.

>>> PRECISIONS["nf4-dq"]
('bfloat16', 'nf4-dq')
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig

from glmkit.bench import decode_tokens_per_second, environment_record
from glmkit.generation import chat_ids, model_device
from glmkit.loading import load_model, load_tokenizer
from glmkit.planning import unit_weight_bytes
from glmkit.tables import html_table, text_table
from glmkit.vocabulary import PRECISIONS


def load_precision(path: Any, precision: str, device_map: Any = None) -> torch.nn.Module:
    """Load ``path`` in one of ``PRECISIONS`` through ``glmkit.loading.load_model``."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}': use one of {', '.join(PRECISIONS)}.")
    dtype, quantization = PRECISIONS[precision]
    return load_model(path, dtype=getattr(torch, dtype), device_map=device_map, quantization=quantization)


def allocated_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a (possibly bitsandbytes-quantized) model holds, once each, with the name of the parameter or
    buffer it belongs to: parameters, buffers, 4-bit quantization states (absmax, code books, nested states) and
    int8 row scales (SCB)."""
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        state = getattr(t, "quant_state", None)
        extras = [getattr(s, f, None) for s in (state, getattr(state, "state2", None)) for f in ("absmax", "code", "offset")]
        for x in [t, *extras, getattr(t, "SCB", None)]:
            if isinstance(x, torch.Tensor) and x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                yield name, x


def model_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds (``allocated_tensors``), quantization states included."""
    return sum(t.numel() * t.element_size() for _, t in allocated_tensors(model))


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``texts``, each scored on its own.

    Texts of similar length share a forward (right-padded, pads masked out of attention and loss): the same sum of
    losses as one forward per text, in a fraction of the time on a CPU.
    """
    device = model.get_input_embeddings().weight.device
    encoded = sorted((ids for ids in (tokenizer(t, add_special_tokens=False).input_ids for t in texts) if len(ids) > 1),
                     key=len)
    if not encoded:
        raise ValueError("perplexity needs texts of at least 2 tokens.")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids = torch.zeros(len(chunk), len(chunk[-1]), dtype=torch.long)  # [batch, longest]; sorted by length
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [batch, longest, vocab]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # predict token t+1 from 0..t; pads ignored
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                                     ignore_index=-100, reduction="sum").item()
            count += int(mask[:, 1:].sum())
    return math.exp(nll / count)


def greedy_tokens(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], new_tokens: int = 24) -> list[list[int]]:
    """Greedy continuations (exactly ``new_tokens`` each) of chat-formatted ``prompts``, all in one ``generate``
    call, the prompts left-padded (and masked) to one length. For the tiny GLM's 4 prompts on a 2-core CPU: a third of
    the time of one call per prompt, and the same tokens in bf16, fp16, int8, nf4 and fp4."""
    rows = [chat_ids(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]
    n = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), n), pad, dtype=torch.long)  # [prompts, longest]; each prompt ends at column n
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
    device = model_device(model)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, n:].tolist()


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of positions where two sets of greedy continuations pick the same token.

    >>> agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]])
    0.75
    """
    pairs = [(a, b) for ra, rb in zip(reference, other) for a, b in zip(ra, rb)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


@dataclass
class PrecisionResult:
    precision: str
    planned_bytes: int
    measured_bytes: int
    tokens_per_second: float
    perplexity: float
    agreement: float  # with the first precision's greedy tokens


@dataclass(repr=False)
class PrecisionReport:
    """One row per precision; renders as a table. ``device`` says where it was measured."""

    device: str
    results: list[PrecisionResult] = field(default_factory=list)

    HEADERS = ["precision", "weights planned MiB", "weights measured MiB", "decode tok/s", "perplexity",
               "greedy agreement with bf16"]

    def rows(self) -> list[list[str]]:
        return [[r.precision, f"{r.planned_bytes / 2**20:.2f}", f"{r.measured_bytes / 2**20:.2f}",
                 f"{r.tokens_per_second:.1f}", f"{r.perplexity:.4f}", f"{100 * r.agreement:.0f}%"]
                for r in self.results]

    def result(self, precision: str) -> PrecisionResult:
        return next(r for r in self.results if r.precision == precision)

    def __repr__(self) -> str:
        return f"measured on {self.device}\n" + text_table(self.HEADERS, self.rows())

    def _repr_html_(self) -> str:
        return html_table(self.HEADERS, self.rows(), caption=f"measured on {self.device}")


def compare_precisions(
    path: Any,
    texts: Sequence[str],
    prompts: Sequence[str],
    precisions: Sequence[str] = tuple(PRECISIONS),
    new_tokens: int = 24,
    device_map: Any = None,
) -> PrecisionReport:
    """Memory, speed and quality of ``path`` in each precision (the first one is the reference).

    Args:
        texts: held-out text for perplexity.
        prompts: user messages whose greedy replies are compared with the reference precision's.
    """
    config = AutoConfig.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    report = PrecisionReport(environment_record()["device"])
    reference: list[list[int]] | None = None
    for precision in precisions:
        dtype, quantization = PRECISIONS[precision]
        model = load_precision(path, precision, device_map)
        # Measure right after loading: on the CPU, bitsandbytes repacks 4-bit weights at the first forward.
        measured = model_tensor_bytes(model)
        tokens = greedy_tokens(model, tokenizer, prompts, new_tokens)
        reference = reference or tokens
        decode_tokens_per_second(model, 4)  # warm-up
        speed = decode_tokens_per_second(model, new_tokens)
        report.results.append(PrecisionResult(
            precision,
            planned_bytes=sum(unit_weight_bytes(config, dtype, quantization).values()),
            measured_bytes=measured,
            tokens_per_second=speed,
            perplexity=perplexity(model, tokenizer, texts),
            agreement=agreement(reference, tokens),
        ))
        del model
    return report


def plot_precisions(report: PrecisionReport, gpu_result: dict[str, Any] | None = None) -> Any:
    """Bar charts: weights (planned vs measured), perplexity change against bf16 (the differences are small),
    and (if given) full-size GPU memory and speed."""
    import matplotlib.pyplot as plt  # optional (notebooks extra): only the chart needs it

    names = [r.precision for r in report.results]
    n = 3 if gpu_result else 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))
    axes[0].bar(names, [r.measured_bytes / 2**20 for r in report.results], color="#1f77b4", label="measured")
    axes[0].plot(names, [r.planned_bytes / 2**20 for r in report.results], "k_", markersize=18, label="planned")
    axes[0].set_ylabel("MiB")
    axes[0].set_title(f"tiny GLM weights ({report.device})", fontsize=9)
    axes[0].legend(fontsize=7)
    base = next((r for r in report.results if r.precision == "bf16"), report.results[0])
    axes[1].bar(names, [100 * (r.perplexity / base.perplexity - 1) for r in report.results], color="#ff7f0e")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_ylabel(f"% vs {base.precision} ({base.perplexity:.4f})")
    axes[1].set_title("held-out perplexity change (lower is better)", fontsize=9)
    if gpu_result:
        rows = [r for r in gpu_result["precisions"] if "loaded_bytes" in r]
        axes[2].bar([r["precision"] for r in rows], [r["loaded_bytes"] / 2**30 for r in rows], color="#2ca02c")
        ax2 = axes[2].twinx()
        ax2.plot([r["precision"] for r in rows], [r["tok_s"]["1"] for r in rows], "ko-", label="tok/s, batch 1")
        ax2.set_ylabel("decode tok/s, batch 1")
        axes[2].set_ylabel("GiB on the GPU")
        axes[2].set_title(f"GLM-4-9B on {gpu_result['environment']['device']}", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    return fig


def gpu_table(result: dict[str, Any]) -> Any:
    """The full-size GPU measurements (``benchmarks/results/quantization_9b.json``) as an HTML table."""
    from IPython.display import HTML  # optional: only a notebook shows it

    env = result["environment"]
    rows = [[r["precision"], f"{r['loaded_bytes'] / 2**30:.2f}", f"{r['planned_bytes'] / 2**30:.2f}",
             f"{r['tok_s']['1']:.1f}", f"{r['tok_s']['8']:.1f}"] for r in result["precisions"]]
    caption = (f"GLM-4-9B-Chat (random weights) on {env['device']}, torch {env['versions']['torch']}, "
               f"bitsandbytes {env['versions']['bitsandbytes']}: plain generate(), tok/s summed over the batch")
    return HTML(html_table(["precision", "weights on GPU GiB", "planned GiB", "decode tok/s batch 1",
                            "decode tok/s batch 8"], rows, caption=caption))
