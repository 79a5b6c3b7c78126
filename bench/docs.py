"""Writing a benchmark's results into its own section of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, section: str) -> None:
    """Put `section` (markdown starting with its `## Title` line) in place of the section
    with that title, or append it; every other section stays as it is. Heading-like lines
    inside code fences (a shell comment, say) do not end a section."""
    title = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    section = section.rstrip("\n") + "\n"
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = len(lines)
    in_fence = False
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,2} ", lines[i]):
            end = i
            break
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + rest if rest else ""))
