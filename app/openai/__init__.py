"""The OpenAI-compatible HTTP layer that the Frontend service mounts."""

from app.openai.app import WORKER_HEADER, create_app
from app.openai.backend import Backend, ModelCard, RequestKind
from app.openai.errors import ClientError, to_client_error
from app.openai.metrics import FrontendMetrics
from app.openai.schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse_request
from app.openai.server import make_server

__all__ = [
    "WORKER_HEADER",
    "Backend",
    "ChatCompletionRequest",
    "ClientError",
    "CompletionRequest",
    "FrontendMetrics",
    "ModelCard",
    "OpenAIRequest",
    "RequestKind",
    "create_app",
    "make_server",
    "parse_request",
    "to_client_error",
]
