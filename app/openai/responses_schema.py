"""The body of `POST /v1/responses` that Tandem accepts: OpenAI's Responses API as vLLM's
server takes it for a text model, validated as strictly as the chat body (app/openai/schema.py).

Served: `input` as a string or a list of items (messages of the roles user, system,
developer and assistant with text content; function calls and their outputs, as a client
passes a turn back), `instructions`, the sampling fields (OpenAI's and vLLM's extras that
the chat endpoint takes too), `text.format`, function `tools` and `tool_choice`, logprobs
through `include`, and the fields vLLM echoes without acting on them (`metadata`, `user`,
`store`, `service_tier`, `max_tool_calls`, `prompt_cache_key`). Refused with a 400 that
names the field: anything vLLM does not act on for a text model either (images, built-in
tools, reasoning items), and `truncation: "auto"`. Tandem stores no responses, as vLLM's
server by default: `previous_response_id` names none (404), `background` needs the store.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from app.errors import InvalidRequestError
from app.openai.schema import (
    MAX_TOP_LOGPROBS_CHAT,
    MinP,
    Penalty,
    RepetitionPenalty,
    Seed,
    StopSequences,
    StructuredOutputsRequest,
    Temperature,
    TokenCount,
    TokenId,
    TopK,
    TopP,
    _Strict,
)

# The `include` values of OpenAI's API that vLLM's server takes. Only the logprobs one
# changes anything for a text model without built-in tools, in vLLM and here alike.
INCLUDE_LOGPROBS = "message.output_text.logprobs"
Include = Literal[
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """An assistant's text, as a response's output item holds it (passed back as input)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


def _by_type(error_type: str, error_message: str, default: str | None = None) -> Discriminator:
    """A union's discriminator: the value's `type` (`default` where it has none), as a tag
    with a `[`, which error locations leave out as they do other union branches' names
    (app/openai/schema.py): a client reads `input[0].content`, not `input[0].type[message].content`.
    A value of no branch's type is the error `error_type`, saying `error_message`."""

    def tag(value: Any) -> str | None:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return f"type[{kind}]" if isinstance(kind, str) else None

    return Discriminator(tag, custom_error_type=error_type, custom_error_message=error_message)


ContentPart = Annotated[
    Annotated[InputText, Tag("type[input_text]")]
    | Annotated[OutputText, Tag("type[output_text]")]
    | Annotated[Refusal, Tag("type[refusal]")],
    _by_type("content_part", "a content part is input_text, output_text or refusal text (Tandem serves text models)"),
]


def _part_text(part: InputText | OutputText | Refusal) -> str:
    return part.refusal if isinstance(part, Refusal) else part.text


class MessageItem(_Strict):
    """A message: OpenAI's easy input message, its typed input message, or a response's
    output message passed back (with its id and status)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    # The last item "in_progress" or "incomplete": the model continues that message (vLLM's).
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def parts_text(self) -> list[str]:
        return [self.content] if isinstance(self.content, str) else [_part_text(part) for part in self.content]


class FunctionCallItem(_Strict):
    """A call the model made, passed back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(_Strict):
    """What the client's function returned for a call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        # Text parts joined with newlines, as vLLM joins a message's parts.
        return self.output if isinstance(self.output, str) else "\n".join(part.text for part in self.output)


# OpenAI's easy input message has no `type`: it is a message.
InputItem = Annotated[
    Annotated[MessageItem, Tag("type[message]")]
    | Annotated[FunctionCallItem, Tag("type[function_call]")]
    | Annotated[FunctionCallOutputItem, Tag("type[function_call_output]")],
    _by_type(
        "input_item",
        "an input item is a message, a function_call or a function_call_output (reasoning items and"
        " built-in tools' items are not served)",
        default="message",
    ),
]


class FunctionTool(_Strict):
    """A function the model may call (the Responses API's flat form of the chat tool)."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedFunctionChoice


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str
    # pydantic reserves `schema`; the alias keeps OpenAI's key.
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    Annotated[TextFormatText, Tag("type[text]")]
    | Annotated[TextFormatJsonObject, Tag("type[json_object]")]
    | Annotated[TextFormatJsonSchema, Tag("type[json_schema]")],
    _by_type("text_format", "text.format is text, json_object or json_schema"),
]


class TextConfig(_Strict):
    """`text`: the output's format (the chat endpoint's response_format)."""

    format: TextFormat | None = None
    # OpenAI's hint for how long an answer to write; vLLM echoes it and so does Tandem.
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(_Strict):
    """`reasoning`: its effort reaches the chat template (`reasoning_effort`), as in vLLM."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Strict):
    model: str | None = Field(default=None, description="default: the one model served")
    input: str | list[InputItem]
    instructions: str | None = Field(default=None, description="a system message before the input")
    max_output_tokens: TokenCount | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: dict[str, float] | None = None
    stop: StopSequences | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    include: list[Include] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS_CHAT)] = 0
    text: TextConfig | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    # vLLM's default; without tools it is "none" (and echoed so).
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool | None = True
    reasoning: Reasoning | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Tandem stores no responses, as vLLM's server by default: `store` is accepted and
    # ignored, `previous_response_id` names no stored response (a 404, vLLM's answer).
    store: bool | None = True
    previous_response_id: str | None = None
    background: bool | None = False
    truncation: Literal["auto", "disabled"] | None = "disabled"
    # Echoed, not acted on (by vLLM's server either).
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] = "auto"
    max_tool_calls: int | None = None
    prompt_cache_key: str | None = None

    @model_validator(mode="after")
    def _responses_checks(self) -> ResponsesRequest:
        # vLLM's checks, in vLLM's words where it has some.
        if self.background:
            if self.store is False:
                raise InvalidRequestError("background can only be used when `store` is true", param="background")
            raise InvalidRequestError(
                "Tandem does not store responses (as vLLM's server by default), and so does not serve the "
                "background mode",
                param="background",
            )
        if self.truncation == "auto":
            raise InvalidRequestError(
                "truncation 'auto' is not supported: a prompt past the model's context length is refused",
                param="truncation",
            )
        if self.text is not None and self.text.format is not None and self.structured_outputs is not None:
            raise InvalidRequestError(
                "Cannot specify both structured_outputs and text.format", param="structured_outputs"
            )
        if not self.tools:
            if self.tool_choice == "required":
                raise InvalidRequestError(
                    "Tool choice 'required' must be specified with 'tools' parameter.", param="tool_choice"
                )
            if isinstance(self.tool_choice, NamedFunctionChoice):
                raise InvalidRequestError("Tool choice 'function' not found in 'tools' parameter.", param="tool_choice")
        elif isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in {
            tool.name for tool in self.tools
        }:
            raise InvalidRequestError("Tool choice 'function' not found in 'tools' parameter.", param="tool_choice")
        return self

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedFunctionChoice:
        """vLLM's: without tools, "none" whatever was asked (it is echoed so)."""
        return self.tool_choice if self.tools else "none"

    def wants_logprobs(self) -> bool:
        return self.include is not None and INCLUDE_LOGPROBS in self.include
