"""OpenAI requests -> PreprocessedRequests: chat template, tokenization, sampling.

Every user-caused problem (prompt too long, token ids outside the vocabulary, a chat
the template rejects) is a InvalidRequestError naming the parameter, raised before any
worker is involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from app.preprocess.postprocessor import Postprocessor
from app.preprocess.tokenizer import TokenTexts, load_tokenizer
from app.protocol import PreprocessedRequest, SamplingOptions, StopConditions

# Sampling defaults a model may set in generation_config.json; vLLM applies them too.
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k")


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

    def __init__(self, model_dir: str | Path, *, max_model_len: int | None = None) -> None:
        self.model_dir = str(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
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
        token_ids = self._encode(self._render_chat(request), prompt_param="messages")
        return self._build(request, request_id, token_ids, prompt_param="messages")

    def completion(self, request: CompletionRequest, request_id: str) -> PreprocessedRequest:
        text = request.prompt_text()
        if text is not None:
            token_ids = self._encode(text, prompt_param="prompt", add_special_tokens=True)
        else:
            token_ids = request.prompt_token_ids() or []
            out_of_vocab = next((t for t in token_ids if t >= self.vocab_size), None)
            if out_of_vocab is not None:
                raise InvalidRequestError(
                    f"token id {out_of_vocab} is outside the vocabulary (size {self.vocab_size})", param="prompt"
                )
        return self._build(request, request_id, token_ids, prompt_param="prompt")

    def preprocess(self, request: OpenAIRequest, request_id: str) -> PreprocessedRequest:
        if isinstance(request, ChatCompletionRequest):
            return self.chat(request, request_id)
        return self.completion(request, request_id)

    def postprocessor(self, request: OpenAIRequest, preprocessed: PreprocessedRequest) -> Postprocessor:
        return Postprocessor(
            self._backend,
            self.token_texts,
            stop=request.stop_list(),
            min_tokens=request.min_tokens,
            num_top_logprobs=request.num_top_logprobs(),
            prompt_token_ids=preprocessed.token_ids,
        )

    def _render_chat(self, request: ChatCompletionRequest) -> str:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for message in request.messages:
            rendered: dict[str, Any] = {"role": message.role, "content": message.text() or ""}
            for key in ("name", "tool_call_id", "tool_calls"):
                value = getattr(message, key)
                if value is not None:
                    rendered[key] = value
            messages.append(rendered)
        try:
            # tokenize=False: the rendered text (transformers types every return form at once).
            return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
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
        return PreprocessedRequest(
            request_id=request_id,
            model=request.model,
            token_ids=token_ids,
            sampling=self._sampling(request),
            stop=StopConditions(
                max_tokens=max_tokens,
                stop_token_ids=[] if request.ignore_eos else self.eos_token_ids,
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
            ),
        )

    def _max_tokens(self, request: OpenAIRequest, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        requested = request.max_output_tokens()
        if isinstance(request, ChatCompletionRequest):
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            explicit = requested is not None
        else:
            param = "max_tokens"
            # The endpoint's default of 16 is clipped to what fits, an explicit value is not.
            explicit = "max_tokens" in request.model_fields_set and requested is not None
        if requested is None:
            return room
        if requested > room:
            if not explicit:
                return room
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                f"Please reduce the prompt or {param}.",
                param=param,
            )
        return requested

    def _sampling(self, request: OpenAIRequest) -> SamplingOptions:
        defaults = self._sampling_defaults
        top_k = request.top_k if request.top_k is not None else defaults.get("top_k", 0)
        return SamplingOptions(
            temperature=request.temperature if request.temperature is not None else defaults.get("temperature", 1.0),
            top_p=request.top_p if request.top_p is not None else defaults.get("top_p", 1.0),
            top_k=max(top_k, 0),
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logprobs=request.num_top_logprobs(),
        )
