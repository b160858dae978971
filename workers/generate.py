"""Command line: generate with the engine and print the text, TPF and acceptance.

    python -m workers.generate --model smollm2 --mode isd --stride 4 "What is the capital of France?"

Owns: argument parsing and the report printed after generation. Prompts are chat-templated
unless --raw is given.
"""

from __future__ import annotations

import argparse
import sys
import time

from workers.config import MAX_STRIDE, MODES
from workers.sampling_params import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="+", help="one or more prompts")
    ap.add_argument("--model", default="smollm2", help="alias (smollm2), HF directory or .gguf file")
    ap.add_argument("--mode", default="isd", choices=MODES)
    ap.add_argument("--stride", type=int, default=4, help=f"ISD stride N (1..{MAX_STRIDE})")
    ap.add_argument("--adapter", default=None, help="gated LoRA adapter directory (risd)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from workers.llm import LLM

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
        )
        llm = LLM(args.model, mode=args.mode, stride=args.stride, adapter=args.adapter, dtype=args.dtype, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompts if args.raw else [llm.encode_chat([{"role": "user", "content": p}]) for p in args.prompts]
    t = time.monotonic()
    outs = llm.generate(prompts, params)
    dt = time.monotonic() - t
    for prompt, out in zip(args.prompts, outs):
        m = out.metrics
        print(f"### {prompt}\n{out.text}\n")
        print(
            f"[{len(out.token_ids)} tokens, {m.num_forwards} forwards, TPF {m.tokens_per_forward:.2f}, "
            f"acceptance {m.acceptance_rate:.2f}, finish {out.finish_reason}]\n"
        )
    st = llm.stats()
    print(
        f"mode={args.mode} stride={llm.config.stride} total: {st.generation_tokens} tokens in {dt:.2f}s, "
        f"TPF {st.tokens_per_forward:.2f}, acceptance {st.acceptance_rate:.2f}, rounds {st.rounds}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
