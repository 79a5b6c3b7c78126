"""OpenAI requests -> PreprocessedRequests: chat template, tokenization, sampling.

Every user-caused problem (prompt too long, token ids outside the vocabulary, a chat
the template rejects) is a InvalidRequestError naming the parameter, raised before any
worker is involved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from app.errors import InvalidRequestError
from app.openai.backend import Tokenized
from app.openai.schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from app.preprocess.postprocessor import Postprocessor
from app.preprocess.reasoning import ReasoningReader, engine_reasoning, load_reasoning_parser
from app.preprocess.structured import structured_outputs_for
from app.preprocess.tokenizer import TokenTexts, load_tokenizer
from app.preprocess.tool_parsers import AutoCallReader, load_tool_parser, vllm_tokenizer
from app.preprocess.tools import tool_call_reader
from app.protocol import EchoedPrompt, PreprocessedRequest, SamplingOptions, StopConditions

# Sampling defaults a model may set in generation_config.json; vLLM applies them too.
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_WIRE_DEFAULTS = SamplingOptions()
# vLLM samples greedily below this temperature (its _SAMPLING_EPS).
_GREEDY_BELOW = 1e-5


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class Preprocessor:
    """One model's tokenizer, chat template and limits."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int | None = None,
        tool_call_parser: str | None = None,
        tool_parser_plugin: str | None = None,
        reasoning_parser: str | None = None,
        reasoning_parser_plugin: str | None = None,
    ) -> None:
        """`tool_call_parser`: the vLLM tool parser that finds tool_choice "auto"'s calls
        (None: such requests are refused); `tool_parser_plugin` registers more of them.
        `reasoning_parser`: the vLLM reasoning parser that splits a chat answer's reasoning
        off its content (None: all is content); `reasoning_parser_plugin` registers more."""
        self.model_dir = str(model_dir)
        self._auto_tool_parser = load_tool_parser(tool_call_parser, tool_parser_plugin) if tool_call_parser else None
        self.tokenizer = load_tokenizer(self.model_dir)
        self._parser_tokenizer = vllm_tokenizer(self.tokenizer) if tool_call_parser or reasoning_parser else None
        self._reasoning_parser = (
            load_reasoning_parser(reasoning_parser, reasoning_parser_plugin, self._parser_tokenizer)
            if reasoning_parser
            else None
        )
        self._backend = self.tokenizer.backend_tokenizer
        self.token_texts = TokenTexts(self._backend)
        config = _read_json(Path(model_dir) / "config.json")
        generation_config = _read_json(Path(model_dir) / "generation_config.json")
        self.max_model_len = max_model_len or config.get("max_position_embeddings") or self.tokenizer.model_max_length
        self.vocab_size = len(self.tokenizer)
        eos_ids = _as_id_list(self.tokenizer.eos_token_id) + _as_id_list(generation_config.get("eos_token_id"))
        self.eos_token_ids = list(dict.fromkeys(eos_ids))
        self._sampling_defaults = {k: generation_config[k] for k in _GENERATION_DEFAULTS if k in generation_config}
        # No token covers more input than this (x2 for normalizers that shrink text), so
        # longer prompts are rejected without the seconds it takes to tokenize megabytes.
        longest_token = max(len(token.encode()) for token in self._backend.get_vocab(with_added_tokens=True))
        self._max_prompt_bytes = 2 * longest_token * self.max_model_len

    def chat(self, request: ChatCompletionRequest, request_id: str) -> PreprocessedRequest:
        if request.effective_tool_choice() == "auto" and self._auto_tool_parser is None:
            tool_call_reader(request)  # the 400 that says what is missing, before any work
        text = self._render_chat(
            request.messages,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            template_kwargs=request.template_variables(),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None,
        )
        token_ids = self._encode(text, prompt_param="messages", add_special_tokens=request.add_special_tokens)
        preprocessed = self._build(request, request_id, token_ids, prompt_param="messages")
        if self._reasoning_parser is not None:
            preprocessed.reasoning_ended, preprocessed.reasoning_parser_kwargs = engine_reasoning(
                self._reasoning_parser, self._parser_tokenizer, request, token_ids
            )
        return preprocessed

    def completion(self, request: CompletionRequest, request_id: str) -> PreprocessedRequest:
        text = request.prompt_text()
        if text is not None:
            token_ids = self._encode(text, prompt_param="prompt", add_special_tokens=request.add_special_tokens)
        else:
            token_ids = request.prompt_token_ids() or []
            self._check_vocabulary(token_ids, param="prompt")
        return self._build(request, request_id, token_ids, prompt_param="prompt")

    def preprocess(self, request: OpenAIRequest, request_id: str) -> PreprocessedRequest:
        if isinstance(request, ChatCompletionRequest):
            return self.chat(request, request_id)
        return self.completion(request, request_id)

    def postprocessor(self, request: OpenAIRequest, preprocessed: PreprocessedRequest) -> Postprocessor:
        tool_calls = reasoning = None
        skip_special_tokens = request.skip_special_tokens
        spaces_between_special_tokens = request.spaces_between_special_tokens
        num_top_logprobs = request.num_top_logprobs()
        if isinstance(request, ChatCompletionRequest):
            tool_calls = tool_call_reader(request, self._auto_tool_parser, self._parser_tokenizer)
            if isinstance(tool_calls, AutoCallReader):
                # The parser may need special tokens kept: they can be its tags (Hermes').
                skip_special_tokens = tool_calls.skip_special_tokens
            if self._reasoning_parser is not None:
                reasoning = ReasoningReader(
                    self._reasoning_parser,
                    self._parser_tokenizer,
                    request,
                    preprocessed.token_ids,
                    count_every_step=request.continuous_usage_in_stream(),
                )
                skip_special_tokens = skip_special_tokens and reasoning.skip_special_tokens
                spaces_between_special_tokens &= reasoning.spaces_between_special_tokens
            if not request.include_reasoning and (reasoning is not None or self._auto_tool_parser is not None):
                # vLLM's: with a parser, a hidden reasoning hides the logprobs too, whose
                # tokens would spell it.
                num_top_logprobs = None
        return Postprocessor(
            self._backend,
            self.token_texts,
            stop=request.stop_list(),
            min_tokens=request.min_tokens,
            num_top_logprobs=num_top_logprobs,
            prompt_token_ids=preprocessed.token_ids,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            tool_calls=tool_calls,
            reasoning=reasoning,
        )

    def echoed_prompt(self, request: CompletionRequest, token_ids: Sequence[int]) -> EchoedPrompt:
        """The prompt as `echo` shows it: its own text, or that of its token ids (special
        tokens included, as vLLM's server decodes them)."""
        text = request.prompt_text()
        if text is None:
            text = cast(str, self.tokenizer.decode(list(token_ids)))
        token_texts = None
        if request.logprobs is not None:
            token_texts = [self.token_texts.get(token_id)[0] for token_id in token_ids]
        return EchoedPrompt(text=text, token_ids=list(token_ids), token_texts=token_texts)

    def tokenize(self, request: TokenizeRequest) -> Tokenized:
        """/tokenize: the ids of a prompt, or of chat messages as the template renders them, as
        vLLM's server gives them. No length limit: clients ask to learn how long a text is."""
        if isinstance(request, TokenizeChatRequest):
            text = self._render_chat(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs,
            )
        else:
            text = request.prompt
        ids = self._backend.encode(text, add_special_tokens=request.add_special_tokens).ids
        strs = cast(list[str], self.tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return Tokenized(ids, strs)

    def detokenize(self, request: DetokenizeRequest) -> str:
        """/detokenize: the text of token ids, special tokens included (as vLLM's server)."""
        self._check_vocabulary(request.tokens, param="tokens")
        return cast(str, self.tokenizer.decode(request.tokens))

    def _check_vocabulary(self, token_ids: Sequence[int], *, param: str) -> None:
        out_of_vocab = next((t for t in token_ids if t >= self.vocab_size), None)
        if out_of_vocab is not None:
            raise InvalidRequestError(
                f"token id {out_of_vocab} is outside the vocabulary (size {self.vocab_size})", param=param
            )

    def _render_chat(
        self,
        chat: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for message in chat:
            rendered: dict[str, Any] = {"role": message.role, "content": message.text() or ""}
            for key in ("name", "tool_call_id", "tool_calls"):
                value = getattr(message, key)
                if value is not None:
                    rendered[key] = value
            reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
            if message.role == "assistant" and reasoning is not None:
                # vLLM's server: both names, for templates that read either.
                rendered["reasoning"] = rendered["reasoning_content"] = reasoning
            messages.append(rendered)
        try:
            # tokenize=False: the rendered text (transformers types every return form at once).
            # Extra template variables first: the request's own fields win, as in vLLM.
            rendered_chat = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                **{
                    **(template_kwargs or {}),
                    # The template renders the tools into the prompt, in the model's own format.
                    "tools": tools,
                    "add_generation_prompt": add_generation_prompt,
                    "continue_final_message": continue_final_message,
                },
            )
            return cast(str, rendered_chat)
        except Exception as exc:
            # Templates reject some conversations on purpose (raise_exception: roles out of
            # order, say) and trip over others (a tool call missing a key): both are the request's doing.
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from None

    def _encode(self, text: str, *, prompt_param: str, add_special_tokens: bool = False) -> list[int]:
        size = len(text.encode())
        if size > self._max_prompt_bytes:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"({size} bytes) is far longer.",
                param=prompt_param,
            )
        # A rendered chat already holds its special tokens (BOS included).
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _build(
        self, request: OpenAIRequest, request_id: str, token_ids: list[int], *, prompt_param: str
    ) -> PreprocessedRequest:
        prompt_len = len(token_ids)
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param=prompt_param)
        if prompt_len >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{prompt_len} tokens, which leaves no room for the completion.",
                param=prompt_param,
            )
        max_tokens = self._max_tokens(request, prompt_len)
        if request.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
            )
        sampling = self._sampling(request)
        n = request.num_choices()
        if n > 1 and sampling.temperature < _GREEDY_BELOW:
            # vLLM's rule and words (SamplingParams._verify_greedy_sampling): n greedy
            # choices would all be the same text.
            raise InvalidRequestError(f"n must be 1 when using greedy sampling, got {n}.", param="n")
        return PreprocessedRequest(
            request_id=request_id,
            model=request.model,
            token_ids=token_ids,
            sampling=sampling,
            stop=StopConditions(
                max_tokens=max_tokens,
                stop_token_ids=self._stop_token_ids(request),
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
            ),
            n=n,
        )

    def _max_tokens(self, request: OpenAIRequest, prompt_len: int) -> int:
        """As vLLM's server: what the request asks for, clipped to the room the prompt leaves
        (vLLM's get_max_tokens; clients send a model's whole context length and rely on it),
        but a request for more than the whole context is refused."""
        room = self.max_model_len - prompt_len
        if isinstance(request, CompletionRequest) and request.generates_nothing():
            return 1  # echo alone: the engine makes a token all the same, left out of the answer
        requested = request.max_output_tokens()
        # The completions endpoint's default of 16 is no request for more than fits.
        explicit = isinstance(request, ChatCompletionRequest) or "max_tokens" in request.model_fields_set
        if requested is None:
            return room
        if requested > self.max_model_len and explicit:
            param = "max_tokens"
            if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
                param = "max_completion_tokens"
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{requested} output tokens. Please reduce {param}.",
                param=param,
            )
        return min(requested, room)

    def _stop_token_ids(self, request: OpenAIRequest) -> list[int]:
        """The request's stop tokens, and the model's EOS tokens unless it ignores them."""
        if not request.stop_token_ids:
            return [] if request.ignore_eos else self.eos_token_ids
        own = list(dict.fromkeys(request.stop_token_ids))
        return own if request.ignore_eos else list(dict.fromkeys(own + self.eos_token_ids))

    def _sampling(self, request: OpenAIRequest) -> SamplingOptions:
        # msgspec leaves out a field whose value *is* its default (for floats, the very
        # object): falling back to these keeps a plain request's wire form small.
        wire, defaults = _WIRE_DEFAULTS, self._sampling_defaults

        def given(value: float | None, name: str) -> Any:
            return value if value is not None else defaults.get(name, getattr(wire, name))

        return SamplingOptions(
            temperature=given(request.temperature, "temperature"),
            top_p=given(request.top_p, "top_p"),
            top_k=max(given(request.top_k, "top_k"), 0),
            min_p=given(request.min_p, "min_p"),
            seed=request.seed,
            presence_penalty=request.presence_penalty or wire.presence_penalty,
            frequency_penalty=request.frequency_penalty or wire.frequency_penalty,
            repetition_penalty=given(request.repetition_penalty, "repetition_penalty"),
            logprobs=request.num_top_logprobs(),
            logit_bias=request.logit_bias_by_id(),
            allowed_token_ids=request.allowed_token_ids,
            bad_words=list(dict.fromkeys(request.bad_words)),
            structured=structured_outputs_for(request),
            prompt_logprobs=request.num_prompt_logprobs(),
        )
