"""Common GPUs, what CUDA shows of their memory, and the decode speed their memory bandwidth allows.

Decode reads every weight once per token, so a card's memory bandwidth divided by the bytes read per token is a
ceiling no software beats at batch 1 (glmkit's fast path reaches most of it on an H100, notebook 05). The table
holds the makers' published figures; the ceilings are computed from the GLM-4-9B-Chat config, not measured.
Taught in ``notebooks/09_the_guide_point_by_point.ipynb``.

>>> round(speed_ceiling("RTX 3060 12GB"), 1), round(speed_ceiling("RTX 3060 12GB", "nf4"), 1)
(20.5, 61.7)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from glmkit.models import glm4_9b_meta_model
from glmkit.planning import max_context, plan_memory, unit_weight_bytes
from glmkit.results import Table, table
from glmkit.vocabulary import PRECISIONS


@dataclass(frozen=True)
class Card:
    """A GPU as sold: memory in GB as printed on the box (10^9 bytes... or GiB, see ``memory_gib``), bandwidth."""

    name: str
    memory_gb: int  # as advertised; for NVIDIA's GDDR cards "12 GB" is 12 GiB of chips
    bandwidth_gb_s: float  # published peak memory bandwidth, GB/s
    link: str  # how two of them talk: "PCIe" or "NVLink"


CARDS_FILE = Path(__file__).parent / "assets" / "cards.csv"  # the makers' published figures, one card a row


def _read_cards() -> dict[str, Card]:
    with CARDS_FILE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["name"]: Card(r["name"], int(r["memory_gb"]), float(r["bandwidth_gb_s"]), r["link"]) for r in rows}


CARDS = _read_cards()


@cache
def bytes_per_token(precision: str = "bf16") -> int:
    """Weight bytes one GLM-4-9B-Chat decode step reads: every weight except the embedding table (one row of it)."""
    dtype, quantization = PRECISIONS[precision]
    sizes = unit_weight_bytes(glm4_9b_meta_model(), dtype, quantization)
    hidden = glm4_9b_meta_model().config.hidden_size
    return sum(sizes.values()) - sizes.get("model.rotary_emb", 0) - sizes["model.embed_tokens"] + 2 * hidden


def speed_ceiling(card: str | Card, precision: str = "bf16", tensor_parallel: int = 1) -> float:
    """Batch-1 decode tok/s that ``card``'s bandwidth allows. A layer split over several such cards has the same
    ceiling as one (the cards take turns); tensor parallelism over N divides the bytes per card by N (before the
    all-reduces' cost, which the ceiling leaves out)."""
    c = CARDS[card] if isinstance(card, str) else card
    return c.bandwidth_gb_s * 1e9 * tensor_parallel / bytes_per_token(precision)


def ceiling_table(cards: list[str] | None = None) -> Table:
    """Speed ceilings of GLM-4-9B-Chat for common cards: bf16 split over two, nf4 on one, bf16 TP=2."""
    rows = [[c.name, c.memory_gb, f"{c.bandwidth_gb_s:.0f}", c.link, f"{speed_ceiling(c):.0f}",
             f"{speed_ceiling(c, 'nf4'):.0f}", f"{speed_ceiling(c, tensor_parallel=2):.0f}"]
            for c in (CARDS[n] for n in (cards or CARDS))]
    return table(["card", "GB", "bandwidth GB/s", "two of them linked by", "bf16 split over 2: tok/s",
                  "nf4 on 1: tok/s", "bf16 TP=2: tok/s"], rows,
                 caption=f"GLM-4-9B-Chat, batch 1: bandwidth / bytes read per token ({bytes_per_token() / 1e9:.2f} GB "
                         f"bf16, {bytes_per_token('nf4') / 1e9:.2f} GB nf4); computed ceilings, not measurements")


def decision_table(context_len: int = 8192) -> Table:
    """What to run on one or two cards of a size, checked with the planner at ``context_len`` tokens."""
    cfg = glm4_9b_meta_model()
    ratio = bytes_per_token() / bytes_per_token("nf4")
    rows = []
    for size in ("8GiB", "11GiB", "12GiB", "16GiB", "24GiB"):
        one_bf16 = plan_memory(cfg, [size], context_len=context_len).fits
        one_nf4 = plan_memory(cfg, [size], quantization="nf4", context_len=context_len).fits
        two_bf16 = plan_memory(cfg, [size, size], context_len=context_len).fits
        if one_bf16:
            pick = "bf16 on one card; a second card serves a second copy (data parallel)"
        elif one_nf4 and two_bf16:
            pick = (f"nf4 on one card for speed (reads {ratio:.1f}x fewer bytes per token); bf16 split over two for reference "
                    "quality; tensor parallel only over NVLink, and only with a compiled decode path")
        elif two_bf16:
            pick = "bf16 split over two (device map)"
        elif one_nf4:
            pick = "nf4 on one card"
        else:
            pick = "nf4 split over two, or a bigger card"
        rows.append([size, "yes" if one_bf16 else "no", "yes" if one_nf4 else "no", "yes" if two_bf16 else "no",
                     f"{max_context(cfg, [size], quantization='nf4'):,}", pick])
    return table(["each card", "bf16 on 1", "nf4 on 1", "bf16 on 2", "nf4 on 1: longest context", "pick"], rows,
                 caption=f"GLM-4-9B-Chat, batch 1, {context_len}-token context, glmkit's planner (CUDA context counted)")
