"""Raw HTTP body -> a JSON object that is safe to hand to the request models.

Owns: `read_json_object`: the size limit (413, from `Content-Length` before reading and from the
bytes read), JSON syntax, nesting depth and Unicode validity (400s). Python's `json` accepts what
the rest of the stack cannot: arbitrarily deep nesting (the decoder, pydantic and the error path
all recurse, so thousands of levels raised `RecursionError` -> 500) and `\\ud800`-style escapes that
decode to lone UTF-16 surrogates (a `str` that cannot be encoded as UTF-8: the tokenizer, the
chat template and even the JSON error response failed on it -> 500). Both are rejected here, once,
with the offending field named, so nothing downstream ever sees them.
"""

from __future__ import annotations

import json

from cluster.openai.errors import APIError

MAX_JSON_DEPTH = 32
"""Deepest nesting accepted (the request models need 4: messages[i].content[j].text)."""


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def check_length_header(value: str | None, limit: int) -> None:
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise APIError(400, f"Content-Length: not an integer: {value[:32]!r}") from None
    if n > limit:
        raise _too_large(limit)


def _valid_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(parts: tuple) -> str:
    return ".".join(str(p) for p in parts) or "body"


def check_tree(data, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Iterative walk (no recursion, so no depth can crash it): every string and key is valid
    Unicode and no value nests deeper than `max_depth`."""
    stack = [(data, (), 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if not _valid_unicode(value):
                name = _path(where)
                raise APIError(400, f"{name}: contains a lone UTF-16 surrogate (not valid Unicode)", name)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= max_depth:
            name = _path(where[:1])
            raise APIError(400, f"{name}: JSON nests deeper than {max_depth} levels", name)
        if isinstance(value, dict):
            for k, v in value.items():
                if not _valid_unicode(k):
                    name = _path(where)
                    raise APIError(400, f"{name}: a key contains a lone UTF-16 surrogate (not valid Unicode)", name)
                stack.append((v, (*where, k), depth + 1))
        else:
            stack.extend((v, (*where, i), depth + 1) for i, v in enumerate(value))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    try:
        data = json.loads(raw, parse_constant=_no_constant)  # NaN / Infinity are not JSON (RFC 8259)
    except RecursionError:
        raise APIError(400, f"body: JSON nests deeper than {max_depth} levels", "body") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError (bytes that are not UTF-8)
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_tree(data, max_depth)
    return data


async def read_json_object(request, limit: int) -> dict:
    """The body of a Starlette `request` as a checked JSON object (413 over `limit` bytes)."""
    check_length_header(request.headers.get("content-length"), limit)
    raw = await request.body()
    if len(raw) > limit:
        raise _too_large(limit)
    return parse_json_object(raw)
