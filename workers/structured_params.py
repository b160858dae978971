"""What a structured-output request asks for, validated without the grammar library (torch-free:
the ingress imports it).

Owns: `StructuredOutputs` (vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`,
`grammar` (EBNF) or `json_object`), the canonical cache key of a constraint, and the JSON Schema
keyword check. xgrammar silently ignores JSON Schema keywords it does not implement (`oneOf`
exclusivity, `uniqueItems`, `propertyNames`, unknown formats, a `pattern` with length bounds, ...),
so a schema using one would be answered with output that may not validate: those are refused with
a `ValueError` naming the keyword and where it sits (the HTTP layer turns it into a 400). The grammar
itself (syntax of the regex / EBNF, schema types) is checked by the replica's grammar backend
(`workers.grammar`), also before the request is accepted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

FIELD = "structured_outputs"
KINDS = ("json", "regex", "choice", "grammar", "json_object")

# Keywords xgrammar 0.2.x turns into grammar rules (checked against its converter) and annotations
# that do not constrain output.
_SUPPORTED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "format",
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "nullable"}
_FORMATS = {"email", "date", "time", "date-time", "uuid", "uri", "ipv4", "ipv6", "hostname", "duration"}
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: subschema}


def _check_schema(s, path: str, where: str) -> None:
    if isinstance(s, bool):
        return
    if not isinstance(s, dict):
        raise ValueError(f"{where}: a JSON Schema must be an object or a boolean, got {type(s).__name__} at {path}")
    for key, v in s.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _SUPPORTED:
            hint = " (use anyOf)" if key == "oneOf" else ""
            raise ValueError(f"{where}: unsupported JSON Schema keyword {key!r} at {path}{hint}")
        if key == "format" and v not in _FORMATS:
            raise ValueError(f"{where}: unsupported string format {v!r} at {path} (supported: {sorted(_FORMATS)})")
        if key in _SCHEMA_MAPS:
            if not isinstance(v, dict):
                raise ValueError(f"{where}: {key} must be an object at {path}")
            for name, sub in v.items():
                _check_schema(sub, f"{path}/{key}/{name}", where)
        elif key in ("items", "additionalProperties") and not isinstance(v, bool):
            _check_schema(v, f"{path}/{key}", where)
        elif key in ("anyOf", "prefixItems"):
            if not isinstance(v, list) or not v:
                raise ValueError(f"{where}: {key} must be a non-empty list at {path}")
            for i, sub in enumerate(v):
                _check_schema(sub, f"{path}/{key}/{i}", where)
    if "pattern" in s and ("minLength" in s or "maxLength" in s):
        raise ValueError(f"{where}: 'pattern' together with minLength/maxLength is not supported at {path} "
                         "(put the length into the pattern)")


def check_json_schema(schema: dict | bool, where: str = f"{FIELD}.json") -> None:
    """Raises ValueError (starting with `where`) when the schema uses a keyword the grammar
    backend would not enforce."""
    _check_schema(schema, "#", where)


@dataclass
class StructuredOutputs:
    """One output constraint. `json` is a JSON Schema (dict, or its JSON text); `strict` forbids
    object properties the schema does not list (OpenAI `json_schema.strict`)."""

    json: dict | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """EBNF (GBNF-style, with a `root` rule)."""
    json_object: bool = False
    """Any JSON object (OpenAI `response_format={"type": "json_object"}`)."""
    strict: bool = False

    def __post_init__(self) -> None:
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"{FIELD}: exactly one of {', '.join(KINDS)} must be given, got "
                             f"{set_ or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"{FIELD}.json: not valid JSON: {e}") from None
        if self.json is not None:
            check_json_schema(self.json)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{FIELD}.{name}: must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError(f"{FIELD}.choice: must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool) or not isinstance(self.strict, bool):
            raise ValueError(f"{FIELD}: json_object and strict must be booleans")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """Canonical text of the constraint (compile-cache key; equal constraints, equal keys)."""
        return json.dumps({"kind": self.kind, "spec": getattr(self, self.kind), "strict": self.strict},
                          sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, v) -> StructuredOutputs | None:
        """None, an instance, or its dict form (what crosses process boundaries)."""
        if v is None or isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"{FIELD}: must be an object with one of {', '.join(KINDS)}")
        unknown = set(v) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{FIELD}: unsupported field(s) {sorted(unknown)} (supported: {', '.join(KINDS)}, strict)")
        return cls(**v)
