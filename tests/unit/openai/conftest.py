from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from app.model.tiny import make_tiny
from app.openai import create_app
from app.preprocess import Preprocessor
from scripted_backend import ScriptedBackend


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by path with tests/unit/preprocess: the model is deterministic, make it once a session.
    path = tmp_path_factory.getbasetemp() / "tiny-llama-text"
    return path if (path / "config.json").exists() else make_tiny(path)


@pytest.fixture(scope="session")
def preprocessor(tiny_model_dir: Path) -> Preprocessor:
    return Preprocessor(tiny_model_dir)


@pytest.fixture
def make_backend(preprocessor: Preprocessor) -> Callable[..., ScriptedBackend]:
    return lambda **kwargs: ScriptedBackend(preprocessor, **kwargs)


@pytest.fixture
def backend(make_backend) -> ScriptedBackend:
    return make_backend()


@pytest.fixture
async def client(backend: ScriptedBackend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        yield client
