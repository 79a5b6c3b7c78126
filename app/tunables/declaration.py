"""A live tunable's declaration: key, value type, default and doc, owned by the code that reads it.

Operators change tunables while serving (`tandem <group> set`); they live in etcd under
the namespace's tunables prefix, without a lease, and every reader validates what it
finds against the declaration. Declared today: `router/policy` (app/router/tunables.py),
`disagg/max_local_prefill_length` and `disagg/max_prefill_queue_size`
(app/disagg/tunables.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import yaml

T = TypeVar("T")


class InvalidTunableError(ValueError):
    """A value that does not validate against its tunable's type; the message names the key."""


# eq=False: a declaration is one object, hashed by identity (its default may be unhashable).
@dataclass(frozen=True, eq=False)
class Tunable(Generic[T]):
    """One live setting.

    `type` is anything msgspec converts builtins to: a Struct (whose `__post_init__` may
    check more, raising ValueError), or `Annotated[int, msgspec.Meta(ge=0)]`. `default` is
    the value of the service config key the tunable overrides, so both have one source.
    """

    key: str  # under the tunables prefix, `<group>/<name>`
    type: Any
    default: T
    doc: str

    def validate(self, raw: Any) -> T:
        """`raw` (builtins, as read from etcd or given on the command line) as a `type`."""
        try:
            return msgspec.convert(raw, self.type)
        except msgspec.ValidationError as exc:
            raise InvalidTunableError(f"{self.key}: {exc}") from None

    # --- `tandem <group> set` -----------------------------------------------------------
    # One option named after the key, its text read as YAML (so `512` is an int). A tunable
    # whose value has parts (the router policy: a name and knobs) overrides both methods.

    @property
    def option(self) -> str:
        return "--" + self.key.rsplit("/", 1)[-1].replace("_", "-")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.option, dest=self._dest, metavar="VALUE", help=self.doc)

    def value_from_args(self, args: argparse.Namespace) -> T | None:
        """The value the command line gives, validated; None where it gives none."""
        text = getattr(args, self._dest)
        return None if text is None else self.validate(yaml.safe_load(text))

    @property
    def _dest(self) -> str:
        return self.key.replace("/", "__")


@dataclass(frozen=True)
class TunableGroup:
    """The tunables one `tandem <command> set|show|reset` edits together."""

    command: str
    help: str
    tunables: tuple[Tunable[Any], ...]
    configured: str  # what applies without a live value, e.g. "each Router's configured policy"
