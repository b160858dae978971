"""Incremental detokenization and stop handling inside a committed block.

Owns: `OutputProcessor.append(request, tokens)`. ISD can commit several tokens at once, so EOS,
stop token ids, stop strings and `max_tokens` are applied token by token inside the block and
everything after the stop point is dropped: nothing past a stop is ever returned. Text is produced
with `tokenizers`' `DecodeStream` (incremental, UTF-8 safe); while a stop string could still be
forming at the end of the text, that tail is held back from the streamed delta.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from workers.request import Request


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        # The fast tokenizer's Rust object drives DecodeStream.
        self._rust_tok = getattr(tokenizer, "_tokenizer", None) if tokenizer is not None else None
        self.eos_token_ids = set(eos_token_ids)

    def _decode_piece(self, req: Request, token: int) -> str:
        if self._rust_tok is None:
            return ""
        if req.detok_state is None:
            req.detok_state = DecodeStream(skip_special_tokens=True)
        piece = req.detok_state.step(self._rust_tok, token)
        return piece or ""

    def append(self, req: Request, tokens: list[int]) -> list[int]:
        """Appends committed tokens to `req` up to the first stop; returns the tokens kept and
        marks the request finished (finish_reason / stop_reason) when a stop applies."""
        p = req.params
        kept: list[int] = []
        for tok in tokens:
            req.output_token_ids.append(tok)
            kept.append(tok)
            if not p.ignore_eos and tok in self.eos_token_ids:
                req.finish_reason, req.stop_reason = "stop", tok
                break
            if tok in p.stop_token_ids:
                req.finish_reason, req.stop_reason = "stop", tok
                break
            before = len(req.text)
            req.text += self._decode_piece(req, tok)
            # Stop strings count only from `min_tokens` on (vLLM); EOS / stop ids are banned before.
            if p.stop and req.num_output_tokens >= p.min_tokens and self._check_stop_strings(req, before):
                break
            if req.remaining_tokens <= 0:
                req.finish_reason = "length"
                break
        return kept

    def _check_stop_strings(self, req: Request, before: int) -> bool:
        longest = max(len(s) for s in req.params.stop)
        start = max(0, before - longest + 1)
        best: tuple[int, str] | None = None
        for s in req.params.stop:
            i = req.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        req.text = req.text[: i + len(s)] if req.params.include_stop_str_in_output else req.text[:i]
        req.finish_reason, req.stop_reason = "stop", s
        return True

    def text_delta(self, req: Request, finished: bool) -> str:
        """New text since the last delta, holding back a tail that could start a stop string."""
        end = len(req.text)
        if not finished and req.params.stop:
            hold = max(len(s) for s in req.params.stop) - 1
            end = max(req.text_sent, end - hold)
        delta = req.text[req.text_sent : end]
        req.text_sent = end
        return delta
