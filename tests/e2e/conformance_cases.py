"""The conformance cases: requests sent to vLLM's own server and to Tandem alike (see
`tests/e2e/conformance.py` for what must match). One list, data only; a case's name is
its test id. Only what Tandem serves today is here (README, "OpenAI compatibility"): a
feature joins the list with its implementation.
"""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.conformance import Allowed, Case, Deviation, Rule, TokenOf, both_ways

MODEL = "tiny-llama"
MAX_MODEL_LEN = 4096  # the graph's in tests/e2e/test_agg_graph.py
MAX_TOKENS = 12
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "In the heart of Eldoria, naïve café — 日本語 🙂, lies Aeloria."},
]
PROMPT = "def fibonacci(n):"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS}
# Sampled, but reproducibly: vLLM seeds a generator of the request's own.
SAMPLED = {"model": MODEL, "temperature": 1.0, "seed": 1234, "max_tokens": MAX_TOKENS}

THE = TokenOf(" the")
EOS = TokenOf("<|eot_id|>")
HEADER = TokenOf("<|start_header_id|>")  # a special token, left out of the text unless asked
FIVE_TOKENS = [THE, 10, 20, 30, 40]
EVERY_THIRD_TOKEN = list(range(5, 3000, 3))  # the tiny model's vocabulary has 3000


def chat(**fields: Any) -> dict[str, Any]:
    return {**GREEDY, "messages": MESSAGES, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {**GREEDY, "prompt": PROMPT, **fields}


def without(key: str, body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# vLLM's extra fields, each with a value that changes a greedy answer the way vLLM defines.
FIELDS: dict[str, dict[str, Any]] = {
    "logit_bias": {"logit_bias": {THE: 100}},
    "allowed_token_ids": {"allowed_token_ids": FIVE_TOKENS},
    # The forced token is a bad word: the ban wins.
    "bad_words": {"logit_bias": {THE: 100}, "bad_words": ["the"]},
    # Among five tokens, a dozen repeat: each penalty changes which.
    "repetition_penalty": {"allowed_token_ids": FIVE_TOKENS, "repetition_penalty": 3.0},
    "presence_frequency_penalty": {
        "allowed_token_ids": FIVE_TOKENS,
        "presence_penalty": 1.5,
        "frequency_penalty": 1.5,
    },
    "ignore_eos": {"logit_bias": {EOS: 100}, "ignore_eos": True},
    "stop_token_ids_included": {"stop_token_ids": EVERY_THIRD_TOKEN, "include_stop_str_in_output": True},
    "stop_string_included": {"stop": ["e", "o"], "include_stop_str_in_output": True},
    "special_tokens_skipped": {"logit_bias": {HEADER: 100}},
    "special_tokens_kept": {
        "logit_bias": {HEADER: 100},
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    },
}
SAMPLING: dict[str, dict[str, Any]] = {
    "seed": {},
    "top_k": {"top_k": 3},
    "top_p": {"top_p": 0.5},
    "min_p": {"min_p": 0.2},
}
# Each must end as it says: the case does what its fields mean.
ENDING: dict[str, dict[str, Any]] = {
    "stop_string": {"stop": ["e", "o"]},
    "stop_token_ids": {"stop_token_ids": EVERY_THIRD_TOKEN},
    # EOS forced, but not before min_tokens: then it ends the choice.
    "min_tokens": {"min_tokens": 5, "logit_bias": {EOS: 100}},
}


# Output constraints the engine enforces (structured outputs), and tool calls. Each keeps the
# random-weight model's answer short: enums and bounded strings end the text.
CONSTRAINED_TOKENS = 40
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"enum": [1, 2, 3]}},
    "required": ["answer", "n"],
}
CONSTRAINED: dict[str, dict[str, Any]] = {
    "response_format-json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    },
    "response_format-json_object": {"response_format": {"type": "json_object"}},
    "response_format-text": {"response_format": {"type": "text"}},
    "structured_outputs-json": {"structured_outputs": {"json": ANSWER}},
    "structured_outputs-choice": {"structured_outputs": {"choice": ["sunny", "rainy", "cloudy"]}},
    # vLLM's structural tags, both forms: an xgrammar format holds the whole answer; the
    # first form only what follows a trigger (the tiny model writes none: free text).
    "response_format-structural_tag": {
        "response_format": {"type": "structural_tag", "format": {"type": "regex", "pattern": "(sunny|rainy|cloudy)"}}
    },
    "response_format-structural_tag-triggers": {
        "response_format": {
            "type": "structural_tag",
            "structures": [{"begin": "<answer>", "schema": ANSWER, "end": "</answer>"}],
            "triggers": ["<answer>"],
        }
    },
    "structured_outputs-structural_tag": {
        "structured_outputs": {
            "structural_tag": json.dumps({"type": "structural_tag", "format": {"type": "const_string", "value": "yes"}})
        }
    },
}
COMPLETION_CONSTRAINED: dict[str, dict[str, Any]] = {
    "structured_outputs-regex": {"structured_outputs": {"regex": "[a-z]{2,6}( [a-z]{2,6}){1,3}"}},
    "structured_outputs-choice": {"structured_outputs": {"choice": ["yes", "no"]}},
    "structured_outputs-grammar": {"structured_outputs": {"grammar": 'root ::= "yes" | "no" | "maybe"'}},
    "response_format-json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
# The pythonic call format (vLLM's `pythonic` tool parser reads it: tests/e2e/vllm_server.py),
# forced by a regex: the random-weight model would not write it by itself.
PYTHONIC_CALL = r'\[get_weather\(city="(Oslo|Lima)"\)\]'
TOOL_HISTORY = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"},
]
TOOLS: dict[str, dict[str, Any]] = {
    "tool_choice-named": {
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "tool_choice-required": {"tools": [WEATHER, CLOCK], "tool_choice": "required"},
    "tool_choice-required-one-call": {
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    },
    "tool_choice-none": {"tools": [WEATHER], "tool_choice": "none"},
    "tool_choice-auto-call": {"tools": [WEATHER], "structured_outputs": {"regex": PYTHONIC_CALL}},
    "tool_choice-auto-no-call": {"tools": [WEATHER], "tool_choice": "auto"},
    "tool-history": {"messages": TOOL_HISTORY, "tools": [WEATHER], "tool_choice": "none"},
}
# n > 1, sampled with a seed: choice i is sampled with seed + i by both.
CHOICES: dict[str, dict[str, Any]] = {"n-2": {"n": 2}, "n-3-top_k": {"n": 3, "top_k": 5}}

# A reasoning model's answer: with the template variable `tiny_thinking`, both servers' parser
# splits as DeepSeek-R1's (tests/e2e/reasoning_plugin.py). The tiny model writes the think
# tokens only where biased (app/model/tiny.py): <think> first, then kept from coming again by
# the penalties, and </think> once a token's logit falls below its bias, 8 tokens on here
# (vLLM's server answers alike for biases of 7.1 to 7.35). The engine constrains what follows
# the reasoning (its reasoning parser holds the constraint back until then).
THINKING: dict[str, Any] = {
    "chat_template_kwargs": {"tiny_thinking": True},
    "logit_bias": {TokenOf("<think>"): 9.5, TokenOf("</think>"): 7.25},
    "presence_penalty": 2.0,
    "frequency_penalty": 2.0,
    "max_tokens": CONSTRAINED_TOKENS,
}
REASONING: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    # (the case's fields, what each choice of vLLM's answer must have)
    "reasoning": ({"structured_outputs": {"choice": ["sunny", "rainy", "cloudy"]}}, ("reasoning", "content")),
    # The call is read from the content after the reasoning.
    "reasoning-tool-call": (
        {"tools": [WEATHER], "structured_outputs": {"regex": PYTHONIC_CALL}},
        ("reasoning", "tool_calls"),
    ),
    # Hidden: vLLM constrains from the first token then, which its parser takes for reasoning
    # (no </think> follows): no content, no reasoning, and no logprobs either.
    "reasoning-hidden": (
        {"include_reasoning": False, "logprobs": True, "structured_outputs": {"choice": ["sunny", "rainy"]}},
        (),
    ),
}

# Per-case differences (each case that has one says so).
TOOL_CALL_IDS = (
    # A call's id is random on both (vLLM's make_tool_call_id: "chatcmpl-tool-" and a uuid).
    Allowed("choices[].message.tool_calls[].id", Rule.VALUE_MAY_DIFFER, "random"),
    Allowed("choices[].delta.tool_calls[].id", Rule.VALUE_MAY_DIFFER, "random"),
    # A call's later pieces: some of vLLM's parsers send "id": null (pythonic's, by
    # compute_tool_delta in vllm/tool_parsers/utils.py); OpenAI's API and Tandem leave it out.
    # Its "required" stream's "name": null (vllm/tool_parsers/streaming.py) Tandem sends as
    # well (app/openai/render.py): compared, not allowed.
    Allowed("choices[].delta.tool_calls[].id", Rule.VLLM_NULL_FOR_ABSENT, "later pieces of a call"),
)
# The calls the model chose (auto): their arguments, JSON text, compared as JSON values. A
# named or "required" call's are compared as text: as vLLM, Tandem streams them as the model
# writes them and re-serializes a "required" call's in a whole answer.
ARGUMENTS_AS_JSON = (
    Allowed("choices[].message.tool_calls[].function.arguments", Rule.JSON_TEXT, "compared as JSON"),
    Allowed("choices[].delta.tool_calls[].function.arguments", Rule.JSON_TEXT, "compared as JSON"),
)
FORCED_CALLS = ("tool_choice-named", "tool_choice-required", "tool_choice-required-one-call")
VLLM_LISTS_THE_CHOSEN_TOKEN_FIRST = (
    # vLLM's chat takes the first top_logprobs entries of the engine's {chosen token,
    # likeliest tokens...}: the chosen token, then the likeliest others
    # (vllm/entrypoints/openai/chat_completion/serving.py, _get_top_logprobs). Tandem lists
    # the top_logprobs likeliest tokens, as OpenAI defines them. The same under greedy
    # decoding (the chat-logprobs cases); the chosen tokens and their logprobs are compared.
    Allowed("choices[].logprobs.content[].top_logprobs", Rule.VALUE_MAY_DIFFER, "the likeliest, not the chosen first"),
)
TOKENS_OF_PART_OF_A_CHARACTER = tuple(
    # The answer has a token that holds only the first bytes of a character. vLLM 0.32
    # names such a token "" and gives the whole character to the token that completes it
    # (vllm/v1/engine/logprobs.py, _correct_decoded_token); Tandem names each token by its
    # own bytes, U+FFFD for an unfinished character, as its text shows it
    # (app/preprocess/tokenizer.py, TokenTexts). text_offset follows the names. The text,
    # every logprob and the counts are still compared.
    Allowed(path, Rule.VALUE_MAY_DIFFER, "the name of a token that holds part of a character")
    for path in (
        "choices[].logprobs.tokens",
        "choices[].logprobs.top_logprobs",
        "choices[].logprobs.text_offset",
        # The same naming in prompt_logprobs (chat's at the top, completions' per choice).
        "prompt_logprobs[]{}.decoded_token",
        "choices[].prompt_logprobs[]{}.decoded_token",
    )
)


def _generation_cases() -> list[Case]:
    cases = [
        *both_ways("chat-greedy", CHAT, chat()),
        *both_ways("chat-max_completion_tokens", CHAT, without("max_tokens", chat(max_completion_tokens=5))),
        # No max_tokens: all the room left; EOS forced ends the choice at once, with no text.
        *both_ways(
            "chat-no-max_tokens", CHAT, without("max_tokens", chat(logit_bias={EOS: 100})), finish_reason="stop"
        ),
        *both_ways("chat-logprobs", CHAT, chat(logprobs=True, top_logprobs=3)),
        *both_ways("chat-logprobs-no-top", CHAT, chat(logprobs=True)),
        # Sampled: the chosen token is not always the likeliest.
        *both_ways(
            "chat-logprobs-sampled",
            CHAT,
            {**SAMPLED, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2},
            allowed=VLLM_LISTS_THE_CHOSEN_TOKEN_FIRST,
        ),
        *both_ways("completion-greedy", COMPLETIONS, completion()),
        *both_ways("completion-logprobs", COMPLETIONS, completion(logprobs=3)),
        *both_ways("completion-logprobs-0", COMPLETIONS, completion(logprobs=0)),
        *both_ways(
            "completion-logprobs-sampled",
            COMPLETIONS,
            {**SAMPLED, "prompt": PROMPT, "logprobs": 2},
            allowed=TOKENS_OF_PART_OF_A_CHARACTER,
        ),
        *both_ways("completion-token-ids", COMPLETIONS, completion(prompt=[0, 12, 345, 678, 910, 11])),
        *both_ways("completion-no-bos", COMPLETIONS, completion(add_special_tokens=False)),
        *both_ways("completion-default-max_tokens", COMPLETIONS, without("max_tokens", completion())),
        # echo, prompt_logprobs (whole answers only, or 0 streamed: vLLM's rule), several prompts.
        *both_ways("completion-echo", COMPLETIONS, completion(echo=True)),
        *both_ways("completion-echo-logprobs", COMPLETIONS, completion(echo=True, logprobs=2)),
        *both_ways(
            "completion-echo-token-ids",
            COMPLETIONS,
            completion(prompt=[0, 12, 345, 678], echo=True, logprobs=1),
            allowed=TOKENS_OF_PART_OF_A_CHARACTER,
        ),
        *both_ways("completion-echo-alone", COMPLETIONS, completion(echo=True, max_tokens=0, logprobs=1)),
        Case("completion-prompt_logprobs", COMPLETIONS, completion(prompt_logprobs=2)),
        Case("completion-prompt_logprobs-0-stream", COMPLETIONS, completion(prompt_logprobs=0), stream=True),
        # The chat's prompt has characters of several bytes (MESSAGES).
        Case("chat-prompt_logprobs", CHAT, chat(prompt_logprobs=1), allowed=TOKENS_OF_PART_OF_A_CHARACTER),
        *both_ways(
            "chat-echo-continued",
            CHAT,
            chat(
                messages=[*MESSAGES, {"role": "assistant", "content": "Once upon a"}],
                add_generation_prompt=False,
                continue_final_message=True,
                echo=True,
            ),
            # echo computes the prompt's logprobs (vLLM's rule), of characters of several bytes.
            allowed=TOKENS_OF_PART_OF_A_CHARACTER,
        ),
        *both_ways("completion-prompts", COMPLETIONS, completion(prompt=[PROMPT, "Once upon a time"])),
        *both_ways("completion-prompt-token-lists", COMPLETIONS, completion(prompt=[[0, 12, 345], [0, 678, 910, 11]])),
        *both_ways("completion-prompts-n", COMPLETIONS, {**SAMPLED, "prompt": [PROMPT, "Once upon a time"], "n": 2}),
        Case(
            "completion-prompts-continuous-usage-stream",
            COMPLETIONS,
            completion(
                prompt=[PROMPT, "Once upon a time"],
                stream_options={"include_usage": True, "continuous_usage_stats": True},
            ),
            stream=True,
        ),
        # Accepted and ignored, by both.
        *both_ways("chat-user-metadata", CHAT, chat(user="someone", metadata={"team": "a"})),
        # The chat template's inputs.
        *both_ways("chat-template-kwargs", CHAT, chat(chat_template_kwargs={"enable_thinking": False})),
        *both_ways("chat-no-generation-prompt", CHAT, chat(add_generation_prompt=False)),
        *both_ways(
            "chat-continue-final-message",
            CHAT,
            chat(
                messages=[*MESSAGES, {"role": "assistant", "content": "Once upon a"}],
                add_generation_prompt=False,
                continue_final_message=True,
            ),
        ),
        *both_ways(
            "chat-text-parts",
            CHAT,
            chat(
                messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
            ),
        ),
        # stream_options: whole answers refuse it (an error case below).
        Case("chat-include-usage-stream", CHAT, chat(stream_options={"include_usage": True}), stream=True),
        Case(
            "completion-continuous-usage-stream",
            COMPLETIONS,
            completion(stream_options={"include_usage": True, "continuous_usage_stats": True}),
            stream=True,
        ),
        Case(
            "chat-continuous-usage-logprobs-stream",
            CHAT,
            chat(logprobs=True, top_logprobs=2, stream_options={"include_usage": True, "continuous_usage_stats": True}),
            stream=True,
        ),
    ]
    for name, fields in CONSTRAINED.items():
        cases += both_ways(f"chat-{name}", CHAT, chat(max_tokens=CONSTRAINED_TOKENS, **fields))
    for name, fields in COMPLETION_CONSTRAINED.items():
        cases += both_ways(f"completion-{name}", COMPLETIONS, completion(max_tokens=CONSTRAINED_TOKENS, **fields))
    for name, fields in TOOLS.items():
        allowed = TOOL_CALL_IDS if name in FORCED_CALLS else TOOL_CALL_IDS + ARGUMENTS_AS_JSON
        cases += both_ways(f"chat-{name}", CHAT, chat(max_tokens=CONSTRAINED_TOKENS, **fields), allowed=allowed)
    # The random-weight model fills a "required" answer with whitespace (the JSON grammar
    # allows any): in the cases above no call's name is complete within their max_tokens.
    # Penalties make it end its whitespace sooner, so a call is announced and its arguments
    # stream piece by piece (get_time's, 4 pieces from vLLM's server). Streamed only: the
    # array is still open at max_tokens, where vLLM's whole answer has no call at all.
    cases.append(
        Case(
            "chat-tool_choice-required-arguments-stream",
            CHAT,
            chat(max_tokens=120, frequency_penalty=2.0, presence_penalty=2.0, **TOOLS["tool_choice-required"]),
            stream=True,
            finish_reason="length",
            allowed=TOOL_CALL_IDS,
        )
    )
    for name, (fields, nonempty) in REASONING.items():
        body = chat(**THINKING, **fields)
        cases += both_ways(f"chat-{name}", CHAT, body, nonempty=nonempty, allowed=TOOL_CALL_IDS + ARGUMENTS_AS_JSON)
    # An earlier answer's reasoning in the history, under either name: accepted, and passed to
    # the template (the tiny model's ignores it).
    history = [
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is July."},
        {"role": "user", "content": "And?"},
    ]
    cases += both_ways("chat-reasoning-in-history", CHAT, chat(messages=[*MESSAGES, *history]))
    # The effort reaches the template (the tiny model's ignores it) and changes nothing else.
    cases += both_ways("chat-reasoning-effort", CHAT, chat(reasoning_effort="low"))
    for name, fields in CHOICES.items():
        cases += both_ways(f"chat-{name}", CHAT, {**SAMPLED, "messages": MESSAGES, **fields})
        cases += both_ways(f"completion-{name}", COMPLETIONS, {**SAMPLED, "prompt": PROMPT, **fields})
    for name, fields in FIELDS.items():
        cases += both_ways(f"chat-{name}", CHAT, chat(**fields))
        cases += both_ways(f"completion-{name}", COMPLETIONS, completion(**fields))
    for name, fields in SAMPLING.items():
        cases += both_ways(f"chat-{name}", CHAT, {**SAMPLED, "messages": MESSAGES, **fields})
        cases += both_ways(f"completion-{name}", COMPLETIONS, {**SAMPLED, "prompt": PROMPT, **fields})
    for name, fields in ENDING.items():
        cases += both_ways(f"chat-{name}", CHAT, chat(**fields), finish_reason="stop")
        cases += both_ways(f"completion-{name}", COMPLETIONS, completion(**fields), finish_reason="stop")
    return cases


ROUTES = [
    Case("models", "/v1/models", None),
    Case("tokenize-prompt", "/tokenize", {"model": MODEL, "prompt": "Hello there! 日本語 🙂"}),
    Case("tokenize-prompt-strs", "/tokenize", {"model": MODEL, "prompt": PROMPT, "return_token_strs": True}),
    Case("tokenize-prompt-no-bos", "/tokenize", {"model": MODEL, "prompt": PROMPT, "add_special_tokens": False}),
    Case("tokenize-messages", "/tokenize", {"model": MODEL, "messages": MESSAGES}),
    Case(
        "tokenize-messages-continued",
        "/tokenize",
        {
            "model": MODEL,
            "messages": [*MESSAGES, {"role": "assistant", "content": "Once upon a"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [0, 12, 345, 678, 910, 11]}),
    Case("version", "/version", None),
]

LONG_PROMPT = "word " * (MAX_MODEL_LEN + 100)

ERRORS = [
    Case("chat-unknown-model", CHAT, chat(model="no-such-model")),
    Case("completion-unknown-model", COMPLETIONS, completion(model="no-such-model")),
    Case("tokenize-unknown-model", "/tokenize", {"model": "no-such-model", "prompt": "hi"}),
    Case("chat-temperature-negative", CHAT, chat(temperature=-1)),
    Case("chat-temperature-not-a-number", CHAT, chat(temperature="hot")),
    Case("completion-top_p-zero", COMPLETIONS, completion(top_p=0)),
    Case("completion-repetition_penalty-zero", COMPLETIONS, completion(repetition_penalty=0)),
    Case("chat-min_p-past-one", CHAT, chat(min_p=2)),
    Case("completion-logit_bias-not-a-token", COMPLETIONS, completion(logit_bias={"x": 1})),
    Case("chat-no-messages", CHAT, chat(messages=[])),
    Case("chat-top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2)),
    Case("chat-stream_options-not-streamed", CHAT, chat(stream_options={"include_usage": True})),
    Case("completion-max_tokens-past-max_model_len", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN + 1)),
    Case("completion-prompt-past-max_model_len", COMPLETIONS, completion(prompt=LONG_PROMPT)),
    Case("chat-template-and-continue", CHAT, chat(continue_final_message=True)),
    Case("completion-suffix", COMPLETIONS, completion(suffix="x")),
    Case("completion-suffix-echo", COMPLETIONS, completion(suffix="x", echo=True)),
    Case("completion-max_tokens-0", COMPLETIONS, completion(max_tokens=0)),
    Case("completion-prompt_logprobs-negative", COMPLETIONS, completion(prompt_logprobs=-2)),
    Case("completion-prompt_logprobs-streamed", COMPLETIONS, completion(prompt_logprobs=1, stream=True)),
    # The engine's limit (max_logprobs, 20 by default): its refusal, a 400 with its words.
    Case("chat-prompt_logprobs-past-the-engine-limit", CHAT, chat(prompt_logprobs=50)),
    Case("chat-tool_choice-without-tools", CHAT, chat(tool_choice="required")),
    Case(
        "chat-tool_choice-names-no-tool",
        CHAT,
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    ),
    Case("chat-tool_choice-unknown", CHAT, chat(tools=[WEATHER], tool_choice="sometimes")),
    Case(
        "completion-structured_outputs-two", COMPLETIONS, completion(structured_outputs={"regex": "a", "choice": ["a"]})
    ),
    Case("completion-response_format-no-schema", COMPLETIONS, completion(response_format={"type": "json_schema"})),
    Case("completion-structured_outputs-bad-regex", COMPLETIONS, completion(structured_outputs={"regex": "(unclosed"})),
    Case(
        "completion-structured_outputs-bad-grammar",
        COMPLETIONS,
        completion(structured_outputs={"grammar": "root ::= "}),
    ),
    Case("chat-structured_outputs-bad-json", CHAT, chat(structured_outputs={"json": {"type": "no-such-type"}})),
    Case("chat-n-greedy", CHAT, chat(n=2)),
    Case(
        "completion-unknown-field",
        COMPLETIONS,
        completion(max_token=5),
        # vLLM's server logs a warning and serves the request with the field ignored.
        # Tandem's schema is strict on purpose (app/openai/schema.py): a misspelt field
        # (`max_token` here) would otherwise be served with its default, silently; OpenAI's
        # own API answers 400 "Unrecognized request argument supplied" as Tandem does.
        deviation=Deviation(vllm_status=200, tandem_status=400, tandem_param="max_token"),
    ),
    Case(
        "completion-prompt-plus-max_tokens-past-max_model_len",
        COMPLETIONS,
        # (The prompt leaves room for 50 tokens: the clipped answer is quick.) Both clip
        # max_tokens to what fits (vLLM's get_max_tokens, app/preprocess/preprocessor.py).
        completion(prompt=[11] * (MAX_MODEL_LEN - 50), max_tokens=100),
    ),
]

# --- /v1/responses: its cases, on the chat cases' conversation ------------------------------------

RESPONSES = "/v1/responses"


def response(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "max_output_tokens": MAX_TOKENS, "input": MESSAGES, **fields}


def _flat(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool in the Responses API's flat form."""
    return {"type": "function", **tool["function"]}


RESPONSE_TOOLS = [_flat(WEATHER), _flat(CLOCK)]
RESPONSE_TOOL_HISTORY = [
    *MESSAGES,
    {"type": "function_call", "call_id": "call-1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    {"type": "function_call_output", "call_id": "call-1", "output": "Sunny, 21 C"},
]
RESPONSE_TOOL_CALLS = (
    # The arguments are JSON text (see ARGUMENTS_AS_JSON): compared as JSON values, merged deltas too.
    *(
        Allowed(path, Rule.JSON_TEXT, "compared as JSON")
        for path in ("output[].arguments", "response.output[].arguments", "item.arguments", "arguments", "delta")
    ),
)
VLLM_ECHOES_ITS_TOOL_GRAMMAR = (
    # For a named or required call vLLM's tool parser puts the JSON schema it constrains the
    # call to into the request's `text.format` (vllm/parser/abstract_parser.py,
    # _apply_structural_tag), which the Response then echoes; Tandem echoes the request.
    *(
        Allowed(f"{prefix}{path}", rule, "vLLM's own constraint, echoed as the request's")
        for prefix in ("", "response.")
        for path, rule in (
            ("text", Rule.TYPE_MAY_DIFFER),
            ("text.format", Rule.VLLM_ONLY),
            ("text.verbosity", Rule.VLLM_ONLY),
        )
    ),
)

RESPONSES_CASES = [
    *both_ways("responses-greedy", RESPONSES, response()),
    *both_ways("responses-string-input", RESPONSES, response(input=PROMPT, instructions="Answer in one line.")),
    *both_ways(
        "responses-items",
        RESPONSES,
        response(
            input=[
                # vLLM renders a developer message as a system one for a template without the role.
                {"role": "developer", "content": "Be terse."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "In the heart"}]},
                # A previous response's output item, handed back.
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "lies Aeloria.", "annotations": []}],
                },
                {"role": "user", "content": "Go on."},
            ]
        ),
    ),
    # A last message "incomplete": continued.
    *both_ways(
        "responses-continue",
        RESPONSES,
        response(
            input=[
                *MESSAGES,
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "incomplete",
                    "content": [{"type": "output_text", "text": "Once upon a", "annotations": []}],
                },
            ]
        ),
    ),
    # No max_output_tokens: all the room left; EOS forced: no output item at all.
    *both_ways("responses-empty-answer", RESPONSES, without("max_output_tokens", response(logit_bias={EOS: 100}))),
    *both_ways("responses-logprobs", RESPONSES, response(include=["message.output_text.logprobs"], top_logprobs=3)),
    *both_ways("responses-sampled", RESPONSES, response(temperature=1.0, seed=1234, top_p=0.9, top_k=5)),
    # Echoed, not acted on, by both.
    *both_ways(
        "responses-echoed-fields",
        RESPONSES,
        response(user="someone", metadata={"team": "a"}, store=False, service_tier="default", max_tool_calls=2),
    ),
    *both_ways(
        "responses-vllm-fields",
        RESPONSES,
        response(logit_bias={THE: 100}, stop=["e", "o"], include_stop_str_in_output=True, presence_penalty=0.5),
    ),
    *both_ways("responses-reasoning-effort", RESPONSES, response(reasoning={"effort": "low"})),
    *both_ways(
        "responses-text-json_schema",
        RESPONSES,
        response(
            max_output_tokens=CONSTRAINED_TOKENS,
            text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER}},
        ),
    ),
    *both_ways(
        "responses-text-json_object",
        RESPONSES,
        response(max_output_tokens=CONSTRAINED_TOKENS, text={"format": {"type": "json_object"}}),
    ),
    *both_ways(
        "responses-tool-call",
        RESPONSES,
        response(
            max_output_tokens=CONSTRAINED_TOKENS,
            tools=RESPONSE_TOOLS[:1],
            structured_outputs={"regex": PYTHONIC_CALL},
        ),
        allowed=RESPONSE_TOOL_CALLS,
    ),
    *both_ways(
        "responses-tool_choice-named",
        RESPONSES,
        response(
            max_output_tokens=CONSTRAINED_TOKENS,
            tools=RESPONSE_TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
        ),
        allowed=RESPONSE_TOOL_CALLS + VLLM_ECHOES_ITS_TOOL_GRAMMAR,
    ),
    *both_ways(
        "responses-tool_choice-required",
        RESPONSES,
        response(max_output_tokens=CONSTRAINED_TOKENS, tools=RESPONSE_TOOLS, tool_choice="required"),
        allowed=RESPONSE_TOOL_CALLS + VLLM_ECHOES_ITS_TOOL_GRAMMAR,
    ),
    *both_ways(
        "responses-tool-history",
        RESPONSES,
        response(input=RESPONSE_TOOL_HISTORY, tools=RESPONSE_TOOLS, tool_choice="none"),
    ),
    # Bad input: both refuse it alike.
    Case("responses-unknown-model", RESPONSES, response(model="no-such-model")),
    Case("responses-unknown-model-stream", RESPONSES, response(model="no-such-model"), stream=True),
    Case("responses-temperature-not-a-number", RESPONSES, response(temperature="hot")),
    Case("responses-temperature-negative", RESPONSES, response(temperature=-1)),
    Case("responses-top_p-zero", RESPONSES, response(top_p=0)),
    Case("responses-no-input", RESPONSES, without("input", response())),
    Case("responses-empty-input", RESPONSES, response(input=[])),
    Case("responses-max_output_tokens-zero", RESPONSES, response(max_output_tokens=0)),
    Case("responses-max_output_tokens-past-max_model_len", RESPONSES, response(max_output_tokens=MAX_MODEL_LEN + 1)),
    Case("responses-input-past-max_model_len", RESPONSES, response(input=LONG_PROMPT)),
    Case("responses-tool_choice-without-tools", RESPONSES, response(tool_choice="required")),
    Case(
        "responses-tool_choice-names-no-tool",
        RESPONSES,
        response(tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "nope"}),
    ),
    Case(
        "responses-text-format-and-structured_outputs",
        RESPONSES,
        response(text={"format": {"type": "json_object"}}, structured_outputs={"regex": "a"}),
    ),
    Case("responses-prompt-template", RESPONSES, response(prompt={"id": "pmpt_1"})),
    Case(
        "responses-image",
        RESPONSES,
        response(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
    ),
    # Neither stores responses (vLLM's default, VLLM_ENABLE_RESPONSES_API_STORE off).
    Case("responses-previous_response_id", RESPONSES, response(previous_response_id="resp_nope")),
    Case("responses-previous_response_id-stream", RESPONSES, response(previous_response_id="resp_nope"), stream=True),
    Case("responses-background", RESPONSES, response(background=True)),
    Case("responses-background-not-stored", RESPONSES, response(background=True, store=False)),
    Case("responses-retrieve", f"{RESPONSES}/resp_nope", None),
    # Where vLLM serves what it does not act on, Tandem refuses it, naming the field (as
    # completion-unknown-field, for the same reason: nothing is ignored silently).
    Case(
        "responses-unknown-field",
        RESPONSES,
        response(max_token=5),
        deviation=Deviation(vllm_status=200, tandem_status=400, tandem_param="max_token"),
    ),
    # vLLM ignores a built-in tool it has no server for; Tandem runs none.
    Case(
        "responses-built-in-tool",
        RESPONSES,
        response(tools=[{"type": "web_search_preview"}]),
        deviation=Deviation(vllm_status=200, tandem_status=400, tandem_param="tools[0].type"),
    ),
    # vLLM hands a reasoning item to the chat template as the assistant's `reasoning`, which
    # Tandem's chat messages do not carry (README).
    Case(
        "responses-reasoning-item",
        RESPONSES,
        response(
            input=[
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                *MESSAGES,
            ]
        ),
        deviation=Deviation(vllm_status=200, tandem_status=400, tandem_param="input[0]"),
    ),
    # vLLM cuts an overlong prompt to fit (from its end: the generation prompt goes first);
    # Tandem refuses it, as it refuses it without truncation.
    Case(
        "responses-truncation-auto",
        RESPONSES,
        response(truncation="auto"),
        deviation=Deviation(vllm_status=200, tandem_status=400, tandem_param="truncation"),
    ),
]

CASES: list[Case] = _generation_cases() + ROUTES + ERRORS + RESPONSES_CASES
assert len({case.name for case in CASES}) == len(CASES), "case names are test ids: each once"
