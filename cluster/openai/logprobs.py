"""Logprobs in OpenAI's shapes (api-under-isd.md §4), from the engine's entries.

An engine entry (as it crosses from the replica) is `[logprob, top_ids, top_logprobs]`, the top ones
most likely first; a prompt's first entry is None. Owns: `TokenStrings` (a token id's text and
UTF-8 bytes: byte-level BPE tokens map back to their exact bytes, so a token holding part of a
multi-byte character still reports its bytes), `chat_content` (chat `logprobs.content`: exactly the
requested number of alternatives, sorted descending, the chosen token's value taken from the same
tensor as its entry) and `completion_logprobs` (`tokens`, `token_logprobs`, `top_logprobs` dicts of
up to `logprobs` + 1 entries with the chosen token always present, `text_offset`). -inf becomes
-9999.0 (OpenAI's "very unlikely"; JSON has no infinities). With vLLM's
`return_tokens_as_token_ids` every token string is `token_id:<id>` instead (exact, for tools that
must not re-tokenize).
"""

from __future__ import annotations

NEG_INF = -9999.0


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character byte-level BPE uses per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _lp(x: float) -> float:
    return max(float(x), NEG_INF)


class TokenStrings:
    """Per token id: its text and bytes (cached; the ingress owns one per tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_map = _byte_decoder() if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel" else None
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _compute(self, tid: int) -> tuple[str, bytes]:
        if self.byte_map is not None:
            piece = self.tok.convert_ids_to_tokens(tid)
            if piece is not None and all(c in self.byte_map for c in piece):
                raw = bytes(self.byte_map[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), raw
        text = self.tok.decode([tid])
        return text, text.encode("utf-8")

    def get(self, tid: int) -> tuple[str, bytes]:
        hit = self._cache.get(tid)
        if hit is None:
            hit = self._cache[tid] = self._compute(tid)
        return hit

    def text(self, tid: int) -> str:
        return self.get(tid)[0]

    def namer(self, as_ids: bool):
        """id -> the string a logprobs entry shows: the token's text, or `token_id:<id>`."""
        return (lambda tid: f"token_id:{tid}") if as_ids else self.text


def chat_content(strings: TokenStrings, token_ids: list[int], entries: list, as_ids: bool = False) -> list[dict]:
    name = strings.namer(as_ids)

    def one(tid: int, lp: float) -> dict:
        return {"token": name(tid), "logprob": _lp(lp), "bytes": list(strings.get(tid)[1])}

    out = []
    for tid, (lp, top_ids, top_lps) in zip(token_ids, entries):
        d = one(tid, lp)
        d["top_logprobs"] = [one(i, v) for i, v in zip(top_ids, top_lps)]
        out.append(d)
    return out


def completion_logprobs(strings: TokenStrings, token_ids: list[int], entries: list, offset: int = 0,
                        as_ids: bool = False) -> tuple[dict, int]:
    """The completions `logprobs` object for these tokens, their text offsets starting at `offset`;
    returns it and the offset after the last token."""
    name = strings.namer(as_ids)
    tokens, values, tops, offsets = [], [], [], []
    for tid, e in zip(token_ids, entries):
        text = name(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            values.append(None)
            tops.append(None)
            continue
        lp, top_ids, top_lps = e
        d: dict[str, float] = {}
        for i, v in zip(top_ids, top_lps):  # most likely first: a token text seen twice keeps its best
            d.setdefault(name(i), _lp(v))
        d.setdefault(text, _lp(lp))
        values.append(_lp(lp))
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset
