"""API keys (app/openai/auth.py): where they come from, how a request's is checked, what a
request without one gets, and that no key shows in logs or metrics."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.components.frontend import Frontend, FrontendConfig
from app.openai import FrontendMetrics, auth, create_app
from app.openai.auth import ApiKeyError, ApiKeys, KeyLimits, api_key, bearer_token, load_api_keys
from app.sdk.config import ConfigError, GraphConfig
from tests.unit.openai.scripted_backend import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
KEY_A = "sk-alpha-0123456789"
KEY_B = "sk-bravo-9876543210"


def _frontend(section: dict[str, Any]) -> FrontendConfig:
    return GraphConfig(None, {"Frontend": section}).section_config("Frontend", FrontendConfig)


def _load(section: dict[str, Any], environ: dict[str, str] | None = None) -> ApiKeys | None:
    config = _frontend(section)
    return load_api_keys(config.api_keys, config.api_keys_file, config.api_key_limits, environ or {})


def _id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _limits(keys: ApiKeys | None) -> dict[str, tuple[int | None, int | None]]:
    assert keys is not None
    return {key.key_id: (key.limits.max_inflight, key.limits.requests_per_minute) for key in keys}


# --- where keys come from -------------------------------------------------------------------


def test_no_key_anywhere_means_open() -> None:
    assert _load({}) is None
    assert _load({}, {"TANDEM_API_KEYS": "  "}) is None  # empty is unset, as every variable of the registry


def test_config_list_of_strings_and_mappings_each_with_its_own_limits_else_the_sections() -> None:
    keys = _load(
        {
            "api-keys": [
                KEY_A,
                {"key": KEY_B, "max-inflight": 2, "requests-per-minute": 30},
                {"key": "sk-c", "requests_per_minute": 5},  # snake_case too
                {"key": "sk-d", "max-inflight": None},  # null: no limit, whatever the defaults
            ],
            "api-key-limits": {"max-inflight": 8},
        }
    )
    assert _limits(keys) == {
        _id(KEY_A): (8, None),
        _id(KEY_B): (2, 30),
        _id("sk-c"): (8, 5),
        _id("sk-d"): (None, None),
    }


def test_env_list_and_files_add_to_the_config(tmp_path: Path) -> None:
    section_file = tmp_path / "section-keys"
    section_file.write_text("# rotated 2026-12-01\n\nsk-file-1\n  sk-file-2  \n")
    env_file = tmp_path / "env-keys"
    env_file.write_text("sk-env-file\n")
    keys = _load(
        {"api-keys": [KEY_A], "api-keys-file": str(section_file), "api-key-limits": {"requests-per-minute": 60}},
        {"TANDEM_API_KEYS": f" {KEY_B} , sk-env-2", "TANDEM_API_KEYS_FILE": str(env_file)},
    )
    expected = [KEY_A, "sk-file-1", "sk-file-2", KEY_B, "sk-env-2", "sk-env-file"]
    assert _limits(keys) == {_id(key): (None, 60) for key in expected}
    assert keys is not None
    for key in expected:
        assert keys.match(key.encode()) is not None


@pytest.mark.parametrize(
    ("section", "environ", "message"),
    [
        ({}, {"TANDEM_API_KEYS": "sk-a,,sk-b"}, "TANDEM_API_KEYS: key 2 is empty"),
        ({}, {"TANDEM_API_KEYS": "sk-a,"}, "TANDEM_API_KEYS: key 2 is empty"),
        ({}, {"TANDEM_API_KEYS": "sk-a,sk b"}, "TANDEM_API_KEYS: key 2 holds a space"),
        ({}, {"TANDEM_API_KEYS_FILE": "/nonexistent/keys"}, "TANDEM_API_KEYS_FILE /nonexistent/keys: cannot read it"),
        ({"api-keys-file": "/nonexistent/keys"}, {}, "api-keys-file /nonexistent/keys: cannot read it"),
        (
            {"api-keys": [KEY_A]},
            {"TANDEM_API_KEYS": KEY_A},
            f"the API key {_id(KEY_A)} (SHA-256 prefix) is given twice",
        ),
        ({"api-key-limits": {"max-inflight": 2}}, {}, "api-key-limits: no API key is configured"),
    ],
)
def test_bad_sources_are_clear_errors_that_never_quote_a_key(
    section: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ApiKeyError) as raised:
        _load(section, environ)
    assert message in str(raised.value)
    for key in (KEY_A, "sk-a", "sk b"):
        assert key not in str(raised.value)


def test_key_files_without_keys_or_with_bad_lines_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# every key removed\n\n")
    with pytest.raises(ApiKeyError, match="holds no key"):  # never silently open
        _load({}, {"TANDEM_API_KEYS_FILE": str(empty)})
    spaced = tmp_path / "spaced"
    spaced.write_text("sk-ok\nsk-secret with-space\n")
    with pytest.raises(ApiKeyError, match="the key on line 2 holds a space") as raised:
        _load({"api-keys-file": str(spaced)})
    assert "sk-secret" not in str(raised.value)


def test_the_frontend_refuses_to_start_on_an_unusable_source_with_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ConfigError: app/sdk/process.py logs it as one `config:` line and exits 1."""
    frontend = Frontend.__new__(Frontend)
    frontend.config = _frontend({"metrics-auth": True})
    with pytest.raises(ConfigError, match="Frontend: metrics-auth: no API key is configured"):
        frontend._api_keys()
    monkeypatch.setenv("TANDEM_API_KEYS", "sk-a,,sk-b")
    with pytest.raises(ConfigError, match="Frontend: TANDEM_API_KEYS: key 2 is empty"):
        frontend._api_keys()
    monkeypatch.setenv("TANDEM_API_KEYS", "sk-a,sk-b")
    keys = frontend._api_keys()
    assert keys is not None and len(keys) == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "Frontend: key 'api-keys': List should have at least 1 item"),
        (["sk a"], "Frontend: key 'api-keys.0.key': Value error, the API key holds a space"),
        ([""], "Frontend: key 'api-keys.0.key': Value error, the API key is empty"),
        ([{"key": KEY_A, "burst": 2}], "Frontend: key 'api-keys.0.burst': Extra inputs are not permitted"),
        ([{"key": KEY_A, "max-inflight": 0}], "Frontend: key 'api-keys.0.max-inflight': Input should be greater"),
        ([{"max-inflight": 3}], "Frontend: key 'api-keys.0.key': Field required"),
        ([83], "Frontend: key 'api-keys.0': Value error, an api-keys item is a key (a string"),
        ("sk-one", "Frontend: key 'api-keys': Input should be a valid list"),
    ],
)
def test_bad_config_forms_name_the_key_at_fault(keys: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _frontend({"api-keys": keys})
    assert message in str(raised.value)


def test_the_config_model_hides_keys_in_its_repr() -> None:
    config = _frontend({"api-keys": [KEY_A, {"key": KEY_B, "max-inflight": 1}]})
    assert KEY_A not in repr(config) and KEY_B not in repr(config)


# --- the check of a request's key -------------------------------------------------------------


def test_match_finds_the_key_and_nothing_else() -> None:
    keys = ApiKeys([api_key(KEY_A), api_key(KEY_B, KeyLimits(max_inflight=1))])
    assert keys.match(KEY_B.encode()).limits.max_inflight == 1  # type: ignore[union-attr]
    assert keys.match(KEY_A.encode()).key_id == _id(KEY_A)  # type: ignore[union-attr]
    for wrong in (b"", KEY_A[:-1].encode(), (KEY_A + "x").encode(), KEY_A.upper().encode()):
        assert keys.match(wrong) is None


def test_match_compares_digests_in_constant_time_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real_compare_digest = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare_digest)
    keys = ApiKeys([api_key(KEY_A), api_key(KEY_B), api_key("sk-c")])
    assert keys.match(KEY_A.encode()) is not None
    # No early exit at the first key's match; every comparison of equal-length digests.
    assert len(compared) == 3
    assert all(len(a) == len(b) == 32 for a, b in compared)
    compared.clear()
    assert keys.match(b"short") is None
    assert len(compared) == 3 and all(len(a) == 32 for a, _ in compared)


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"authorization", b"Bearer sk-1")], b"sk-1"),
        ([(b"authorization", b"bearer   sk-1 ")], b"sk-1"),
        ([(b"authorization", b"Basic c2stMQ==")], None),
        ([(b"authorization", b"Bearer")], None),
        ([(b"authorization", b"sk-1")], None),
        ([(b"x-api-key", b"sk-1")], None),
        ([], None),
    ],
)
def test_bearer_token(headers: list[tuple[bytes, bytes]], token: bytes | None) -> None:
    assert bearer_token(headers) == token


# --- the routes, with keys --------------------------------------------------------------------


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_unauthorized(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    }
    assert response.headers["www-authenticate"] == "Bearer"


async def test_every_route_but_the_probes_needs_a_valid_key(backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = FrontendMetrics()
    app = create_app(backend, metrics=metrics, api_keys=ApiKeys([api_key(KEY_A), api_key(KEY_B)]))
    async with _client(app) as client:
        guarded = [
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
            ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}),
            ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 3}),
            ("GET", "/v1/models", None),
            ("GET", "/v1/responses/resp_1", None),
            ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
            ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
            ("GET", "/v1/nothing", None),  # 401, not 404: without a key nothing says which routes exist
            ("GET", "/version", None),
        ]
        for method, path, body in guarded:
            _assert_unauthorized(await client.request(method, path, json=body), auth.NO_KEY)
            for wrong in (_bearer("sk-wrong"), _bearer(KEY_A + "x"), {"Authorization": f"Basic {KEY_A}"}):
                response = await client.request(method, path, json=body, headers=wrong)
                _assert_unauthorized(response, auth.NO_KEY if "Basic" in wrong["Authorization"] else auth.WRONG_KEY)
        assert backend.generate_calls == 0
        for key in (KEY_A, KEY_B):
            for method, path, body in guarded[:8]:
                response = await client.request(method, path, json=body, headers=_bearer(key))
                expected = 404 if path == "/v1/responses/resp_1" else 200  # no response is stored
                assert response.status_code == expected, (path, response.text)
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/live")).status_code == 200
        scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    assert 'tandem_frontend_errors_total{kind="invalid_api_key"} 40.0' in scraped.text
    assert f'tandem_frontend_api_key_requests_total{{key="{_id(KEY_A)}"}} 4.0' in scraped.text
    for key in (KEY_A, KEY_B):
        assert key not in scraped.text
        assert key not in caplog.text


async def test_metrics_auth_guards_metrics_too(backend) -> None:
    app = create_app(backend, api_keys=ApiKeys([api_key(KEY_A)]), metrics_auth=True)
    async with _client(app) as client:
        _assert_unauthorized(await client.get("/metrics"), auth.NO_KEY)
        assert (await client.get("/metrics", headers=_bearer(KEY_A))).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_without_keys_every_route_is_open(backend) -> None:
    async with _client(create_app(backend)) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await client.get("/v1/models", headers=_bearer("anything"))).status_code == 200
