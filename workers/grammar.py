"""Grammar backend of a replica: xgrammar compilation (bounded cache, in the background) and one
matcher per request (DESIGN §1, per-row processing; reference api-under-isd §2, §6).

Owns: `GrammarBackend` (one `TokenizerInfo` over every lm_head row with the engine's stop set, one
cache-limited `GrammarCompiler`, a thread pool that compiles while the request waits and prefills)
and `RequestGrammar` (the matcher of one request and the invariant: its state always equals the
request's emitted output).

Requests are checked when they arrive (`check`: the constraint is parsed into an xgrammar `Grammar`,
which is cheap and catches bad schemas, regexes and EBNF, so they are a 400 naming the field); the
tokenizer-dependent compilation (the costly part) runs in the pool; `compile_timeout_s` fails only
that request.

Vocabulary: the TokenizerInfo spans every lm_head row, so padded ids are never allowed; the MASK id
(a special or reserved token, never text) is cleared from every mask by `workers.grammar_masks`.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor

from workers.structured_params import FIELD, StructuredOutputs

# json_schema output: compact separators and no free whitespace runs (any_whitespace lets a model
# loop on whitespace forever and is never needed for a valid document).
_JSON_OPTS = dict(any_whitespace=False)


# xgrammar 0.2.9 turns a length-bounded string into `[^"\\\r\n]{min,max}`, which lets control
# characters through (invalid JSON). Such strings are rewritten into the equivalent pattern over
# characters JSON allows unescaped (escapes are then not used inside them; the length is exact).
_JSON_CHAR = '[^"\\\\\\x00-\\x1f]'


def _bounded_strings(s):
    if isinstance(s, list):
        return [_bounded_strings(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: _bounded_strings(v) for k, v in s.items()}
    if ("minLength" in out or "maxLength" in out) and "pattern" not in out and out.get("type", "string") == "string":
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_JSON_CHAR}{{{lo},{hi}}}$"
    return out


def schema_text(schema) -> str:
    """The JSON Schema as given to xgrammar (with the bounded-string rewrite above)."""
    return json.dumps(_bounded_strings(schema))


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class RequestGrammar:
    """The matcher of one request. `accept` advances it with emitted tokens; `fill_chain` writes
    the masks of a chain of rows (state, state + d_0, ...) and leaves the state as it found it."""

    def __init__(self, matcher, spec_key: str, never: frozenset[int] = frozenset()) -> None:
        self.matcher = matcher
        self.key = spec_key
        self.never = never
        """Special, padded and MASK ids: refused here, never fed to the matcher."""
        self.num_accepted = 0
        """Output tokens the matcher has consumed (== len(output) between steps)."""

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def accept(self, tokens: list[int]) -> int:
        """Accepts tokens in order, stopping at the first refused one or at termination; returns
        how many were accepted (the caller decides whether that is a bug or a rollback point)."""
        n = 0
        m = self.matcher
        for t in tokens:
            if t in self.never or m.is_terminated() or not m.accept_token(int(t)):
                break
            n += 1
        return n

    def rollback(self, n: int) -> None:
        if n:
            self.matcher.rollback(n)

    def fill_chain(self, bitmask, first_row: int, drafts: list[int]) -> int:
        """Fills rows first_row + j (j = 0..len(drafts)) with the mask after `drafts[:j]`, stopping
        early at a refused draft or at termination; returns how many rows were filled (>= 1 unless
        the matcher is terminated: then 0). Unfilled rows are left as they are (the caller's
        harmless all-ones); the matcher state is restored."""
        m = self.matcher
        filled = accepted = 0
        for j in range(len(drafts) + 1):
            if m.is_terminated():
                break
            m.fill_next_token_bitmask(bitmask, first_row + j)
            filled += 1
            if j == len(drafts) or drafts[j] in self.never or not m.accept_token(int(drafts[j])):
                break
            accepted += 1
        self.rollback(accepted)
        return filled


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], *, token_strings: list[str] | None = None,
                 max_threads: int = 2, cache_limit_bytes: int = 256 << 20, compile_timeout_s: float = 30.0) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        if token_strings is not None:
            info = xgr.TokenizerInfo(token_strings, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        elif tokenizer is not None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        else:
            raise ValueError(f"{FIELD}: the served model has no tokenizer, so grammars cannot be compiled")
        self.info = info
        self.special = frozenset(info.special_token_ids)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=True,
                                            cache_limit_bytes=cache_limit_bytes)
        self.compile_timeout_s = compile_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idlm-grammar")

    # -- request admission -------------------------------------------------------------------
    def check(self, spec: StructuredOutputs) -> None:
        """Parses the constraint (no tokenizer work); ValueError naming the field when invalid."""
        g = self.xgr.Grammar
        where = f"{FIELD}.{spec.kind}"
        try:
            if spec.kind == "json":
                g.from_json_schema(schema_text(spec.json), strict_mode=spec.strict, **_JSON_OPTS)
            elif spec.kind == "regex":
                g.from_regex(spec.regex)
            elif spec.kind == "grammar":
                g.from_ebnf(spec.grammar)
            elif spec.kind == "choice":
                g.from_ebnf(_choice_ebnf(spec.choice))
        except (RuntimeError, ValueError) as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            # xgrammar prefixes "[time] /path/file.cc:line: "; keep what it says
            msg = msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg
            raise ValueError(f"{where}: invalid {spec.kind}: {msg}") from None

    def _compile(self, spec: StructuredOutputs):
        c = self.compiler
        if spec.kind == "json":
            return c.compile_json_schema(schema_text(spec.json), strict_mode=spec.strict, **_JSON_OPTS)
        if spec.kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}), strict_mode=False, **_JSON_OPTS)
        if spec.kind == "regex":
            return c.compile_regex(spec.regex)
        if spec.kind == "choice":
            return c.compile_grammar(_choice_ebnf(spec.choice))
        return c.compile_grammar(spec.grammar)

    def compile_async(self, spec: StructuredOutputs) -> PendingGrammar:
        return PendingGrammar(self.pool.submit(self._compile, spec), spec.key(),
                              time.monotonic() + self.compile_timeout_s)

    def matcher(self, compiled, stop_token_ids: list[int], key: str, never: frozenset[int] = frozenset()) -> RequestGrammar:
        """A fresh matcher whose stop set is the request's (EOS unless ignore_eos, stop_token_ids):
        the engine's and the matcher's stop sets agree, so termination happens at the same token."""
        never = self.special | never
        return RequestGrammar(self.xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids)), key, never)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class PendingGrammar:
    """A compilation in flight for one request."""

    def __init__(self, future: Future, key: str, deadline: float) -> None:
        self.future, self.key, self.deadline = future, key, deadline

    def poll(self, now: float):
        """The compiled grammar when done, None while running; raises ValueError on failure or
        past the deadline."""
        if self.future.done():
            try:
                return self.future.result()
            except Exception as e:  # noqa: BLE001 (a compile error fails this request only)
                raise ValueError(f"{FIELD}: grammar compilation failed: {e}") from None
        if now > self.deadline:
            self.future.cancel()
            raise ValueError(f"{FIELD}: grammar compilation timed out")
        return None


def stop_set(params, eos_token_ids: list[int]) -> list[int]:
    """The engine's stop tokens for a request (`workers.detokenizer` stops at exactly these)."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(eos_token_ids)
    return sorted(ids)


class GrammarManager:
    """The engine's side: checks constraints on arrival, starts their compilation, and hands each
    request its matcher when it is compiled (the backend is built on the first constrained request:
    a TokenizerInfo over a large vocabulary takes a moment)."""

    def __init__(self, make_backend, eos_token_ids: list[int], mask_token_id: int | None = None) -> None:
        self._make = make_backend
        self.never = frozenset() if mask_token_id is None else frozenset([mask_token_id])
        self.backend: GrammarBackend | None = None
        self.eos = list(eos_token_ids)
        self.pending: dict[str, object] = {}  # request id -> Request still compiling

    def _get(self) -> GrammarBackend:
        if self.backend is None:
            self.backend = self._make()
        return self.backend

    def validate(self, params) -> None:
        spec = params.structured_outputs
        if spec is None:
            return
        if not stop_set(params, self.eos):
            raise ValueError(f"{FIELD}: a constrained request needs a stop token (ignore_eos without "
                             "stop_token_ids would leave a finished grammar nothing to emit)")
        self._get().check(spec)

    def admit(self, req) -> None:
        spec = req.params.structured_outputs
        if spec is not None:
            req.grammar_pending = self._get().compile_async(spec)
            self.pending[req.request_id] = req

    def poll(self, now: float) -> list[tuple[object, str]]:
        """Gives compiled requests their matcher; returns (request, error) of the failed ones."""
        failed = []
        for rid, req in list(self.pending.items()):
            try:
                compiled = req.grammar_pending.poll(now)
            except ValueError as e:
                failed.append((req, str(e)))
                del self.pending[rid]
                continue
            if compiled is not None:
                req.grammar = self.backend.matcher(compiled, stop_set(req.params, self.eos), req.grammar_pending.key,
                                                   self.never)
                req.grammar.accept(req.output_token_ids)  # nothing yet, unless resumed
                req.grammar_pending = None
                del self.pending[rid]
        return failed

    def wait(self, timeout: float) -> None:
        """Blocks until one compilation finishes or `timeout` passes (an otherwise idle step)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        futs = [r.grammar_pending.future for r in self.pending.values()]
        if futs:
            wait(futs, timeout=timeout, return_when=FIRST_COMPLETED)

    def forget(self, request_id: str) -> None:
        req = self.pending.pop(request_id, None)
        if req is not None:
            req.grammar_pending.future.cancel()
