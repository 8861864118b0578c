"""The markdown table a benchmark prints as it measures, and writes to a file at the end."""

from __future__ import annotations

from pathlib import Path


class Table:
    """Lines printed at once (a long benchmark shows each row when it is measured), kept for
    `save`."""

    def __init__(self, *header: str) -> None:
        self.lines = list(header)
        print("\n".join(header), flush=True)

    def row(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: str | None) -> None:
        if path:
            Path(path).write_text("\n".join(self.lines) + "\n")
