from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from app.openai import create_app
from app.preprocess import Preprocessor
from tests.unit.openai.scripted_backend import ScriptedBackend


@pytest.fixture(scope="session")
def preprocessor(tiny_model: Path) -> Preprocessor:
    return Preprocessor(tiny_model)


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
