"""Tunable declarations: validation and their `set` options."""

from __future__ import annotations

import argparse
from typing import Annotated

import msgspec
import pytest

from app.components.worker import VllmWorkerConfig
from app.disagg.tunables import DISAGG_TUNABLES, MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.tunables import InvalidTunableError, Tunable

LENGTH: Tunable[int] = Tunable("test/max_length", Annotated[int, msgspec.Meta(ge=0)], 100, "a length")


def test_validate_returns_the_typed_value_or_names_the_key() -> None:
    assert LENGTH.validate(5) == 5
    for bad in (-1, "5", True, None):
        with pytest.raises(InvalidTunableError, match="test/max_length"):
            LENGTH.validate(bad)


def test_the_set_option_is_named_after_the_key_and_reads_yaml() -> None:
    parser = argparse.ArgumentParser()
    LENGTH.add_arguments(parser)
    assert LENGTH.option == "--max-length"
    assert LENGTH.value_from_args(parser.parse_args(["--max-length", "512"])) == 512
    assert LENGTH.value_from_args(parser.parse_args([])) is None
    with pytest.raises(InvalidTunableError, match=">= 0"):
        LENGTH.value_from_args(parser.parse_args(["--max-length", "-3"]))


def test_declarations_are_hashed_by_identity() -> None:
    twin: Tunable[int] = Tunable(LENGTH.key, LENGTH.type, LENGTH.default, LENGTH.doc)
    assert len({LENGTH, twin}) == 2


def test_the_disagg_thresholds_are_the_worker_config_keys_they_override() -> None:
    assert DISAGG_TUNABLES.tunables == (MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE)
    fields = VllmWorkerConfig.model_fields
    for tunable in DISAGG_TUNABLES.tunables:
        name = tunable.key.removeprefix("disagg/")
        assert (fields[name].default, fields[name].description) == (tunable.default, tunable.doc)
        assert tunable.validate(tunable.default) == tunable.default
        with pytest.raises(InvalidTunableError):
            tunable.validate(-1)
