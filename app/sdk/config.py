"""The graph config: one YAML file for every node, one section per service plus `Common`.

A service section holds the service's own keys (kebab-case or snake_case), optionally
`common-configs: [keys]` (copied from `Common` unless the section sets them itself) and
`ServiceArgs: {workers, resources: {gpu}}` (how many processes `tandem serve` runs, and
how many GPUs of its own each gets). Worker services take engine arguments too: every key
their model does not define goes to `engine_args`, checked against the engine's own
argument names where the engine runs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.sdk.service import SERVICES, ServiceSpec

COMMON = "Common"
SERVICE_ARGS = "ServiceArgs"
COMMON_CONFIGS = "common_configs"

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """One or more config errors, each naming the service and the key."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu: int = Field(
        default=0,
        ge=0,
        description="GPUs of its own for each process (CUDA_VISIBLE_DEVICES, app/launch/devices.py); "
        "0: the devices its environment gives it",
    )


class ServiceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1, description="processes of this service on this node")
    resources: Resources = Resources()


class EngineConfig(BaseModel):
    """Base of worker configs: Tandem's own fields plus the engine's arguments."""

    model_config = ConfigDict(extra="forbid")

    engine: str = "vllm"
    engine_args: dict[str, Any] = {}
    router: Literal["kv", "round-robin", "random"] | None = Field(
        default=None,
        description="Dynamo's worker key (its configs give workers `router: kv`, which makes Dynamo's worker "
        "publish KV events); Tandem's workers always publish them, so it is only validated, never an engine argument",
    )

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from app.engines import ENGINES

        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; known: {', '.join(sorted(ENGINES))}")
        return value


def snake(key: str) -> str:
    return key.replace("-", "_")


def _find_key(mapping: dict[str, Any], key: str) -> str:
    """The key as spelled in `mapping` that means `key` (kebab and snake are one key)."""
    for existing in mapping:
        if snake(existing) == snake(key):
            return existing
    return key


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--Service.key=value` (or `--Service.ServiceArgs.workers=2`) -> (path, YAML value)."""
    body = arg.removeprefix("--")
    dotted, sep, raw = body.partition("=")
    path = dotted.split(".")
    if not arg.startswith("--") or not sep or len(path) < 2 or not all(path):
        raise ConfigError([f"bad override {arg!r}: expected --Service.key=value"])
    return path, yaml.safe_load(raw)


def is_override(arg: str) -> bool:
    return arg.startswith("--") and "." in arg.partition("=")[0]


@dataclass
class GraphConfig:
    """A parsed config file with command-line overrides applied."""

    path: str | None
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)  # sections as written

    @property
    def common(self) -> dict[str, Any]:
        return self.raw.get(COMMON, {})

    def section(self, service: str) -> tuple[dict[str, Any], dict[str, str]]:
        """A service's own keys, Common's copied in, snake_case; and each key's original spelling."""
        errors: list[str] = []
        values: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        own = {k: v for k, v in self.raw.get(service, {}).items() if k != SERVICE_ARGS}
        common_keys = own.pop(_find_key(own, COMMON_CONFIGS), [])
        if not isinstance(common_keys, list):
            errors.append(f"{service}: common-configs must be a list of Common's keys")
            common_keys = []
        for key in common_keys:
            common_key = _find_key(self.common, str(key))
            if common_key not in self.common:
                errors.append(f"{service}: common-configs names {key!r}, which {COMMON} does not define")
                continue
            values[snake(common_key)] = copy.deepcopy(self.common[common_key])
            spelled[snake(common_key)] = common_key
        own_snake: set[str] = set()
        for key, value in own.items():
            if snake(key) in own_snake:
                errors.append(f"{service}: key {key!r} is given twice (kebab-case and snake_case)")
            own_snake.add(snake(key))
            values[snake(key)] = value
            spelled[snake(key)] = key
        if errors:
            raise ConfigError(errors)
        return values, spelled

    def service_args(self, service: str) -> ServiceArgs:
        raw = self.raw.get(service, {}).get(SERVICE_ARGS) or {}
        try:
            return ServiceArgs.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format(f"{service}.{SERVICE_ARGS}", exc, {})) from None

    def service_config(self, spec: ServiceSpec, check_engine_args: bool = False) -> BaseModel:
        """The validated config model of a service's section.

        `check_engine_args` imports the engine (vLLM: seconds) to check engine argument names:
        only where the engine will run (the worker process, `tandem config check`).
        """
        return self.section_config(spec.name, spec.config_model, check_engine_args)

    def section_config(self, service: str, model: type[M], check_engine_args: bool = False) -> M:
        """The section of `service` validated as `model`: for a service that runs another's
        library with that one's section (a Frontend that embeds the Processor's pipeline)."""
        values, spelled = self.section(service)
        fields = _accepted_keys(model)
        unknown = [k for k in values if k not in fields]
        if issubclass(model, EngineConfig):
            values["engine_args"] = {**values.get("engine_args", {}), **{k: values.pop(k) for k in unknown}}
            if check_engine_args:
                _check_engine_args(service, values, spelled)
        elif unknown:
            raise ConfigError([f"{service}: unknown key {spelled[k]!r}" for k in unknown])
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_format(service, exc, spelled)) from None

    def embedded_services(self, services: Iterable[ServiceSpec]) -> set[str]:
        """Names of services that another of `services` runs inside its own process, as the
        config says (a config model's `embedded_services(config, graph)`, which may read other
        sections than its own): they need no process of their own."""
        specs = list(services)
        graph = {spec.name for spec in specs}
        embedded: set[str] = set()
        for spec in specs:
            config = self.service_config(spec)
            names = getattr(config, "embedded_services", None)
            if names is not None:
                embedded |= names(self, graph)
        return embedded

    def check(self, services: Iterable[ServiceSpec] | None = None, check_engine_args: bool = True) -> list[str]:
        """Every error in the sections of `services` (default: every known service)."""
        errors = [
            f"unknown service {name!r} (known: {', '.join(sorted(SERVICES))})"
            for name in self.raw
            if name != COMMON and name not in SERVICES
        ]
        specs = list(services) if services is not None else [SERVICES[n] for n in self.raw if n in SERVICES]
        for spec in specs:
            try:
                self.service_args(spec.name)
            except ConfigError as exc:
                errors.extend(exc.errors)
            try:
                self.service_config(spec, check_engine_args)
            except ConfigError as exc:
                errors.extend(exc.errors)
        return errors

    def apply_override(self, arg: str) -> None:
        path, value = parse_override(arg)
        node = self.raw.setdefault(path[0], {})
        for key in path[1:-1]:
            key = _find_key(node, key)
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[_find_key(node, path[-1])] = value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> GraphConfig:
    """Parse the YAML file (None: an empty config) and apply `--Service.key=value` overrides."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError([f"cannot read config {path}: {exc.strerror}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of service name to section"])
    bad = [f"{name}: the section must be a mapping" for name, s in raw.items() if not isinstance(s, dict | None)]
    if bad:
        raise ConfigError(bad)
    config = GraphConfig(
        str(Path(path).resolve()) if path is not None else None,
        {str(name): dict(section or {}) for name, section in raw.items()},
    )
    for arg in overrides:
        config.apply_override(arg)
    return config


def _accepted_keys(model: type[BaseModel]) -> set[str]:
    keys = set(model.model_fields)
    for info in model.model_fields.values():
        if isinstance(info.alias, str):
            keys.add(snake(info.alias))
    return keys


def _check_engine_args(service: str, values: dict[str, Any], spelled: dict[str, str]) -> None:
    from app.engines import engine_arg_names

    engine = values.get("engine", EngineConfig.model_fields["engine"].default)
    try:
        names = engine_arg_names(engine)
    except ValueError as exc:
        raise ConfigError([f"{service}: key 'engine': {exc}"]) from None
    except ImportError as exc:
        raise ConfigError([f"{service}: cannot load engine {engine!r} to check its arguments: {exc}"]) from None
    unknown = [k for k in values["engine_args"] if k not in names]
    if unknown:
        raise ConfigError(
            [
                f"{service}: unknown key {spelled.get(k, k)!r} (neither a {service} key nor a {engine} engine argument)"
                for k in unknown
            ]
        )


def _format(service: str, exc: ValidationError, spelled: dict[str, str]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        if loc:
            loc[0] = spelled.get(loc[0], loc[0])
            out.append(f"{service}: key {'.'.join(loc)!r}: {err['msg']}")
        else:
            out.append(f"{service}: {err['msg']}")
    return out
