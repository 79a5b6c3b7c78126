from pathlib import Path

import pytest

from app.model.tiny import make_tiny
from app.preprocess import Preprocessor


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by path with tests/unit/openai: the model is deterministic, make it once a session.
    path = tmp_path_factory.getbasetemp() / "tiny-llama-text"
    return path if (path / "config.json").exists() else make_tiny(path)


@pytest.fixture(scope="session")
def preprocessor(tiny_model_dir: Path) -> Preprocessor:
    return Preprocessor(tiny_model_dir)
