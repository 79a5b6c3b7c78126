"""The conformance tier's machinery: a case as data, what a server answered to it, and the
comparison of Tandem's answer with vLLM's own server's.

The comparison is strict. Both answers must have the same HTTP status and media type; the
same keys at every level, each with the same JSON types (a key missing where the other has
it counts); and, for a 200, the same values everywhere (floats, which are logprobs, within
`FLOAT_TOLERANCE`). Streams are compared twice: their chunks' shape (all chunks' keys and
types merged, header values such as `object` and `model` alike) and their content put back
together per choice index (text, logprobs, finish_reason) with the final usage, and
their tool calls as streamed (each call's first piece its id and name, then pieces of its
arguments; not held back where vLLM's are not). A
/v1/responses stream is typed events instead: compared event by event once each item's
deltas are merged (`merged_deltas`), the last one holding the whole Response. Error
bodies are compared by shape only: vLLM's and Tandem's words differ.

Every exception is an `Allowed` entry: a JSON path, a rule, the reason. `ALLOWED` holds
those of every case, a case's own `allowed` those of that case alone; a case where Tandem
answers otherwise on purpose (another status) names its `Deviation`, and both servers'
answers are asserted. Paths are dotted keys with `[]` for a list's items:
`choices[].message.content`; a chunk's paths are the same as a body's
(`choices[].delta.content`). Beyond those, only `normalized_chunks` puts streams alike
(how they cut the same text into chunks), by the same rules on both sides.

`tests/e2e/test_agg_graph.py` runs the tier (its graph, after vLLM's server has stopped),
`tests/e2e/conformance_cases.py` holds the cases, `tests/e2e/test_vllm_conformance.py`
checks this module on hand-made bodies.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

JsonPath = str


class Rule(enum.Enum):
    """How an allowed difference at a path is treated."""

    VLLM_ONLY = "only vLLM's answer has it (and what is under it)"
    VLLM_ONLY_NULL = "only vLLM's answer has it, and there it is always null"
    TANDEM_NULL_FOR_ABSENT = "Tandem's is null where vLLM's leaves the key out"
    VLLM_NULL_FOR_ABSENT = "vLLM's is null where Tandem's leaves the key out"
    TANDEM_ONLY = "only Tandem's answer has it"
    TANDEM_ALIAS = "only Tandem's answer has it, another name for the key `of` beside it: the same value"
    TYPE_MAY_DIFFER = "both have it, its JSON type may differ (and so may its value)"
    VALUE_MAY_DIFFER = "both have it with the same type; its value may differ"
    MAP = "an object whose keys are data (tokens), not field names"
    JSON_TEXT = "a string of JSON: the same JSON value on both, however it is spaced"


@dataclass(frozen=True)
class Allowed:
    path: JsonPath
    rule: Rule
    why: str
    of: str | None = None  # TANDEM_ALIAS: the key beside it whose value it repeats


def _in_responses(path: JsonPath, rule: Rule, why: str) -> tuple[Allowed, ...]:
    """An allowed difference of a Response body at `path`, and at the same place in its
    stream's events: the Response under `response.`, an output item (`output[].x`) as `item.x`."""
    paths = [path, f"response.{path}"]
    if path.startswith("output[]."):
        paths.append("item." + path.removeprefix("output[]."))
    return tuple(Allowed(each, rule, why) for each in paths)


ALLOWED: tuple[Allowed, ...] = (
    # Different on every request by design.
    Allowed("id", Rule.VALUE_MAY_DIFFER, "a fresh request id"),
    Allowed("created", Rule.VALUE_MAY_DIFFER, "the time of the request"),
    Allowed("data[].created", Rule.VALUE_MAY_DIFFER, "when the model was loaded"),
    # vLLM's extras, not in OpenAI's API, that a vLLM server sends to every client.
    Allowed("system_fingerprint", Rule.VLLM_ONLY, "vLLM's version and config hash; OpenAI's clients ignore it"),
    Allowed("service_tier", Rule.VLLM_ONLY_NULL, "OpenAI's field of its paid tiers; null there when unused"),
    Allowed("kv_transfer_params", Rule.VLLM_ONLY_NULL, "vLLM's disaggregation hand-off, null without a connector"),
    Allowed("ec_transfer_params", Rule.VLLM_ONLY_NULL, "vLLM's encoder-cache hand-off, null without one"),
    Allowed("metrics", Rule.VLLM_ONLY_NULL, "vLLM's per-request metrics, null unless asked for"),
    # prompt_logprobs: null unless asked for (or computed for echo's logprobs); Tandem
    # leaves the key out then.
    Allowed("prompt_logprobs", Rule.VLLM_ONLY_NULL, "null unless asked for"),
    Allowed("prompt_logprobs", Rule.VLLM_NULL_FOR_ABSENT, "null unless asked for"),
    Allowed("prompt_logprobs[]", Rule.MAP, "keyed by token id"),
    Allowed("choices[].prompt_logprobs", Rule.VLLM_ONLY_NULL, "null unless asked for"),
    Allowed("choices[].prompt_logprobs", Rule.VLLM_NULL_FOR_ABSENT, "null unless asked for"),
    Allowed("choices[].prompt_logprobs[]", Rule.MAP, "keyed by token id"),
    Allowed("prompt_token_ids", Rule.VLLM_ONLY_NULL, "vLLM's return_token_ids, which Tandem does not serve"),
    Allowed("prompt_text", Rule.VLLM_ONLY_NULL, "vLLM's return_token_ids, which Tandem does not serve"),
    Allowed("choices[].token_ids", Rule.VLLM_ONLY_NULL, "vLLM's return_token_ids, which Tandem does not serve"),
    Allowed("choices[].prompt_token_ids", Rule.VLLM_ONLY_NULL, "vLLM's return_token_ids (completions)"),
    Allowed(
        "choices[].prompt_token_ids",
        Rule.VLLM_NULL_FOR_ABSENT,
        "vLLM's return_token_ids; a stream's echo carries them (as Tandem's does), other chunks null",
    ),
    Allowed("choices[].routed_experts", Rule.VLLM_ONLY_NULL, "vLLM's MoE routing record, null for a dense model"),
    Allowed("choices[].stop_reason", Rule.VLLM_ONLY, "vLLM's: which stop string or token id ended the choice"),
    Allowed(
        "usage.completion_tokens_details",
        Rule.VLLM_ONLY_NULL,
        "OpenAI's reasoning-token counts: null but for chat with a reasoning parser (then both count)",
    ),
    Allowed("usage.prompt_tokens_details.multimodal_tokens", Rule.VLLM_ONLY_NULL, "image/audio tokens: none here"),
    Allowed(
        "usage.prompt_tokens_details.created_cache_tokens",
        Rule.VLLM_ONLY,
        "vLLM's count of prompt tokens its prefix cache newly stored (the Anthropic API's); Tandem does not count it",
    ),
    # OpenAI's message fields that vLLM always sends as null; OpenAI's clients read a
    # missing one as null.
    Allowed("choices[].message.refusal", Rule.VLLM_ONLY_NULL, "OpenAI's refusal text; never set by vLLM"),
    Allowed("choices[].message.annotations", Rule.VLLM_ONLY_NULL, "OpenAI's web-search citations"),
    Allowed("choices[].message.audio", Rule.VLLM_ONLY_NULL, "OpenAI's audio output"),
    Allowed("choices[].message.function_call", Rule.VLLM_ONLY_NULL, "OpenAI's deprecated single function call"),
    Allowed("choices[].message.reasoning", Rule.VLLM_ONLY_NULL, "vLLM's reasoning text, null without a parser"),
    # A reasoning parser's text (both servers run one: tests/e2e/vllm_server.py), which vLLM
    # 0.32 calls `reasoning`; Tandem sends it as `reasoning_content` as well, the name of
    # DeepSeek's API and of older vLLM releases, which clients of reasoning models read.
    *(
        Allowed(f"choices[].{where}.reasoning_content", Rule.TANDEM_ALIAS, "DeepSeek's name", of="reasoning")
        for where in ("message", "delta")
    ),
    # The prefix cache of each server has seen different requests before this one.
    Allowed("usage.prompt_tokens_details.cached_tokens", Rule.VALUE_MAY_DIFFER, "each server's own cache history"),
    # Streams.
    Allowed(
        "usage",
        Rule.TANDEM_NULL_FOR_ABSENT,
        "with include_usage OpenAI's API sends usage: null on every chunk before the last, as Tandem does;"
        " vLLM leaves the key out; OpenAI's clients read both alike",
    ),
    # /v1/models: who serves it, and vLLM's OpenAI-era permission objects.
    Allowed("data[].owned_by", Rule.VALUE_MAY_DIFFER, "the server's name: vllm, tandem"),
    Allowed("data[].permission", Rule.VLLM_ONLY, "OpenAI's retired permission list; Tandem grants nothing per model"),
    # /version: Tandem's own version, and the vLLM its workers run beside it.
    Allowed("version", Rule.VALUE_MAY_DIFFER, "each server's own version"),
    Allowed("vllm_version", Rule.TANDEM_ONLY, "the vLLM that Tandem's workers run"),
    # Error bodies: compared by shape; the words, and what each server names, differ.
    Allowed("error.message", Rule.VALUE_MAY_DIFFER, "each server's words"),
    Allowed(
        "error.type",
        Rule.VALUE_MAY_DIFFER,
        "Tandem uses OpenAI's types (invalid_request_error, ...), which OpenAI's clients and"
        " docs name; vLLM puts its exception's class name there (BadRequestError, NotFoundError)",
    ),
    Allowed(
        "error.code",
        Rule.TYPE_MAY_DIFFER,
        "Tandem uses OpenAI's codes (a string such as model_not_found, or null); vLLM repeats the HTTP status",
    ),
    Allowed(
        "error.param",
        Rule.TYPE_MAY_DIFFER,
        "Tandem names the parameter wherever it knows it; vLLM names it for some checks only"
        " (null for others, `body.temperature` for a wrong type)",
    ),
    # Completions' top_logprobs: {token: logprob} per position.
    Allowed("choices[].logprobs.top_logprobs[]", Rule.MAP, "keyed by token text"),
    # /v1/responses: its bodies, and the same paths in its stream's events (under
    # `response.`, and an output item's under `item.`).
    *_in_responses("created_at", Rule.VALUE_MAY_DIFFER, "the time of the request"),
    *_in_responses("id", Rule.VALUE_MAY_DIFFER, "a fresh response id"),
    *_in_responses("output[].id", Rule.VALUE_MAY_DIFFER, "a fresh item id"),
    *_in_responses("output[].call_id", Rule.VALUE_MAY_DIFFER, "a fresh tool call id, random on both"),
    Allowed("item_id", Rule.VALUE_MAY_DIFFER, "a fresh item id"),
    Allowed("sequence_number", Rule.VALUE_MAY_DIFFER, "counts the events, which each server cuts its own way"),
    *_in_responses("usage.input_tokens_details.cached_tokens", Rule.VALUE_MAY_DIFFER, "each server's cache history"),
    *_in_responses(
        "usage.input_tokens_details.cache_write_tokens",
        Rule.VLLM_ONLY,
        "prompt tokens newly written to the prefix cache: Tandem does not count them (README)",
    ),
    *(
        entry
        for path in (
            "usage.input_tokens_details.input_tokens_per_turn",
            "usage.input_tokens_details.cached_tokens_per_turn",
            "usage.output_tokens_details.tool_output_tokens",
            "usage.output_tokens_details.output_tokens_per_turn",
            "usage.output_tokens_details.tool_output_tokens_per_turn",
        )
        for entry in _in_responses(path, Rule.VLLM_ONLY, "vLLM's counts of its built-in tools' turns: none here")
    ),
    *(
        entry
        for path in ("input_messages", "output_messages")
        for entry in _in_responses(path, Rule.VLLM_ONLY_NULL, "vLLM's enable_response_messages, not served")
    ),
    *_in_responses("kv_transfer_params", Rule.VLLM_ONLY_NULL, "vLLM's disaggregation hand-off, null without one"),
    *_in_responses("ec_transfer_params", Rule.VLLM_ONLY_NULL, "vLLM's encoder-cache hand-off, null without one"),
    # Fields of newer OpenAI objects that vLLM's models (the openai package's) add as null;
    # OpenAI's clients read a missing one as null.
    *(
        entry
        for path in (
            "output[].phase",
            "output[].async",
            "output[].caller",
            "output[].namespace",
            "tools[].allowed_callers",
            "tools[].async",
            "tools[].defer_loading",
            "tools[].output_schema",
            "reasoning.context",
            "reasoning.mode",
        )
        for entry in _in_responses(path, Rule.VLLM_ONLY_NULL, "a newer OpenAI field, null in vLLM's answer")
    ),
)


# Logprobs are the only floats in these bodies; the same kernels on the same model agree
# to the last bit in practice, the tolerance is for a prefix-cache hit on one server only.
FLOAT_TOLERANCE = 1e-3


# --- cases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenOf:
    """In a case's body: the id of the single token that `text` encodes to (without BOS).
    As a key of `logit_bias` it becomes the id's string, as JSON keys must be."""

    text: str


@dataclass(frozen=True)
class Deviation:
    """Where Tandem answers otherwise on purpose (the case's comment says why): what each
    server answers, both asserted (so the record stays true), and the parameter Tandem's
    error names."""

    vllm_status: int
    tandem_status: int
    tandem_param: str | None


@dataclass(frozen=True)
class Case:
    name: str
    route: str
    body: Mapping[str, Any] | None  # None: a GET
    stream: bool = False
    # The finish_reason each choice must end with in vLLM's answer (and so in Tandem's):
    # shows that the case does what its fields mean, not just what both do by default.
    finish_reason: str | None = None
    deviation: Deviation | None = None
    # Differences of this case alone, each with its reason (added to ALLOWED).
    allowed: tuple[Allowed, ...] = ()
    # Message keys that must hold something in each choice of vLLM's answer (a stream's put
    # together), where a case tests what a default answer leaves empty (reasoning, say).
    nonempty: tuple[str, ...] = ()


def both_ways(name: str, route: str, body: Mapping[str, Any], **options: Any) -> list[Case]:
    """The case whole and streamed (`NAME` and `NAME-stream`)."""
    return [Case(name, route, body, **options), Case(f"{name}-stream", route, body, stream=True, **options)]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def resolve(value: Any, tokenizer: Tokenizer) -> Any:
    """The case's body with every TokenOf replaced by its token id."""
    if isinstance(value, TokenOf):
        ids = tokenizer.encode(value.text, add_special_tokens=False)
        assert len(ids) == 1, f"{value.text!r} is {len(ids)} tokens, not one"
        return ids[0]
    if isinstance(value, Mapping):
        return {
            (str(resolve(k, tokenizer)) if isinstance(k, TokenOf) else k): resolve(v, tokenizer)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [resolve(item, tokenizer) for item in value]
    return value


# --- answers -----------------------------------------------------------------------------------------

DONE = "[DONE]"


@dataclass
class Answer:
    """What a server answered: status, media type, and the JSON body or, for a stream that
    answered 200, its events in order (each data payload decoded; `DONE` as itself)."""

    status: int
    media_type: str
    body: Any = None
    events: list[Any] | None = None


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: compared as a string, so it differs from any JSON body


async def send(http: httpx.AsyncClient, case: Case, tokenizer: Tokenizer) -> Answer:
    """Send a case to the server `http` points at."""
    if case.body is None:
        response = await http.get(case.route)
        return Answer(response.status_code, _media_type(response), _decode(response.text))
    body = resolve(case.body, tokenizer)
    if case.stream:
        body["stream"] = True
    async with http.stream("POST", case.route, json=body) as response:
        text = (await response.aread()).decode()
    if response.status_code != 200 or not case.stream:
        return Answer(response.status_code, _media_type(response), _decode(text))
    events = [_decode(line[len("data:") :].strip()) for line in text.splitlines() if line.startswith("data:")]
    return Answer(response.status_code, _media_type(response), events=events)


# --- the comparison ----------------------------------------------------------------------------------


def _rules(path: JsonPath, allowed: Iterable[Allowed]) -> set[Rule]:
    """The rules for `path`: its own entries', and those of a VLLM_ONLY path above it."""
    return {
        entry.rule
        for entry in allowed
        if entry.path == path
        or (entry.rule is Rule.VLLM_ONLY and path.startswith((f"{entry.path}.", f"{entry.path}[")))
    }


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def shape(instances: list[Any], allowed: Iterable[Allowed] = ALLOWED) -> dict[JsonPath, set[str]]:
    """Every path in the values `instances` (a body, or all chunks of a stream), with the JSON
    types seen there; "absent" where an object lacks a key that another object there has."""
    table: dict[JsonPath, set[str]] = {}
    _shape(instances, "", table, tuple(allowed))
    return table


def _shape(instances: list[Any], path: JsonPath, table: dict[JsonPath, set[str]], allowed: tuple) -> None:
    if path:
        table.setdefault(path, set()).update(_type_name(value) for value in instances)
    objects = [value for value in instances if isinstance(value, dict)]
    if Rule.MAP in _rules(path, allowed):
        _shape([v for obj in objects for v in obj.values()], f"{path}{{}}", table, allowed)
    else:
        for key in dict.fromkeys(key for obj in objects for key in obj):
            child = f"{path}.{key}" if path else key
            present = [obj[key] for obj in objects if key in obj]
            if len(present) < len(objects):
                table.setdefault(child, set()).add("absent")
            _shape(present, child, table, allowed)
    items = [item for value in instances if isinstance(value, list) for item in value]
    if items:
        _shape(items, f"{path}[]", table, allowed)


def shape_differences(
    vllm: dict[JsonPath, set[str]], tandem: dict[JsonPath, set[str]], allowed: Iterable[Allowed] = ALLOWED
) -> list[str]:
    """Paths only one answer has, or with other JSON types, beyond `allowed`."""
    allowed = tuple(allowed)
    found = []
    for path in dict.fromkeys([*vllm, *tandem]):
        theirs, ours = vllm.get(path), tandem.get(path)
        rules = _rules(path, allowed)
        if theirs is None:
            if not rules & {Rule.TANDEM_ONLY, Rule.TANDEM_ALIAS}:
                found.append(f"{path}: only Tandem's answer has it ({sorted(ours or ())})")
            continue
        if ours is None:
            if Rule.VLLM_ONLY in rules or (Rule.VLLM_ONLY_NULL in rules and theirs <= {"null", "absent"}):
                continue
            found.append(f"{path}: only vLLM's answer has it ({sorted(theirs)})")
            continue
        if Rule.TYPE_MAY_DIFFER in rules:
            if ("absent" in theirs) != ("absent" in ours):
                found.append(f"{path}: present in vLLM's {sorted(theirs)}, in Tandem's {sorted(ours)}")
            continue
        if Rule.TANDEM_NULL_FOR_ABSENT in rules and "null" in ours and "null" not in theirs:
            ours = (ours - {"null"}) | {"absent"}
        if Rule.VLLM_NULL_FOR_ABSENT in rules and "null" in theirs and "null" not in ours:
            theirs = (theirs - {"null"}) | {"absent"}
        if theirs != ours:
            found.append(f"{path}: vLLM's is {sorted(theirs)}, Tandem's {sorted(ours)}")
    return found


_NOT_COMPARED = {Rule.VALUE_MAY_DIFFER, Rule.TYPE_MAY_DIFFER, Rule.VLLM_ONLY, Rule.TANDEM_ONLY}


def value_differences(vllm: Any, tandem: Any, path: JsonPath = "", allowed: Iterable[Allowed] = ALLOWED) -> list[str]:
    """Values that differ where both answers have them (keys one lacks are `shape`'s)."""
    found: list[str] = []
    _values(vllm, tandem, path, tuple(allowed), found)
    return found


def _values(theirs: Any, ours: Any, path: JsonPath, allowed: tuple, found: list[str]) -> None:
    rules = _rules(path, allowed)
    if rules & _NOT_COMPARED:
        return
    if isinstance(theirs, dict) and isinstance(ours, dict):
        is_map = Rule.MAP in rules
        if is_map and theirs.keys() != ours.keys():
            found.append(f"{path}: keys {sorted(theirs)} in vLLM's, {sorted(ours)} in Tandem's")
        for key in theirs.keys() & ours.keys():
            child = f"{path}{{}}" if is_map else (f"{path}.{key}" if path else key)
            _values(theirs[key], ours[key], child, allowed, found)
        for key in ours.keys() - theirs.keys():
            child = f"{path}.{key}" if path else key
            for entry in allowed:
                if entry.path == child and entry.rule is Rule.TANDEM_ALIAS and ours[key] != ours.get(entry.of):
                    found.append(f"{child}: {ours[key]!r} in Tandem's, its {entry.of} {ours.get(entry.of)!r}")
    elif isinstance(theirs, list) and isinstance(ours, list):
        if len(theirs) != len(ours):
            found.append(f"{path}: {len(theirs)} items in vLLM's, {len(ours)} in Tandem's")
        for their_item, our_item in zip(theirs, ours, strict=False):
            _values(their_item, our_item, f"{path}[]", allowed, found)
    elif Rule.JSON_TEXT in rules and isinstance(theirs, str) and isinstance(ours, str):
        if _json_value(theirs) != _json_value(ours):
            found.append(f"{path}: {theirs!r} in vLLM's, {ours!r} in Tandem's (as JSON)")
    elif isinstance(theirs, float) and isinstance(ours, float):
        if not math.isclose(theirs, ours, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE):
            found.append(f"{path}: {theirs!r} in vLLM's, {ours!r} in Tandem's")
    elif _type_name(theirs) == _type_name(ours) and theirs != ours:
        found.append(f"{path}: {theirs!r} in vLLM's, {ours!r} in Tandem's")


# --- streams -----------------------------------------------------------------------------------------


def _is_finish_only(choice: dict[str, Any]) -> bool:
    if choice.get("finish_reason") is None or choice.get("logprobs") is not None:
        return False
    return choice.get("delta") == {} if "delta" in choice else choice.get("text") == ""


def _adds_nothing(chunk: dict[str, Any]) -> bool:
    """A chunk of empty text: no role, no logprobs, no finish_reason."""
    choices = chunk.get("choices") or []
    return bool(choices) and all(
        choice.get("finish_reason") is None
        and choice.get("logprobs") is None
        and not any(value for value in (choice.get("delta") or {}).values())
        and not choice.get("text")
        for choice in choices
    )


def normalized_chunks(events: list[Any]) -> list[dict[str, Any]]:
    """A stream's chunks (its [DONE] aside) as they are compared, put alike in two ways.

    1. Chunks that add nothing are left out. vLLM's completions send one for each token
       whose text is empty (a special token skipped, the first bytes of a character);
       vLLM's chat stream and Tandem send none.
    2. A choice's finish-only chunk is folded into that choice's chunk before it. OpenAI's
       API (and Tandem) ends a streamed choice with a chunk of its own: an empty delta
       (chat) or empty text (completions) with the finish_reason; vLLM puts the
       finish_reason on the chunk of the last token. Its finish_reason (and its usage)
       moves onto the chunk before it.

    A client that concatenates the deltas reads the same text either way; both servers'
    streams are put alike by the same rules.
    """
    chunks = [event for event in events if event != DONE and not _adds_nothing(event)]
    folded: list[dict[str, Any]] = []
    for chunk in chunks:
        choices = chunk.get("choices") or []
        if len(choices) == 1 and _is_finish_only(choices[0]):
            index = choices[0].get("index")
            previous = next(
                (
                    (earlier, choice)
                    for earlier in reversed(folded)
                    for choice in earlier.get("choices") or []
                    if choice.get("index") == index
                ),
                None,
            )
            if previous is not None and previous[1].get("finish_reason") is None:
                earlier, choice = previous
                choice.update({k: v for k, v in choices[0].items() if k not in ("delta", "text", "logprobs")})
                if chunk.get("usage") is not None:
                    earlier["usage"] = chunk["usage"]
                continue
        folded.append(json.loads(json.dumps(chunk)))  # a copy: folding edits it
    return folded


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON (cut off by max_tokens): compared as it is


def _merge_tool_calls(into: list[dict[str, Any]], pieces: list[dict[str, Any]]) -> None:
    """Streamed tool calls, put together as a whole message has them: each call's pieces
    (by the call's index) merged, its arguments concatenated."""
    for piece in pieces:
        call = next((c for c in into if c.get("index") == piece.get("index")), None)
        if call is None:
            into.append(call := {})
        _merge(call, piece)


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Append one chunk's choice fields to what came before: strings and lists concatenate
    (text, deltas, logprobs), tool calls merge by their index, anything else takes its
    latest non-null value."""
    for key, value in part.items():
        if value is None:
            into.setdefault(key, None)
        elif key == "tool_calls" and isinstance(value, list):
            _merge_tool_calls(into.setdefault(key, []), value)
        elif key in ("index", "role", "finish_reason", "id", "type", "name"):
            into[key] = value
        elif isinstance(value, str):
            into[key] = (into.get(key) or "") + value
        elif isinstance(value, list):
            into[key] = (into.get(key) or []) + value
        elif isinstance(value, dict):
            earlier = into.get(key)
            merged: dict[str, Any] = earlier if isinstance(earlier, dict) else {}
            _merge(merged, value)
            into[key] = merged
        else:
            into[key] = value


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream as one body: {"choices": [each choice's chunks merged, by index], "usage": the last}."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            _merge(choices.setdefault(choice.get("index", 0), {}), choice)
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
    return {"choices": [choices[index] for index in sorted(choices)], "usage": usage}


def _stream_differences(vllm: list[Any], tandem: list[Any], allowed: tuple[Allowed, ...]) -> list[str]:
    found = []
    for name, events in (("vLLM", vllm), ("Tandem", tandem)):
        if not events or events[-1] != DONE or events.count(DONE) != 1:
            found.append(f"{name}'s stream does not end with one data: [DONE]")
        if errors := [event for event in events if isinstance(event, dict) and "error" in event]:
            found.append(f"{name}'s stream has error events: {errors}")
        if any(not isinstance(event, dict) for event in events if event != DONE):
            found.append(f"{name}'s stream has events that are not JSON objects")
    if found:
        return found
    theirs, ours = normalized_chunks(vllm), normalized_chunks(tandem)
    found += [f"chunks: {d}" for d in shape_differences(shape(theirs, allowed), shape(ours, allowed), allowed)]
    # The chunks' own scalar values (object, model): the same set of each on both streams.
    for key in dict.fromkeys(k for chunk in theirs + ours for k in chunk):
        if _rules(key, allowed) & (_NOT_COMPARED | {Rule.VLLM_ONLY_NULL}):
            continue
        their_values = {json.dumps(chunk[key]) for chunk in theirs if isinstance(chunk.get(key), str | int | float)}
        our_values = {json.dumps(chunk[key]) for chunk in ours if isinstance(chunk.get(key), str | int | float)}
        if their_values != our_values:
            found.append(f"chunks: {key} is {sorted(their_values)} in vLLM's, {sorted(our_values)} in Tandem's")
    found += [f"reassembled: {d}" for d in value_differences(reassemble(theirs), reassemble(ours), "", allowed)]
    return found + _tool_call_stream_differences(theirs, ours)


def _call_pieces(chunks: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """A stream's tool-call pieces by (choice index, call index), each call's in order; in
    the order the calls were announced."""
    calls: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            for piece in (choice.get("delta") or {}).get("tool_calls") or []:
                calls.setdefault((choice.get("index", 0), piece.get("index")), []).append(piece)
    return calls


def _call_stream_form(calls: dict[tuple[int, int], list[dict[str, Any]]]) -> list[str]:
    """Where a stream's calls break OpenAI's streamed form: a call's first piece announces
    it (its id, type "function" and name, with the arguments so far), its later pieces add
    to its arguments only; a choice's calls are announced in index order."""
    found = []
    for (choice, index), pieces in calls.items():
        head, function = pieces[0], pieces[0].get("function") or {}
        if not (
            isinstance(head.get("id"), str) and head.get("type") == "function" and isinstance(function.get("name"), str)
        ):
            found.append(f"call {index} of choice {choice} begins without its id, type and name: {head}")
        for piece in pieces:
            if not isinstance((piece.get("function") or {}).get("arguments", ""), str):
                found.append(f"call {index} of choice {choice} has arguments that are not text: {piece}")
        for piece in pieces[1:]:
            named = [key for key in ("id", "type") if piece.get(key) is not None]
            named += ["name"] if (piece.get("function") or {}).get("name") is not None else []
            if named:
                found.append(f"a later piece of call {index} of choice {choice} has its {named} again: {piece}")
    for choice in dict.fromkeys(choice for choice, _ in calls):
        order = [index for each, index in calls if each == choice]
        if order != list(range(len(order))):
            found.append(f"choice {choice} announces its calls in the order {order}")
    return found


def _tool_call_stream_differences(vllm: list[dict[str, Any]], tandem: list[dict[str, Any]]) -> list[str]:
    """How the calls are streamed (their text is compared put together): both in OpenAI's
    streamed form (`_call_stream_form`), the same calls announced, and a call whose
    arguments vLLM streams in several pieces streamed in several by Tandem too, not held
    back to its end. How many pieces, each server's engine steps decide."""
    theirs, ours = _call_pieces(vllm), _call_pieces(tandem)
    found = [f"vLLM's stream: {d}" for d in _call_stream_form(theirs)]
    found += [f"Tandem's stream: {d}" for d in _call_stream_form(ours)]
    if list(theirs) != list(ours):
        return [*found, f"tool calls: vLLM's stream announces {list(theirs)}, Tandem's {list(ours)}"]
    for call, pieces in theirs.items():
        if len(pieces) > 1 and len(ours[call]) == 1:
            found.append(f"tool call {call}: vLLM streams its arguments in {len(pieces)} pieces, Tandem in one")
    return found


# --- Responses streams -------------------------------------------------------------------------------

# A Responses stream's delta events: each adds its `delta` to its item's text or arguments.
_RESPONSE_DELTAS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})


def is_response_stream(events: list[Any] | None) -> bool:
    """A /v1/responses stream: typed events from response.created on, no [DONE]."""
    if not events:
        return False
    return isinstance(events[0], dict) and events[0].get("type") == "response.created"


def merged_deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Responses stream's events as they are compared: each run of one item's deltas merged
    into one event (their text and logprobs concatenated, the first one's other fields).
    Both servers cut a text into deltas their own way (vLLM an engine step each, Tandem a
    detokenized piece each); a client that concatenates them reads the same text."""
    merged: list[dict[str, Any]] = []
    for event in events:
        kind = event.get("type")
        previous = merged[-1] if merged else None
        if (
            kind in _RESPONSE_DELTAS
            and previous is not None
            and previous.get("type") == kind
            and (previous.get("item_id"), previous.get("content_index"))
            == (event.get("item_id"), event.get("content_index"))
        ):
            previous["delta"] = (previous.get("delta") or "") + (event.get("delta") or "")
            if event.get("logprobs") is not None:
                previous["logprobs"] = (previous.get("logprobs") or []) + event["logprobs"]
            continue
        merged.append(json.loads(json.dumps(event)))  # a copy: merging edits it
    return merged


def _response_stream_differences(vllm: list[Any], tandem: list[Any], allowed: tuple[Allowed, ...]) -> list[str]:
    """Both streams: events numbered 0, 1, 2, ... in order, ending with response.completed
    and holding no error event; then, deltas merged, the same event types in the same order,
    each type's events of the same shape, and each event's values alike (the final
    response.completed holds the whole Response, compared as a body is)."""
    found = []
    for name, events in (("vLLM", vllm), ("Tandem", tandem)):
        if any(not isinstance(event, dict) for event in events):
            found.append(f"{name}'s stream has events that are not JSON objects")
            continue
        if [event.get("sequence_number") for event in events] != list(range(len(events))):
            found.append(f"{name}'s events are not numbered 0, 1, 2, ... in order")
        if errors := [event for event in events if event.get("type") == "error" or "error" in event]:
            found.append(f"{name}'s stream has error events: {errors}")
        if not events or events[-1].get("type") != "response.completed":
            found.append(f"{name}'s stream does not end with response.completed")
    if found:
        return found
    theirs, ours = merged_deltas(vllm), merged_deltas(tandem)
    their_types, our_types = [event["type"] for event in theirs], [event["type"] for event in ours]
    if their_types != our_types:
        return [f"event types: vLLM's {their_types}, Tandem's {our_types}"]
    for kind in dict.fromkeys(their_types):
        their_shape = shape([event for event in theirs if event["type"] == kind], allowed)
        our_shape = shape([event for event in ours if event["type"] == kind], allowed)
        found += [f"{kind}: {d}" for d in shape_differences(their_shape, our_shape, allowed)]
    for their_event, our_event in zip(theirs, ours, strict=True):
        found += [f"{their_event['type']}: {d}" for d in value_differences(their_event, our_event, "", allowed)]
    return found


# --- answers compared --------------------------------------------------------------------------------


def differences(vllm: Answer, tandem: Answer, allowed: Iterable[Allowed] = ALLOWED) -> list[str]:
    """Everything in which Tandem's answer differs from vLLM's beyond `allowed`; [] if nothing."""
    allowed = tuple(allowed)
    if vllm.status != tandem.status:
        return [f"status: {vllm.status} from vLLM, {tandem.status} from Tandem ({tandem.body or tandem.events})"]
    found = []
    if vllm.media_type != tandem.media_type:
        found.append(f"media type: {vllm.media_type} from vLLM, {tandem.media_type} from Tandem")
    if vllm.events is not None or tandem.events is not None:
        compare = _response_stream_differences if is_response_stream(vllm.events) else _stream_differences
        return found + compare(vllm.events or [], tandem.events or [], allowed)
    found += shape_differences(shape([vllm.body], allowed), shape([tandem.body], allowed), allowed)
    if vllm.status >= 400:
        for name, answer in (("vLLM", vllm), ("Tandem", tandem)):
            error = answer.body.get("error") if isinstance(answer.body, dict) else None
            if not (isinstance(error, dict) and error.get("message") and error.get("type")):
                found.append(f"{name}'s error body has no error.message and error.type: {answer.body}")
        return found
    return found + value_differences(vllm.body, tandem.body, "", allowed)


def messages(answer: Answer) -> list[dict[str, Any]]:
    """Each choice's message: a body's, or a stream's deltas put together."""
    if answer.events is not None:
        return [choice.get("delta") or {} for choice in reassemble(normalized_chunks(answer.events))["choices"]]
    return [choice.get("message") or {} for choice in (answer.body or {}).get("choices", [])]


def finish_reasons(answer: Answer) -> list[str | None]:
    body = reassemble(normalized_chunks(answer.events)) if answer.events is not None else answer.body
    return [choice.get("finish_reason") for choice in body.get("choices", [])]


def assert_conforms(case: Case, vllm: Answer, tandem: Answer) -> None:
    if case.deviation is not None:
        _assert_deviation(case.deviation, vllm, tandem)
        return
    found = differences(vllm, tandem, ALLOWED + case.allowed)
    assert not found, "Tandem's answer differs from vLLM's:\n  " + "\n  ".join(found) + _both(vllm, tandem)
    if case.finish_reason is not None:
        assert finish_reasons(vllm) == [case.finish_reason], (case.finish_reason, _both(vllm, tandem))
    choices = messages(vllm)
    for key in case.nonempty:
        assert choices and all(message.get(key) for message in choices), (f"no {key} from vLLM", _both(vllm, tandem))


def _assert_deviation(deviation: Deviation, vllm: Answer, tandem: Answer) -> None:
    assert vllm.status == deviation.vllm_status, f"vLLM's server answers otherwise now: {_both(vllm, tandem)}"
    assert tandem.status == deviation.tandem_status, _both(vllm, tandem)
    if deviation.tandem_status >= 400:
        error = tandem.body["error"]
        assert error["message"] and error["type"] and error["param"] == deviation.tandem_param, error


def _both(vllm: Answer, tandem: Answer) -> str:
    def text(answer: Answer) -> str:
        return json.dumps(answer.events if answer.events is not None else answer.body)[:3000]

    return f"\nvLLM ({vllm.status}): {text(vllm)}\nTandem ({tandem.status}): {text(tandem)}"
