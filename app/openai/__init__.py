"""The OpenAI-compatible HTTP layer that the Frontend service mounts."""

from app.openai.app import WORKER_HEADER, create_app
from app.openai.backend import Backend, ModelCard, RequestKind
from app.openai.errors import (
    InternalError,
    ModelNotFoundError,
    OpenAIError,
    OverloadedError,
    RequestError,
    ServiceUnavailableError,
    error_from_remote,
    to_openai_error,
)
from app.openai.metrics import FrontendMetrics
from app.openai.schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse_request
from app.openai.server import make_server, serve

__all__ = [
    "WORKER_HEADER",
    "Backend",
    "ChatCompletionRequest",
    "CompletionRequest",
    "FrontendMetrics",
    "InternalError",
    "ModelCard",
    "ModelNotFoundError",
    "OpenAIError",
    "OpenAIRequest",
    "OverloadedError",
    "RequestError",
    "RequestKind",
    "ServiceUnavailableError",
    "create_app",
    "error_from_remote",
    "make_server",
    "parse_request",
    "serve",
    "to_openai_error",
]
