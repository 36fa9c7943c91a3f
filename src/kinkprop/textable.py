"""Plain-text tables for terminals: one helper for every table the package prints."""

from __future__ import annotations


def text_table(head, rows, align: str = "right") -> str:
    """Columns padded to their widest cell. ``align``: ``"right"`` (numbers), ``"left"``, or
    ``"first-left"`` (a left-aligned label column, then right-aligned numbers)."""
    rows = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(i, c, w):
        left = align == "left" or (align == "first-left" and i == 0)
        return c.ljust(w) if left else c.rjust(w)

    return "\n".join("  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)
