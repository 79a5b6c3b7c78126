"""A Backend made of the real Preprocessor and Postprocessor over a scripted token source.

The token source stands in for the engine only: it replies with a fixed text, token by
token, so that every byte the HTTP layer sends can be checked exactly. With n > 1 choices,
choice i's text is `choice_reply(i)`, the choices' tokens interleaved one by one.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator

from app.openai import ModelCard
from app.openai.backend import Tokenized
from app.openai.schema import CompletionRequest, DetokenizeRequest, OpenAIRequest, TokenizeRequest
from app.preprocess import Postprocessor, Preprocessor, postprocess_stream
from app.protocol import EngineOutput, PreprocessedRequest, RankedLogprob, StreamItem, TokenLogprob

REPLY = "Hello there! 日本語 🙂 and the end."
MODEL = "tiny"


def choice_reply(index: int) -> str:
    return REPLY if index == 0 else f"Choice {index}: {REPLY}"


class ScriptedBackend:
    def __init__(
        self, preprocessor: Preprocessor, *, token_delay_s: float = 0.0, repeat: bool = False, reply: str = REPLY
    ) -> None:
        """`reply`: choice 0's text (the model's, before any parsing of tool calls)."""
        self.preprocessor = preprocessor
        self.token_delay_s = token_delay_s
        self.repeat = repeat
        self.models = [ModelCard(id=MODEL, max_model_len=preprocessor.max_model_len, created=1, root="/models/tiny")]
        # As an engine ends a reply that stops: with an EOS token (its text left out).
        self.reply_ids = preprocessor.tokenizer.encode(reply, add_special_tokens=False) + preprocessor.eos_token_ids[:1]
        self.generate_calls = 0
        self.request_ids: list[str] = []
        self.engine_tokens_sent = 0
        self.engine_closed = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.fail_after_tokens: BaseException | None = None

    def list_models(self) -> list[ModelCard]:
        return self.models

    def is_ready(self) -> bool:
        return bool(self.models)

    def reply_ids_of(self, choice: int) -> list[int]:
        """Choice `choice`'s reply, ending with EOS."""
        if choice == 0:
            return self.reply_ids
        text_ids = self.preprocessor.tokenizer.encode(choice_reply(choice), add_special_tokens=False)
        return text_ids + self.preprocessor.eos_token_ids[:1]

    async def _engine(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        try:
            streams = [self._choice(request, choice) for choice in range(request.n)]
            # One token of each unfinished choice in turn.
            while streams:
                for stream in list(streams):
                    output = next(stream, None)
                    if output is None:
                        streams.remove(stream)
                        continue
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    self.engine_tokens_sent += 1
                    yield output
                    if self.fail_after_tokens is not None:
                        raise self.fail_after_tokens
        finally:
            self.engine_closed.set()

    def _choice(self, request: PreprocessedRequest, choice: int) -> Iterator[EngineOutput]:
        # The reply, cut at max_tokens; `repeat` loops it until max_tokens instead of ending with EOS.
        budget = request.stop.max_tokens
        reply_ids = self.reply_ids_of(choice)
        text_ids = reply_ids[:-1]
        ids = text_ids * (budget // len(text_ids) + 1) if self.repeat else reply_ids
        ids = ids[:budget]
        for index, token_id in enumerate(ids):
            output = EngineOutput(token_ids=[token_id], index=choice)
            if index == 0 and choice == 0:
                output.num_prompt_tokens = len(request.token_ids)
                output.num_cached_tokens = 0
                output.worker_id = "worker-1"
                if request.sampling.prompt_logprobs is not None:
                    output.prompt_logprobs = self.prompt_logprobs_of(request.token_ids)
            if request.sampling.logprobs is not None:
                output.logprobs = [-0.25]
                output.top_logprobs = [[TokenLogprob(token_id, -0.25), TokenLogprob(5, -1.5), TokenLogprob(6, -2.5)]]
            if index == len(ids) - 1:
                output.finish_reason = "length" if len(ids) == budget else "stop"
            yield output

    @staticmethod
    def prompt_logprobs_of(token_ids: list[int]) -> list[list[RankedLogprob]]:
        """An engine's prompt logprobs: each token -1.0 at rank 3, token 7 the best at -0.5."""
        return [[]] + [[RankedLogprob(token_id, -1.0, 3), RankedLogprob(7, -0.5, 1)] for token_id in token_ids[1:]]

    async def generate(self, kind: str, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        self.generate_calls += 1
        self.request_ids.append(request_id)
        if self.fail_with is not None:
            raise self.fail_with
        pre = self.preprocessor.preprocess(request, request_id)
        post: Postprocessor | list[Postprocessor] = self.preprocessor.postprocessor(request, pre)
        if pre.n > 1:
            post = [self.preprocessor.postprocessor(request, pre) for _ in range(pre.n)]
        first = True
        async for item in postprocess_stream(post, self._engine(pre)):
            if first and isinstance(request, CompletionRequest) and request.echo:
                item.echo = self.preprocessor.echoed_prompt(request, pre.token_ids)  # as the pipeline does
            first = False
            yield item

    async def tokenize(self, request: TokenizeRequest) -> Tokenized:
        return self.preprocessor.tokenize(request)

    async def detokenize(self, request: DetokenizeRequest) -> str:
        return self.preprocessor.detokenize(request)
