"""bench/request_path.py: how its lean client judges a streamed response."""

from __future__ import annotations

from bench.request_path import completion_tokens


def _sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + event + b"\n\n" for event in events)


def test_a_complete_stream_counts_the_usage_chunks_tokens() -> None:
    body = _sse(
        b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"delta":{"content":"hello there"}}],"usage":null}',
        b'{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":16,"total_tokens":56}}',
        b"[DONE]",
    )
    assert completion_tokens(200, body) == 16


def test_failures_count_nothing() -> None:
    error = _sse(b'{"error":{"message":"boom","type":"internal_error"}}', b"[DONE]")
    cut_short = _sse(b'{"choices":[],"usage":{"completion_tokens":16}}')
    assert completion_tokens(200, error) == 0
    assert completion_tokens(200, cut_short) == 0
    assert completion_tokens(503, b'{"error":{"message":"no model"}}') == 0
