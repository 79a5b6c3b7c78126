"""The documents' shell blocks are tests: each one is run by exactly one test, or its
marker says why nothing runs it on this machine (tests/docs/blocks.py has the markers)."""

from __future__ import annotations

from tests.docs.blocks import DOCUMENTS, REPO, audit, document_blocks, find_claims, stray_markers


def test_every_shell_block_is_run_by_one_test_or_says_why_not() -> None:
    claims, problems = find_claims(sorted((REPO / "tests").rglob("*.py")))
    problems += audit(document_blocks(), claims)
    for document in DOCUMENTS:
        problems += stray_markers((REPO / document).read_text(), document)
    assert not problems, "\n".join(problems)
