"""Tiny table rendering shared by glmkit's result dataclasses (HTML in Jupyter, text in a terminal).

>>> print(text_table(["device", "GiB"], [["cuda:0", "11.50"], ["cpu", "2.00"]]))
device  GiB
------  -----
cuda:0  11.50
cpu     2.00
"""

from __future__ import annotations

import html
from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned plain-text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> str:
    """The same table as HTML, for ``_repr_html_`` in JupyterLab."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def gib(n_bytes: float) -> str:
    """Format a byte count as GiB with two decimals: ``gib(3 * 2**30) == '3.00 GiB'``."""
    return f"{n_bytes / 2**30:.2f} GiB"
