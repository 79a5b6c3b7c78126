"""Benchmarks write their own section of docs/benchmarks.md and leave the others alone."""

from pathlib import Path

from bench.docs import write_section

DOC = """# Benchmarks

## First

old first

```bash
# a shell comment, not a heading
run --it
```

## Second

second stays
"""


def test_a_section_replaces_its_namesake_up_to_the_next_heading(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    write_section(path, "## First\n\nnew first\n")
    assert path.read_text() == "# Benchmarks\n\n## First\n\nnew first\n\n## Second\n\nsecond stays\n"


def test_a_new_section_is_appended_and_a_missing_file_made(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    write_section(path, "## Only\n\nbody")
    assert path.read_text() == "# Benchmarks\n\n## Only\n\nbody\n"
    write_section(path, "## Another\n\nmore\n")
    assert path.read_text() == "# Benchmarks\n\n## Only\n\nbody\n\n## Another\n\nmore\n"
