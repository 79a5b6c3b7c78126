from pathlib import Path

import pytest

from app.preprocess import Preprocessor


@pytest.fixture(scope="session")
def preprocessor(tiny_model: Path) -> Preprocessor:
    return Preprocessor(tiny_model)
