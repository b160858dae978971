"""Grammar masks of one step: the verify rows of every constrained request in one bitmask buffer,
applied with one kernel call, and the MASK-row (draft) masks position by position.

Owns: `verify_masks` / `apply_masks` and `DraftMasker`. Why it is exact (reference api-under-isd §3):
- verify row j of a request is masked by its matcher after `output + d_<j` (fill, accept d_j, ...,
  roll back). A draft the grammar refuses gets target probability 0, so verification rejects it
  and the residual never returns it; the rows after it cannot be reached and keep the buffer's
  harmless all-ones (never zeros: no applied row is ever all masked). Nothing is filled after the
  matcher terminates.
- MASK row i of a request (the next round's draft i) is masked by the matcher after
  `output + this round's tokens + d'_<i` and the draft is drawn from that masked row; the masked
  row is what is stored as q. Next round, verify row i has exactly that state, so the target and
  q are masked alike and q is exactly the distribution the draft was drawn from.
- the MASK id is cleared from every applied row: it is never emitted, nor drafted.
Masks are applied to the raw logits before any processor, temperature, top-k or top-p (one order
for AR and every ISD row).
"""

from __future__ import annotations

import torch

from workers.grammar import RequestGrammar

_ALL = -1  # int32 with every bit set: every token allowed


def _backend(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else "auto"


def clear_token(bitmask: torch.Tensor, rows: list[int], token: int | None) -> None:
    """Disallows `token` in the given rows of an int32 bitmask [R, ceil(V/32)]."""
    if token is None or not rows:
        return
    word, bit = divmod(token, 32)
    clear = ~(1 << bit) & 0xFFFFFFFF  # the int32 word with only that bit off, as a signed value
    if clear >= 1 << 31:
        clear -= 1 << 32
    idx = torch.tensor(rows, dtype=torch.long)
    bitmask[idx, word] &= clear


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), _ALL, dtype=torch.int32)


def verify_masks(chains: list[tuple[RequestGrammar, int, list[int]]], num_rows: int, vocab_size: int,
                 mask_token_id: int | None) -> tuple[torch.Tensor, list[int]]:
    """`chains`: (grammar, first verify row, the drafts it verifies). Returns the bitmask
    [num_rows, ceil(V/32)] int32 (rows of unconstrained requests all ones) and the filled rows."""
    bm = new_bitmask(num_rows, vocab_size)
    rows: list[int] = []
    for g, first, drafts in chains:
        n = g.fill_chain(bm, first, drafts)
        rows += range(first, first + n)
    clear_token(bm, rows, mask_token_id)
    return bm, rows


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Sets the disallowed logits of `rows` to -inf, in place: one kernel call (xgrammar's CPU
    kernel on CPU, its CUDA/Triton one on a GPU)."""
    if not rows:
        return
    import xgrammar as xgr

    if bool((bitmask[rows] == 0).all(-1).any()):  # an empty allowed set would turn into NaN
        raise RuntimeError("grammar mask: a row allows no token (engine bug: stop sets disagree?)")
    bm = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bm, vocab_size=logits.shape[1], indices=rows,
                                    backend=_backend(logits.device))


class DraftMasker:
    """Masks of the MASK rows of the requests proposing drafts this step, position by position.

    `begin` advances each matcher by the round's committed tokens (temporarily), `fill(i, ...)`
    writes the mask of draft position i, `advance(i, drafts)` accepts the drawn drafts, `end`
    rolls every temporary accept back: the matcher again equals the emitted output."""

    def __init__(self, entries: list[tuple[RequestGrammar, int, list[int], int]], vocab_size: int,
                 mask_token_id: int | None) -> None:
        """`entries`: (grammar, first MASK row in the draft logits, this round's tokens, masks)."""
        self.vocab_size, self.mask_token_id = vocab_size, mask_token_id
        self.live: list[tuple[RequestGrammar, int, int]] = []  # (grammar, first row, masks)
        self.accepted: list[int] = []
        for g, first, tokens, m in entries:
            n = g.accept(tokens)
            if n == len(tokens) and not g.terminated:
                self.live.append((g, first, m))
                self.accepted.append(n)
            else:  # the round ends the output (a stop token): its drafts are never verified
                g.rollback(n)

    def __bool__(self) -> bool:
        return bool(self.live)

    def fill(self, i: int, num_rows: int) -> tuple[torch.Tensor, list[int]]:
        bm = new_bitmask(num_rows, self.vocab_size)
        rows = []
        for k, (g, first, m) in enumerate(self.live):
            if i < m and self.accepted[k] >= 0 and not g.terminated:
                g.matcher.fill_next_token_bitmask(bm, first + i)
                rows.append(first + i)
        clear_token(bm, rows, self.mask_token_id)
        return bm, rows

    def advance(self, i: int, drafts: dict[int, int]) -> None:
        """`drafts`: row -> drawn token, for the rows of position i."""
        for k, (g, first, m) in enumerate(self.live):
            if i < m and self.accepted[k] >= 0 and (first + i) in drafts:
                if g.accept([drafts[first + i]]):
                    self.accepted[k] += 1
                else:  # a terminated matcher (stop drafted): later rows stay unmasked
                    g.rollback(self.accepted[k])
                    self.accepted[k] = -1

    def end(self) -> None:
        for k, (g, _, _) in enumerate(self.live):
            if self.accepted[k] > 0:
                g.rollback(self.accepted[k])
        self.live, self.accepted = [], []
