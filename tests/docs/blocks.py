"""The shell blocks of Tandem's documents, read by the tests that run them.

A block that a test runs carries a marker on the line just before its fence, an HTML
comment that GitHub does not render:

    <!-- doc-test: readme-disagg-cpu -->
    ```bash
    ...
    ```

A test takes a block by its name with `doc_block("readme-disagg-cpu")` (or several with
`doc_blocks(...)`): the commands it runs are the document's own, never a copy. That call
is also the test's claim on the block: tests/docs/test_doc_markers.py finds the calls in
the test sources and checks that every marked block is claimed by exactly one of them.
A block that nothing on this machine can run says so, with the reason, in its marker:

    <!-- doc-test: skip: the DeepSeek-R1 request, to a GPU head node -->

Commands are what a shell would read: `\\` continuations joined, comments dropped,
quoted strings and here-documents spanning lines kept whole.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The documents whose every shell block a test runs (or declares not runnable here).
DOCUMENTS = ("README.md", "docs/multinode.md", "docs/multinode-quickstart.md", "docs/appliance.md")
# The functions through which a test takes (and so claims) blocks.
CLAIM_FUNCTIONS = ("doc_block", "doc_blocks")

_MARKER = re.compile(r"^<!-- doc-test: (?P<spec>.*?) -->\s*$")
_SKIP = "skip:"
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^\s`]*)")
_SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
_PLACEHOLDER = re.compile(r"<(?P<name>[a-z][a-z0-9-]*)>")
# `<<EOF`, `<<-EOF`, `<< 'EOF'`, `<<"EOF"`; not `<<<` (a here-string, one word).
_HEREDOC = re.compile(r"""<<(?P<strip>-?)\s*(?P<quote>['"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)(?P=quote)""")
_OPERATORS = {";", "&&", "||", "|", "&"}


class DocBlockError(AssertionError):
    """A document's shell block that cannot be read (an unclosed quote, a marker without block)."""


@dataclass(frozen=True)
class Command:
    """One command of a block as the shell runs it.

    `text` is what bash is given (comments dropped, continuations joined); `words` are the
    words of its first line as the shell splits them, here-document bodies left out, with
    the shell's operators (`;`, `&&`, `|`) as words of their own.
    """

    text: str
    line: int  # where it starts in the document
    document: str

    @property
    def words(self) -> list[str]:
        head = self.text.split("\n", 1)[0] if _HEREDOC.search(self.text) else self.text
        lexer = shlex.shlex(head, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        return list(lexer)

    @property
    def program(self) -> list[str]:
        """`words`, with `.venv/bin/tandem` spelled `tandem`: what the command runs, however reached."""
        words = self.words
        return [words[0].removeprefix(".venv/bin/"), *words[1:]] if words else []

    @property
    def is_simple(self) -> bool:
        """One program, no `;`, `&&`, pipes or background `&`."""
        return not _OPERATORS & set(self.words)

    def starts_with(self, prefix: str) -> bool:
        """Whether `program` begins with the words of `prefix` (e.g. "tandem serve")."""
        words = prefix.split()
        return self.program[: len(words)] == words

    @property
    def placeholders(self) -> set[str]:
        return {match["name"] for match in _PLACEHOLDER.finditer(self.text)}

    def substituted(self, values: Mapping[str, str]) -> Command:
        """The command with each `<placeholder>` it shows replaced; one without a value is an error."""
        missing = self.placeholders - set(values)
        if missing:
            raise DocBlockError(f"{self.where}: no value given for {', '.join(f'<{m}>' for m in sorted(missing))}")
        return replace(self, text=_PLACEHOLDER.sub(lambda match: values[match["name"]], self.text))

    def with_arguments(self, *arguments: str) -> Command:
        """The command with `arguments` appended (a `--dry-run`); simple commands only."""
        if not self.is_simple or "\n" in self.text:
            raise DocBlockError(f"{self.where}: arguments can only be appended to a one-line simple command")
        return replace(self, text=f"{self.text} {shlex.join(arguments)}")

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


@dataclass(frozen=True)
class Block:
    """A fenced shell block and the marker before it (None when it has none)."""

    document: str
    line: int  # of the opening fence
    marker: str | None
    commands: tuple[Command, ...]

    @property
    def name(self) -> str | None:
        """The name a test claims it by; None for a skipped or unmarked block."""
        if self.marker is None or self.skip_reason is not None:
            return None
        return self.marker

    @property
    def skip_reason(self) -> str | None:
        if self.marker is None or not self.marker.startswith(_SKIP):
            return None
        return self.marker[len(_SKIP) :].strip()

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    def expect(self, *prefixes: str) -> tuple[Command, ...]:
        """The commands, checked to be, in order, commands starting with `prefixes`.

        A test that runs a block step by step states its shape this way: a command added,
        removed or reordered in the document fails here, naming the block.
        """
        shape_ok = len(self.commands) == len(prefixes) and all(
            command.starts_with(prefix) for command, prefix in zip(self.commands, prefixes, strict=True)
        )
        if not shape_ok:
            listing = "\n".join(f"  {command.line}: {command.text}" for command in self.commands)
            raise DocBlockError(
                f"{self.where} ({self.name}): expected commands starting with {list(prefixes)}, the document has\n"
                f"{listing}\n(update the test that claims it together with the document)"
            )
        return self.commands


def read_blocks(text: str, document: str) -> list[Block]:
    """Every fenced shell block of a markdown text, with its marker."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        closing = next((i for i in range(index + 1, len(lines)) if lines[i].strip().startswith(fence["fence"])), None)
        if closing is None:
            raise DocBlockError(f"{document}:{index + 1}: a fence that is never closed")
        if fence["info"] in _SHELL_LANGUAGES:
            marker = _MARKER.match(lines[index - 1].strip()) if index > 0 else None
            # An indented block (in a list item): its commands start at the fence's column.
            body = [line.removeprefix(fence["indent"]) for line in lines[index + 1 : closing]]
            commands = split_commands(body, first_line=index + 2, document=document)
            blocks.append(Block(document, index + 1, marker["spec"].strip() if marker else None, tuple(commands)))
        index = closing + 1
    return blocks


def stray_markers(text: str, document: str) -> list[str]:
    """Markers that stand before no shell block (a typo in the fence, a block moved away)."""
    lines = text.splitlines()
    problems = []
    for index, line in enumerate(lines):
        if _MARKER.match(line.strip()):
            fence = _FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
            if fence is None or fence["info"] not in _SHELL_LANGUAGES:
                problems.append(f"{document}:{index + 1}: a doc-test marker not followed by a ```bash block")
    return problems


def split_commands(lines: list[str], first_line: int, document: str) -> list[Command]:
    """The commands of a block's lines (`first_line`: the document line of `lines[0]`)."""
    commands = []
    index = 0
    while index < len(lines):
        start = index
        text, index = _logical_line(lines, index, first_line, document)
        for heredoc in _HEREDOC.finditer(text):
            body, index = _heredoc_body(lines, index, heredoc, first_line + start, document)
            text += "\n" + body
        if text.strip():
            commands.append(Command(text.strip(), first_line + start, document))
    return commands


def _logical_line(lines: list[str], index: int, first_line: int, document: str) -> tuple[str, int]:
    """One command's text from `lines[index]` on, and the index of the line after it.

    Follows the shell's quoting: inside quotes a line break is part of the word; outside,
    `\\` at the end of a line continues the command and `#` at the start of a word begins
    a comment to the end of the line.
    """
    out: list[str] = []
    quote: str | None = None
    start = index
    while index < len(lines):
        line = lines[index]
        index += 1
        position = 0
        continued = False
        while position < len(line):
            char = line[position]
            if quote == "'":
                quote = None if char == "'" else quote
            elif char == "\\" and quote != "'":
                if position == len(line) - 1:
                    continued = True  # backslash-newline: the shell joins the lines
                    break
                out.append(line[position : position + 2])
                position += 2
                continue
            elif quote == '"':
                quote = None if char == '"' else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and (not out or out[-1][-1:].isspace() or out[-1][-1:] in ";&|("):
                break  # a comment: the rest of the line
            out.append(char)
            position += 1
        if continued:
            continue
        if quote is None:
            return "".join(out), index
        out.append("\n")  # the quoted string goes on on the next line
    raise DocBlockError(f"{document}:{first_line + start}: unclosed {quote or 'continuation'} at the end of the block")


def _heredoc_body(lines: list[str], index: int, heredoc: re.Match[str], line: int, document: str) -> tuple[str, int]:
    body = []
    while index < len(lines):
        text = lines[index]
        index += 1
        body.append(text)
        if (text.lstrip("\t") if heredoc["strip"] else text) == heredoc["word"]:
            return "\n".join(body), index
    raise DocBlockError(f"{document}:{line}: here-document {heredoc['word']} never ends")


def document_blocks(documents: Iterable[str] = DOCUMENTS, root: Path = REPO) -> list[Block]:
    return [block for document in documents for block in read_blocks((root / document).read_text(), document)]


def doc_blocks(*names: str) -> list[Block]:
    """The blocks marked with `names`, for the test that runs them (and claims them so).

    Call it with literal names: tests/docs/test_doc_markers.py reads the claims from the source.
    """
    return _named(names)


def doc_block(name: str) -> Block:
    """The block marked `name` (see `doc_blocks`)."""
    (block,) = _named([name])
    return block


def _named(names: Iterable[str]) -> list[Block]:
    by_name = {block.name: block for block in document_blocks() if block.name}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise DocBlockError(f"no block marked {missing} in {', '.join(DOCUMENTS)}")
    return [by_name[name] for name in names]


# --- claims: which test runs which block ----------------------------------------------------


@dataclass(frozen=True)
class Claim:
    name: str
    where: str  # file:line of the call


def find_claims(sources: Iterable[Path], root: Path = REPO) -> tuple[list[Claim], list[str]]:
    """The `doc_block(...)`/`doc_blocks(...)` calls in `sources`, and calls that name no literal block."""
    claims, problems = [], []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if function not in CLAIM_FUNCTIONS:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for argument in node.args:
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    claims.append(Claim(argument.value, where))
                else:
                    problems.append(
                        f"{where}: {function}() takes literal block names (the claims are read from the source)"
                    )
            if node.keywords:
                problems.append(f"{where}: {function}() takes block names only")
    return claims, problems


def audit(blocks: Iterable[Block], claims: Iterable[Claim]) -> list[str]:
    """What is wrong between the documents' blocks and the tests' claims; empty when all is well."""
    problems = []
    claimed_at: dict[str, list[str]] = {}
    for claim in claims:
        claimed_at.setdefault(claim.name, []).append(claim.where)
    marked_at: dict[str, list[str]] = {}
    for block in blocks:
        if block.marker is None:
            problems.append(
                f"{block.where}: a shell block without a doc-test marker (name it for the test that runs "
                "it, or `skip: WHY` where nothing can run it here)"
            )
        elif block.marker.startswith(_SKIP):
            if not block.skip_reason:
                problems.append(f"{block.where}: `skip:` without a reason")
        elif not _NAME.match(block.marker):
            problems.append(
                f"{block.where}: bad doc-test marker {block.marker!r} (a-z, 0-9 and dashes, or `skip: WHY`)"
            )
        else:
            marked_at.setdefault(block.marker, []).append(block.where)
    for name, places in marked_at.items():
        if len(places) > 1:
            problems.append(f"block name {name!r} is used more than once: {', '.join(places)}")
        if name not in claimed_at:
            problems.append(f"{places[0]}: block {name!r} is claimed by no test (no doc_block({name!r}) call)")
    for name, places in claimed_at.items():
        if name not in marked_at:
            problems.append(f"{', '.join(places)}: claims block {name!r}, which no document marks")
        elif len(places) > 1:
            problems.append(f"block {name!r} is claimed more than once: {', '.join(places)}")
    return problems
