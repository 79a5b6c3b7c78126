"""A benchmark's report: markdown tables, and its own section of docs/benchmarks.md, which is its
`## Title` line, the results a benchmark writes, the MEASURED_END line and the prose written by hand
to read them: rewriting the section replaces the results and keeps the prose and the other sections."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

MEASURED_END = "<!-- end of measured results: the text below is kept when the benchmark rewrites them -->"


def table(headings: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines, under `headings` ("a | b | c"); an empty cell is `| |`."""
    columns = headings.split(" | ")
    return [
        "|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|"
        for row in [columns, ["---"] * len(columns), *rows]
    ]


def write_section(path: Path, section: str) -> None:
    """Put `section` (markdown starting with its `## Title` line) in place of the results of the section
    with that title, or append it. Heading-like lines in code fences (a shell comment) do not end a section."""
    title = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    results = section.rstrip("\n") + "\n\n"
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + results + MEASURED_END + "\n")
        return
    end, in_fence = len(lines), False
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,2} ", lines[i]):
            end = i
            break
    marker = next((i for i in range(start, end) if lines[i].rstrip() == MEASURED_END), None)
    prose = "".join(lines[marker:end]).rstrip("\n") + "\n" if marker is not None else MEASURED_END + "\n"
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + results + prose + ("\n" + rest if rest else ""))


def met(ok: bool) -> str:
    """A target's verdict in a table cell, a miss in bold."""
    return "yes" if ok else "**no**"


def cells(figures: Mapping[str, float], columns: Iterable[tuple[str, str]]) -> list[str]:
    """A row's cells: each (figure, format) column's figure formatted, a time in seconds (`..._s`) in ms."""
    return [fmt.format(figures[name] * (1000 if name.endswith("_s") else 1)) for name, fmt in columns]
