"""Hypothesis strategies for the JSON bodies an OpenAPI document's schemas describe.

A small generator over the keywords pydantic writes into Tandem's /openapi.json ($ref,
anyOf, oneOf, type, enum, const, bounds, items, properties, required, additionalProperties):
hypothesis-jsonschema, the usual tool, does not run with this project's Hypothesis.
Optional properties come and go, a few at a time, so each example exercises a different
mix of fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

# Optional properties of one object in one example.
MAX_OPTIONAL = 4
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(-1e6, 1e6) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


class SchemaBodies:
    """Strategies for the schemas of one OpenAPI document (`components.schemas`)."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        self._schemas = schemas

    def of(self, name: str, fields: Sequence[str] | None = None) -> st.SearchStrategy[Any]:
        """Bodies of schema `name`; with `fields`, only those of its optional properties."""
        schema = self._schemas[name]
        if fields is not None:
            kept = set(fields) | set(schema.get("required", ()))
            schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k in kept}}
        return self._strategy(schema, depth=0)

    def _strategy(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return st.deferred(lambda: self._strategy(self._schemas[name], depth + 1))
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "anyOf" in schema or "oneOf" in schema:  # oneOf: a discriminated union's
            return st.one_of([self._strategy(branch, depth) for branch in schema.get("anyOf") or schema["oneOf"]])
        kind = schema.get("type")
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
        if kind == "number":
            low = schema.get("minimum", schema.get("exclusiveMinimum", -1e9))
            high = schema.get("maximum", 1e9)
            return st.floats(low, high, exclude_min="exclusiveMinimum" in schema, allow_nan=False)
        if kind == "string":
            return st.text(min_size=schema.get("minLength", 0), max_size=24)
        if kind == "array":
            items = self._strategy(schema.get("items", {}), depth + 1)
            return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
        if kind == "object" or "properties" in schema:
            return self._object(schema, depth)
        return _ANY_JSON  # no type: any JSON value

    def _object(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
        properties = schema.get("properties", {})
        if not properties:
            extra = schema.get("additionalProperties", True)
            values = _ANY_JSON if extra is True else self._strategy(extra, depth + 1)
            return st.dictionaries(st.text(max_size=8), values, max_size=3)
        required = [k for k in properties if k in set(schema.get("required", ()))]
        # A few optional properties at a time: one refused field would hide what the
        # others do. Deep in a recursive schema, only what is required: examples stay finite.
        optional = [] if depth > 3 else [k for k in properties if k not in required]
        chosen = st.lists(st.sampled_from(optional), max_size=MAX_OPTIONAL, unique=True) if optional else st.just([])
        return chosen.flatmap(
            lambda keys: st.fixed_dictionaries(
                {k: self._strategy(properties[k], depth + 1) for k in [*required, *keys]}
            )
        )
