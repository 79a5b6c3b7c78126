"""The OpenAI request bodies Tandem accepts, validated strictly.

Strict on purpose: an unknown field, a wrong type or an out-of-range value is a 400
that names the parameter, never a silent default and never a 500. Bounds exist on
every number so that absurd values stop here instead of deep inside an engine.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import InvalidRequestError

# Engines index and count tokens with 32-bit integers.
MAX_INT32 = 2**31 - 1
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Passed through to the chat template, which alone knows how to render tool turns.
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    # An earlier answer's reasoning, as a reasoning model's answers carry it (`reasoning_content`:
    # DeepSeek's and older vLLM's name); the template may render it, as vLLM's server passes it.
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message must have content")
        return self

    def text(self) -> str | None:
        """The content as one string; text parts are joined with newlines, as vLLM does."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_INT32)]
StopSequences = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)]
# vLLM's server takes any signed 64-bit seed.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# vLLM: -1 or 0 disables top-k.
TopK = Annotated[int, Field(ge=-1, le=MAX_INT32)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
# vLLM's bounds (vllm/sampling_params.py); whether a token id is in the vocabulary is the
# engine's to check, since only it knows the model's vocabulary size.
RepetitionPenalty = Annotated[float, Field(gt=0.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
# vLLM clamps each bias to this range rather than refusing it.
MAX_LOGIT_BIAS = 100.0
# vLLM allows n up to VLLM_MAX_N_SEQUENCES (16384). Tandem runs every choice as an engine
# request of its own on the request's one worker, each holding its own KV blocks and a
# decode slot (max_num_seqs, 256 by default in vLLM's GPU configs, far fewer on CPU): a
# few hundred choices would fill a worker with one request. 128 is the ceiling of what a
# client plausibly samples at once (best-of-N, self-consistency use tens).
MAX_CHOICES = 128
NumChoices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: OpenAI's shape (`schema` is the schema itself)."""

    # OpenAI's: the name is required; it only labels the schema.
    name: str
    description: str | None = None
    # pydantic reserves `schema`; the alias keeps OpenAI's key.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class StructuralTag(_Strict):
    """One structure of a `structural_tag` response format in vLLM's first form: text that
    starts with `begin`, then JSON matching `schema`, then `end`."""

    begin: str
    tag_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema;
    and vLLM's `structural_tag`, in either of its forms: `structures` entered when the
    output reaches one of `triggers`, or an xgrammar structural-tag `format`."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[StructuralTag] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            # vLLM's words.
            raise InvalidRequestError(
                "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                param="response_format",
            )
        if self.type == "structural_tag" and (self.format is None) == (
            self.structures is None or self.triggers is None
        ):
            # vLLM's words; whether the tag itself is sound the engine says (xgrammar compiles it).
            raise InvalidRequestError("Invalid response_format structural_tag specification.", param="response_format")
        return self

    def structural_tag(self) -> str:
        """The tag as vLLM's server hands it to the engine (its JSON, `schema` spelled so)."""
        if self.format is not None:
            return json.dumps({"type": "structural_tag", "format": self.format})
        structures = [structure.model_dump(by_alias=True) for structure in self.structures or ()]
        return json.dumps({"type": "structural_tag", "structures": structures, "triggers": self.triggers})


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs`: one constraint the engine enforces while it samples."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = Field(default=None, description="an EBNF (GBNF) grammar")
    json_object: bool | None = None
    structural_tag: str | None = Field(default=None, description="an xgrammar structural tag, as JSON text")
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputsRequest:
        given = [key for key in _CONSTRAINTS if getattr(self, key) is not None]
        if len(given) != 1:
            # vLLM's rule (its StructuredOutputsParams), in words that name the keys.
            raise InvalidRequestError(
                "structured_outputs takes exactly one of 'json', 'regex', 'choice', 'grammar', "
                f"'json_object' and 'structural_tag'; got {len(given)}",
                param="structured_outputs",
            )
        return self


_CONSTRAINTS = ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")


class _SamplingFields(_Strict):
    """Fields shared by both endpoints, with OpenAI's names and vLLM's extras."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    # null is 1, as OpenAI's and vLLM's chat endpoint take it.
    n: NumChoices | None = 1
    stop: StopSequences | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # Accepted and ignored, as by OpenAI's and vLLM's servers.
    user: str | None = None
    metadata: dict[str, str] | None = None
    # Token ids (as strings, JSON's keys) to a bias added to their logits.
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extras, with vLLM's meaning (its SamplingParams).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    # vLLM uses it in beam search only, which it runs for use_beam_search alone.
    length_penalty: float = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    bad_words: list[str] = []
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    # Detokenizer options: the Processor detokenizes, so they act there.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The logprobs of the prompt's tokens, with this many alternatives each (-1: all), in
    # the whole body (not streamed).
    prompt_logprobs: int | None = None
    # Completions: the prompt before the completion; chat: the last message before the
    # answer, where the answer continues it (same role).
    echo: bool = False
    # Constraints the engine enforces (vLLM's structured outputs); response_format wins.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @model_validator(mode="after")
    def _common_checks(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if any(stop == "" for stop in self.stop_list()):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        if any(not word for word in self.bad_words):
            # vLLM's words.
            raise InvalidRequestError(
                f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}", param="bad_words"
            )
        if self.prompt_logprobs is not None:
            # vLLM's rules and words.
            if self.stream and (self.prompt_logprobs > 0 or self.prompt_logprobs == -1):
                raise InvalidRequestError(
                    "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
                )
            if self.prompt_logprobs < -1:
                raise InvalidRequestError("`prompt_logprobs` must be a positive value or -1.", param="prompt_logprobs")
        if self.logit_bias:
            self.logit_bias_by_id()
        return self

    def logit_bias_by_id(self) -> dict[int, float] | None:
        """logit_bias with token ids for keys and each bias clamped, as vLLM makes it."""
        if not self.logit_bias:
            return None
        by_id: dict[int, float] = {}
        not_ints = []
        for key, bias in self.logit_bias.items():
            try:
                by_id[int(key)] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, bias))
            except ValueError:
                not_ints.append(key)
        if not_ints:
            # vLLM's words.
            raise InvalidRequestError(
                f"logit_bias contains key(s) that cannot be converted to integer token IDs: {not_ints!r}",
                param="logit_bias",
            )
        if out_of_range := [token_id for token_id in by_id if not 0 <= token_id <= MAX_INT32]:
            raise InvalidRequestError(f"token_id(s) {out_of_range} in logit_bias are not token ids", param="logit_bias")
        return by_id

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def num_choices(self) -> int:
        return self.n or 1

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage_in_stream(self) -> bool:
        """Usage on every chunk: vLLM's continuous_usage_stats, which needs include_usage too."""
        return (
            self.include_usage_in_stream()
            and self.stream_options is not None
            and self.stream_options.continuous_usage_stats
        )


# Keys of chat_template_kwargs that would replace Tandem's own arguments to the template
# (vLLM refuses chat_template and tokenize the same way).
_RESERVED_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize", "conversation", "messages"})


def _check_template_options(
    continue_final_message: bool, add_generation_prompt: bool, chat_template_kwargs: dict[str, Any] | None
) -> None:
    """The chat template's inputs as vLLM checks them, in vLLM's words."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True "
            "(add_generation_prompt defaults to true).",
            param="continue_final_message",
        )
    if chat_template_kwargs and (reserved := _RESERVED_TEMPLATE_KWARGS & chat_template_kwargs.keys()):
        raise InvalidRequestError(
            f"Found unexpected chat template kwargs from request: {sorted(reserved)}", param="chat_template_kwargs"
        )


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Strict):
    name: Annotated[str, Field(min_length=1)]


class NamedToolChoice(_Strict):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    tools: list[ChatTool] | None = None
    # With tools and no tool_choice, "auto" (OpenAI's and vLLM's default).
    tool_choice: ToolChoice | None = None
    # None: OpenAI's default, true.
    parallel_tool_calls: bool | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS_CHAT)] | None = None
    # The chat template's inputs, as vLLM's server takes them.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # A rendered chat holds its special tokens already; true adds the tokenizer's (BOS) again.
    add_special_tokens: bool = False
    # vLLM's: false leaves a reasoning model's reasoning out of the answer (with the
    # Processor's reasoning-parser; the answer's logprobs then too).
    include_reasoning: bool = True
    # OpenAI's and vLLM's: reaches the chat template as `reasoning_effort` (`template_variables`).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    def template_variables(self) -> dict[str, Any] | None:
        """The chat template's variables beyond the messages, as vLLM's server merges them:
        `chat_template_kwargs`, with `reasoning_effort` where the request sets one, and
        `enable_thinking` for templates that need thinking switched on (unless
        chat_template_kwargs sets it)."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        variables = dict(self.chat_template_kwargs or {})
        variables.setdefault("enable_thinking", self.reasoning_effort != "none")
        variables["reasoning_effort"] = self.reasoning_effort
        return variables

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        # vLLM's words when both are given; left to its default, add_generation_prompt makes
        # the chat template refuse the pair there.
        _check_template_options(self.continue_final_message, self.add_generation_prompt, self.chat_template_kwargs)
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        """vLLM's checks of tools and tool_choice, in vLLM's words."""
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidRequestError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tools and all(tool.function.name != self.tool_choice.function.name for tool in self.tools):
                raise InvalidRequestError(
                    "The tool specified in `tool_choice` does not match any of the specified `tools`",
                    param="tool_choice",
                )
            if self.structured_outputs is not None:
                raise InvalidRequestError(
                    "You can only either use constraints for structured outputs or tools, not both.",
                    param="structured_outputs",
                )

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """The tool choice that applies: without tools none, with tools and no choice auto."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    def max_output_tokens(self) -> int | None:
        """max_completion_tokens supersedes the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_top_logprobs(self) -> int | None:
        """None when logprobs are off, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def num_prompt_logprobs(self) -> int | None:
        """How many alternatives per prompt token the engine computes (None: none). As
        vLLM's: echo asks for top_logprobs of them (its default there is 0: the token's own)."""
        if self.prompt_logprobs is not None or not self.echo:
            return self.prompt_logprobs
        return self.top_logprobs or 0


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# One prompt, as the completions endpoint takes it: text or token ids.
Prompt = str | TokenIds


class CompletionRequest(_SamplingFields):
    # One prompt, or several (text or token ids): each is a completion of its own, its
    # choices numbered after the previous prompt's (vLLM's and OpenAI's batch form).
    prompt: Prompt | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    # OpenAI's default for the legacy endpoint; 0 only with echo (the prompt alone).
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS_COMPLETION)] | None = None
    suffix: str | None = None
    # For a text prompt: the tokenizer's special tokens (BOS) around it, as vLLM's default.
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        # vLLM's rules and words: Tandem's models have no fill-in-the-middle rendering.
        if self.suffix is not None:
            if self.echo:
                raise InvalidRequestError("Echo is unsupported with suffix.", param="suffix")
            raise InvalidRequestError(
                "suffix is only supported for models with FIM completion rendering", param="suffix"
            )
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be at least 1, got 0.", param="max_tokens")
        return self

    def prompts(self) -> list[Prompt]:
        """Each prompt of the request, one for a single prompt."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(cast(list[Prompt], prompt))

    def for_prompt(self, prompt: Prompt) -> CompletionRequest:
        """This request with `prompt` alone: one of a batch's completions."""
        return self.model_copy(update={"prompt": prompt})

    def prompt_text(self) -> str | None:
        """The prompt's text; None for token ids. A request of one prompt only."""
        (prompt,) = self.prompts()
        return prompt if isinstance(prompt, str) else None

    def prompt_token_ids(self) -> list[int] | None:
        (prompt,) = self.prompts()
        return None if isinstance(prompt, str) else list(prompt)

    def generates_nothing(self) -> bool:
        """echo with max_tokens 0: the prompt is the whole answer (the engine still makes a
        token, as vLLM's does, which is left out)."""
        return self.max_tokens == 0

    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    def num_top_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """How many alternatives per prompt token the engine computes (None: none). As
        vLLM's: echo asks for as many as the completion's logprobs."""
        return self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else self.logprobs


OpenAIRequest = ChatCompletionRequest | CompletionRequest


class TokenizeCompletionRequest(_Strict):
    """`POST /tokenize` of a prompt: vLLM's body."""

    model: str | None = Field(default=None, description="default: the one model served")
    prompt: str
    add_special_tokens: bool = Field(default=True, description="add the tokenizer's special tokens (BOS)")
    return_token_strs: bool | None = Field(default=False, description="also return each token's vocabulary string")


class TokenizeChatRequest(_Strict):
    """`POST /tokenize` of chat messages, as the chat template renders them: vLLM's body."""

    model: str | None = Field(default=None, description="default: the one model served")
    messages: list[ChatMessage]
    add_generation_prompt: bool = Field(default=True, description="end with the template's assistant header")
    continue_final_message: bool = Field(
        default=False, description="leave the last message open, for the model to continue it"
    )
    add_special_tokens: bool = Field(
        default=False, description="add special tokens on top of the template's own (it usually holds BOS)"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="more variables for the template")
    return_token_strs: bool | None = Field(default=False, description="also return each token's vocabulary string")

    @model_validator(mode="after")
    def _template_checks(self) -> TokenizeChatRequest:
        _check_template_options(self.continue_final_message, self.add_generation_prompt, self.chat_template_kwargs)
        return self


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_Strict):
    """`POST /detokenize`: vLLM's body."""

    model: str | None = Field(default=None, description="default: the one model served")
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the served model's, as /v1/models reports it")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


RequestT = TypeVar("RequestT", bound=_Strict)  # a request body of this module

# Pydantic names union branches in error locations ("str", "list[TextPart]", ...);
# clients know only their own field names.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|dict)$|\[")


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _UNION_BRANCH.search(part):
            param += f".{part}" if param else part
    return param or None


def _request_error(exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False)
    deepest = max(len(e["loc"]) for e in errors)
    candidates = [e for e in errors if len(e["loc"]) == deepest]
    # Across union branches a wrong value ("too long") says more than "wrong type".
    first = next((e for e in candidates if not e["type"].endswith("_type")), candidates[0])
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"We could not parse the JSON body of your request: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequestError("The request body must be a JSON object.")
    param = _param_name(first["loc"])
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if first["type"].endswith("_type") and len(candidates) > 1:
        return InvalidRequestError(f"Invalid type for '{param}'.", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param)


def parse_request(request_type: type[RequestT], body: bytes | str | dict[str, Any]) -> RequestT:
    """Validate a raw body (or an already-decoded dict, after a hop) into a request of `request_type`.

    Raises InvalidRequestError naming the offending parameter (validators raise it directly:
    pydantic wraps only ValueErrors, so a InvalidRequestError passes through as it is).
    """
    try:
        if isinstance(body, dict):
            return request_type.model_validate(body)
        return request_type.model_validate_json(body)
    except ValidationError as exc:
        raise _request_error(exc) from None


def parse_tokenize_request(body: bytes | dict[str, Any]) -> TokenizeRequest:
    """A /tokenize body: of chat messages when it has `messages` (as vLLM tells them apart), else of a prompt."""
    decoded: Any = body
    if isinstance(body, bytes):
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = body  # parse_request says what is wrong with it
    if not isinstance(decoded, dict):
        return parse_request(TokenizeCompletionRequest, body)
    if "messages" in decoded:
        return parse_request(TokenizeChatRequest, decoded)
    return parse_request(TokenizeCompletionRequest, decoded)
