"""API keys of the Frontend: which keys it accepts, and whether a request bears one of them.

The keys come from four places, added together: the Frontend section's `api-keys` (strings,
or mappings that give a key limits of its own) and `api-keys-file`, and the environment's
TANDEM_API_KEYS (comma-separated) and TANDEM_API_KEYS_FILE (one key a line), for secrets
that do not belong in the config file every node reads. No key anywhere: the Frontend is
open, as it was before keys existed. docs/security.md is the operator's side of this.

Once loaded, only each key's SHA-256 is kept: requests are checked against the digests,
and logs and metrics name a key by the first 8 hex digits of it (`key_id`), so nothing
after start-up holds a key that a log line or a scrape could show.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator

from app import env
from app.errors import UnauthorizedError

# The paths a request without a key may still reach: the probes of load balancers and
# orchestrators, which hold no key. Everything else needs one, routes added later included.
OPEN_PATHS = frozenset({"/health", "/live"})
METRICS_PATH = "/metrics"

# OpenAI's words for the two refusals; neither says anything of the keys that exist.
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."


class ApiKeyError(ValueError):
    """API keys that cannot be used; the message names where they came from, never a key."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class KeyLimits(BaseModel):
    """The limits of one key's generation requests; None: no limit of that kind."""

    # Nested mappings are not spelled by app/sdk/config.py: kebab-case (as every section
    # key) and snake_case are accepted here too.
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, validate_by_name=True, validate_by_alias=True)

    max_inflight: int | None = Field(
        default=None, ge=1, description="past this many of the key's requests in flight, answer 429 with Retry-After"
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="past this many of the key's requests in any 60 s, answer 429 with Retry-After"
    )

    def over(self, defaults: KeyLimits) -> KeyLimits:
        """These limits, each one not set here taken from `defaults` (set to null: no limit)."""
        values = {
            name: getattr(self if name in self.model_fields_set else defaults, name) for name in KeyLimits.model_fields
        }
        return KeyLimits(**values)


def key_problem(key: str) -> str | None:
    """What makes `key` unusable as a bearer token (None: nothing). Never quotes the key."""
    if not key:
        return "is empty"
    # What an Authorization header carries unchanged through clients and proxies.
    if not all("!" <= char <= "~" for char in key):
        return "holds a space or a character outside printable ASCII"
    return None


class ApiKeyEntry(KeyLimits):
    """One `api-keys` item: the key and the limits it sets itself (the others: `api-key-limits`')."""

    # SecretStr: a repr or an error of the config shows `**********`, not the key.
    key: SecretStr

    @field_validator("key")
    @classmethod
    def _usable(cls, value: SecretStr) -> SecretStr:
        problem = key_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(f"the API key {problem}")
        return value


def _entry(value: Any) -> Any:
    # A bare string in `api-keys` is a key without limits of its own.
    if isinstance(value, str):
        return {"key": value}
    if not isinstance(value, Mapping | ApiKeyEntry):
        # YAML reads an unquoted 0123 as the number 83: say so rather than serve another key.
        raise ValueError("an api-keys item is a key (a string: quote one YAML reads as a number) or a mapping")
    return value


ApiKeyItem = Annotated[ApiKeyEntry, BeforeValidator(_entry)]


@dataclass(frozen=True, eq=False)
class ApiKey:
    """An accepted key, by its digest; equal only to itself (each key has its own limiter)."""

    key_id: str
    digest: bytes = field(repr=False)
    limits: KeyLimits


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def api_key(secret: str, limits: KeyLimits | None = None) -> ApiKey:
    digest = _digest(secret.encode())
    return ApiKey(digest.hex()[:8], digest, limits or KeyLimits())


class ApiKeys:
    """The keys a Frontend accepts."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, presented: bytes) -> ApiKey | None:
        """The key `presented` is, or None.

        Digests are compared, not keys: they are all 32 bytes, so the time `compare_digest`
        takes says nothing of a key's length; and every key is compared, with no early exit
        on a match, so the time taken says neither whether nor which key matched.
        """
        digest = _digest(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header (ASGI's lower-cased names), or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class ApiKeyGate:
    """Which requests need a key, and which key a request bears."""

    def __init__(self, keys: ApiKeys, *, metrics_auth: bool = False) -> None:
        self.keys = keys
        self._open = OPEN_PATHS if metrics_auth else OPEN_PATHS | {METRICS_PATH}

    def needs_key(self, path: str) -> bool:
        return path not in self._open

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ApiKey:
        """The key the request bears; UnauthorizedError where it bears none, or one not accepted."""
        token = bearer_token(headers)
        if token is None:
            raise UnauthorizedError(NO_KEY)
        key = self.keys.match(token)
        if key is None:
            raise UnauthorizedError(WRONG_KEY)
        return key


def _file_keys(path: str | Path, source: str) -> list[str]:
    """The keys of a key file: one a line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyError(f"{source} {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ApiKeyError(f"{source} {path}: not a text file") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = key_problem(line)
        if problem is not None:
            raise ApiKeyError(f"{source} {path}: the key on line {number} {problem}")
        keys.append(line)
    if not keys:
        # An emptied secret must not silently open the API.
        raise ApiKeyError(f"{source} {path} holds no key (remove the setting to serve without keys)")
    return keys


def _env_keys(raw: str) -> list[str]:
    keys = []
    for number, part in enumerate(raw.split(","), 1):
        problem = key_problem(part.strip())
        if problem is not None:
            raise ApiKeyError(f"{env.TANDEM_API_KEYS.name}: key {number} {problem}")
        keys.append(part.strip())
    return keys


def load_api_keys(
    entries: Iterable[ApiKeyEntry] | None,
    key_file: str | Path | None,
    defaults: KeyLimits,
    environ: Mapping[str, str] | None = None,
) -> ApiKeys | None:
    """The keys of every source (None: no source names one, the API is open); ApiKeyError
    for a source that cannot be used or a key given twice.

    `entries` and `key_file` are the section's `api-keys` and `api-keys-file`; `defaults`
    its `api-key-limits`, the limits of every key that does not set its own.
    """
    found: list[tuple[str, str, KeyLimits]] = []  # (source, key, limits)
    for entry in entries or ():
        found.append(("api-keys", entry.key.get_secret_value(), entry.over(defaults)))
    if key_file is not None:
        found += [("api-keys-file", key, defaults) for key in _file_keys(key_file, "api-keys-file")]
    listed = env.TANDEM_API_KEYS.get(environ)
    if listed is not None:
        found += [(env.TANDEM_API_KEYS.name, key, defaults) for key in _env_keys(listed)]
    listed_file = env.TANDEM_API_KEYS_FILE.get(environ)
    if listed_file is not None:
        source = env.TANDEM_API_KEYS_FILE.name
        found += [(source, key, defaults) for key in _file_keys(listed_file, source)]
    if not found:
        if defaults.model_fields_set:
            raise ApiKeyError("api-key-limits: no API key is configured for it to limit")
        return None
    keys: list[ApiKey] = []
    sources: dict[bytes, str] = {}
    for source, secret, limits in found:
        key = api_key(secret, limits)
        if key.digest in sources:
            # Which limits would hold is anyone's guess: refuse rather than pick one.
            raise ApiKeyError(
                f"the API key {key.key_id} (SHA-256 prefix) is given twice: {sources[key.digest]}, {source}"
            )
        sources[key.digest] = source
        keys.append(key)
    return ApiKeys(keys)
