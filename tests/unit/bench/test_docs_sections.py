"""Benchmarks write their results into their own section of docs/benchmarks.md: the prose that
reads them, below the results, and the other sections stay as they are."""

from pathlib import Path

from bench.harness.cli import MEASURED_END, table, write_section

DOC = f"""# Benchmarks

## First

old results

```bash
# a shell comment, not a heading
run --it
```

{MEASURED_END}

How to read the first.

## Second

second stays
"""


def test_the_results_are_replaced_and_the_prose_below_them_kept(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    write_section(path, "## First\n\nnew results\n")
    assert path.read_text() == (
        f"# Benchmarks\n\n## First\n\nnew results\n\n{MEASURED_END}\n\nHow to read the first.\n\n"
        "## Second\n\nsecond stays\n"
    )


def test_a_section_without_prose_gets_the_marker_below_its_results(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## First\n\nold\n\n## Second\n\nsecond stays\n")
    write_section(path, "## First\n\nnew\n")
    assert path.read_text() == f"# Benchmarks\n\n## First\n\nnew\n\n{MEASURED_END}\n\n## Second\n\nsecond stays\n"


def test_a_new_section_is_appended_and_a_missing_file_made(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    write_section(path, "## Only\n\nbody")
    assert path.read_text() == f"# Benchmarks\n\n## Only\n\nbody\n\n{MEASURED_END}\n"
    write_section(path, "## Another\n\nmore\n")
    assert (
        path.read_text()
        == f"# Benchmarks\n\n## Only\n\nbody\n\n{MEASURED_END}\n\n## Another\n\nmore\n\n{MEASURED_END}\n"
    )


def test_tables_leave_empty_cells_empty() -> None:
    assert table("a | b", [["1", ""]]) == ["| a | b |", "| --- | --- |", "| 1 | |"]
