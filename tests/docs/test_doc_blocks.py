"""The block reader (tests/docs/blocks.py): commands as bash reads them, markers, and the
audit of markers against the tests' claims."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.docs.blocks import (
    Block,
    Claim,
    Command,
    DocBlockError,
    audit,
    find_claims,
    read_blocks,
    stray_markers,
)


def _doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _commands(body: str) -> list[str]:
    (block,) = read_blocks(f"<!-- doc-test: b -->\n```bash\n{_doc(body)}```\n", "doc.md")
    return [command.text for command in block.commands]


def test_a_marker_names_the_block_below_it_and_lines_count_from_the_document() -> None:
    text = _doc(
        """
        # Title

        <!-- doc-test: first-block -->
        ```bash
        make run
        ```

        ```python
        print("not a shell block")
        ```

        <!-- doc-test: skip: needs 8 GPUs per node -->
        ```sh
        make test
        ```
        """
    )
    first, second = read_blocks(text, "README.md")
    assert (first.name, first.skip_reason, first.where) == ("first-block", None, "README.md:4")
    assert [(c.text, c.where) for c in first.commands] == [("make run", "README.md:5")]
    assert (second.name, second.skip_reason) == (None, "needs 8 GPUs per node")


def test_comments_are_dropped_but_not_inside_quotes_or_words() -> None:
    assert _commands(
        """
        # a comment line
        make run    # fresh machine: then
                    # more of the comment
        echo "a # in quotes" 'and # here' word#hash  # gone
        """
    ) == ["make run", "echo \"a # in quotes\" 'and # here' word#hash"]


def test_continuations_join_lines_and_quoted_strings_span_them() -> None:
    commands = _commands(
        """
        curl 127.0.0.1:8000/v1/chat/completions \\
          -H "Content-Type: application/json" \\
          -d '{"model": "tiny-llama", "stream": true,
               "messages": [{"role": "user", "content": "it is # not a comment"}]}'
        make down
        """
    )
    assert commands == [
        'curl 127.0.0.1:8000/v1/chat/completions   -H "Content-Type: application/json"   '
        '-d \'{"model": "tiny-llama", "stream": true,\n'
        '       "messages": [{"role": "user", "content": "it is # not a comment"}]}\'',
        "make down",
    ]


def test_a_here_document_is_part_of_its_command() -> None:
    commands = _commands(
        """
        curl -d @- 127.0.0.1:8000 <<EOF
        {"prompt": "$PROMPT"}  # kept: the body is data
        EOF
        echo after
        """
    )
    assert commands == [
        'curl -d @- 127.0.0.1:8000 <<EOF\n{"prompt": "$PROMPT"}  # kept: the body is data\nEOF',
        "echo after",
    ]
    command = Command(commands[0], 1, "doc.md")
    assert command.words == ["curl", "-d", "@-", "127.0.0.1:8000", "<<EOF"]


def test_an_indented_block_reads_from_its_fence() -> None:
    text = "- step one:\n\n  <!-- doc-test: listed -->\n  ```bash\n  make head \\\n    ENGINE=cpu\n  ```\n"
    (block,) = read_blocks(text, "doc.md")
    assert block.name == "listed"
    assert [c.text for c in block.commands] == ["make head   ENGINE=cpu"]


@pytest.mark.parametrize(
    "body", ["echo 'never closed\n", "echo \\\n", "cat <<EOF\nno end\n"], ids=["quote", "continuation", "heredoc"]
)
def test_an_unfinished_command_is_an_error_naming_its_line(body: str) -> None:
    with pytest.raises(DocBlockError, match=r"doc\.md:3"):
        read_blocks(f"<!-- doc-test: b -->\n```bash\n{body}```\n", "doc.md")


def test_words_programs_and_operators() -> None:
    command = Command(".venv/bin/tandem serve graphs.agg:Frontend -f 'configs/a b.yaml'", 1, "doc.md")
    assert command.program == ["tandem", "serve", "graphs.agg:Frontend", "-f", "configs/a b.yaml"]
    assert command.starts_with("tandem serve") and not command.starts_with("tandem infra")
    assert command.is_simple
    assert not Command("export A=1; tandem ray head", 1, "doc.md").is_simple
    assert Command("export A=1; tandem ray head", 1, "doc.md").words == ["export", "A=1", ";", "tandem", "ray", "head"]
    assert command.with_arguments("--dry-run").text.endswith("configs/a b.yaml' --dry-run")


def test_placeholders_are_substituted_where_shown_and_a_missing_value_is_an_error() -> None:
    command = Command("make prefill NATS_SERVER=nats://<head-ip>:4222 VLLM_HOST_IP=<this-node-ip>", 7, "README.md")
    assert command.placeholders == {"head-ip", "this-node-ip"}
    filled = command.substituted({"head-ip": "10.1.2.1", "this-node-ip": "10.1.2.2", "unused": "x"})
    assert filled.text == "make prefill NATS_SERVER=nats://10.1.2.1:4222 VLLM_HOST_IP=10.1.2.2"
    with pytest.raises(DocBlockError, match=r"README\.md:7: no value given for <this-node-ip>"):
        command.substituted({"head-ip": "10.1.2.1"})


def test_expect_checks_the_shape_of_a_block() -> None:
    commands = (Command("make model", 4, "README.md"), Command(".venv/bin/tandem infra up", 5, "README.md"))
    block = Block("README.md", 3, "b", commands)
    assert block.expect("make model", "tandem infra up") == block.commands
    with pytest.raises(DocBlockError, match="expected commands starting with"):
        block.expect("make model", "tandem serve")
    with pytest.raises(DocBlockError):
        block.expect("make model")


def test_a_marker_before_no_shell_block_is_reported() -> None:
    text = "<!-- doc-test: lost -->\n\n```bash\nmake run\n```\n<!-- doc-test: python -->\n```python\nx\n```\n"
    assert stray_markers(text, "doc.md") == [
        "doc.md:1: a doc-test marker not followed by a ```bash block",
        "doc.md:6: a doc-test marker not followed by a ```bash block",
    ]


def _block(marker: str | None, line: int = 1) -> Block:
    return Block("doc.md", line, marker, ())


def test_audit_passes_when_each_named_block_has_one_claim() -> None:
    blocks = [_block("one"), _block("skip: no GPUs here", 5)]
    assert audit(blocks, [Claim("one", "tests/a.py:3")]) == []


def test_audit_reports_unmarked_unclaimed_twice_claimed_and_unknown_blocks() -> None:
    blocks = [
        _block(None, 1),
        _block("lonely", 10),
        _block("popular", 20),
        _block("skip:", 30),
        _block("Bad Name", 40),
        _block("twin", 50),
        _block("twin", 60),
    ]
    claims = [
        Claim("popular", "tests/a.py:1"),
        Claim("popular", "tests/b.py:2"),
        Claim("ghost", "tests/c.py:3"),
        Claim("twin", "tests/d.py:4"),
    ]
    assert audit(blocks, claims) == [
        "doc.md:1: a shell block without a doc-test marker (name it for the test that runs it, or `skip: WHY` where "
        "nothing can run it here)",
        "doc.md:30: `skip:` without a reason",
        "doc.md:40: bad doc-test marker 'Bad Name' (a-z, 0-9 and dashes, or `skip: WHY`)",
        "doc.md:10: block 'lonely' is claimed by no test (no doc_block('lonely') call)",
        "block name 'twin' is used more than once: doc.md:50, doc.md:60",
        "block 'popular' is claimed more than once: tests/a.py:1, tests/b.py:2",
        "tests/c.py:3: claims block 'ghost', which no document marks",
    ]


def test_claims_are_read_from_literal_calls_in_the_sources(tmp_path: Path) -> None:
    source = tmp_path / "tests" / "test_x.py"
    source.parent.mkdir()
    source.write_text(
        "from tests.docs import blocks\n"
        "from tests.docs.blocks import doc_block, doc_blocks\n"
        "A = doc_block('a')\n"
        "B, C = doc_blocks('b', 'c')\n"
        "D = blocks.doc_block('d')\n"
        "NAME = 'e'\n"
        "E = doc_block(NAME)\n"
        "TEXT = \"doc_block('not-a-call')\"\n"
    )
    claims, problems = find_claims([source], root=tmp_path)
    assert claims == [Claim(name, f"tests/test_x.py:{line}") for name, line in [("a", 3), ("b", 4), ("c", 4), ("d", 5)]]
    assert problems == [
        "tests/test_x.py:7: doc_block() takes literal block names (the claims are read from the source)"
    ]
