"""Disaggregation across several GPUs: every prefill/decode layout that fits on this machine's
GPUs, greedy output against transformers, then a fault run (a decode group killed mid-stream).

For each layout (prefill tp x pp -> decode tp x pp) whose ranks fit on the visible GPUs (one
GPU per rank, so KV moves over NCCL between devices), a `DisaggEngine` with its rank
processes generates greedily for a fixed set of prompts; the tokens must equal transformers
`generate()` on the same weights (float32, the oracle run on cuda:0). The model is the real
SmolLM2-135M-Instruct when ``--model`` names its converted folder, else its shape with
seeded random weights (the GPU machine has no `gguf` to convert the shipped file).

The fault run (needs 1 + 2 groups' ranks): one prefill group and two decode groups; once
every request has streamed a token, one rank process of the first decode group is killed;
every request must still finish token-exact (migrated to the other decode group), and
afterwards every remaining group's KV blocks must be free again and no transfer open.

Usage (GPU machine, NVLink multicast off):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/multi_gpu_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from results_meta import report_header  # noqa: E402

#: (prefill tp, pp), (decode tp, pp): the pairings issue 9 asks for, smallest first.
LAYOUTS = [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (1, 1)), ((1, 1), (1, 2)),
           ((2, 1), (2, 1))]
MAX_TOKENS = 16


def prompts_for(vocab_size: int, n: int = 8) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (length,), generator=gen).tolist()
            for length in (5, 17, 33, 64, 100, 129, 200, 7)[:n]]


def make_model(spec: str | None, folder: Path):
    """(model folder, transformers model on cuda:0 in float32, label)."""
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    if spec:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        return Path(spec), model.to("cuda:0").eval(), spec
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config("smollm2-135m"), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder, model.to("cuda:0").eval(), "random:smollm2-135m (seed 0)"


def oracle(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import torch

    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda:0")
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=model.config.eos_token_id, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def engine(folder: Path, p: tuple[int, int], d: tuple[int, int], num_decode: int = 1):
    from splitserve.workers.config import CacheConfig, ParallelConfig
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
    from splitserve.workers.engine import EngineConfig

    def cfg(tp_pp):
        return EngineConfig(model=str(folder), device="cuda", dtype="float32", show_progress=False,
                            cache=CacheConfig(block_size=16, num_blocks=2048), parallel=ParallelConfig(*tp_pp))
    return DisaggEngine(DisaggConfig(prefill=cfg(p), decode=cfg(d), num_decode=num_decode, in_process=False,
                                     transfer_timeout_s=60))


def leaks(eng) -> list[str]:
    found = []
    if eng.num_open_transfers or eng.has_unfinished_requests():
        found.append(f"{eng.num_open_transfers} transfers open, {eng.num_live_requests} requests live")
    for g in eng.groups:
        if g.healthy:
            bm = g.engine.block_manager
            if bm.num_free_blocks != bm.num_blocks:
                found.append(f"{g.name}: {bm.num_blocks - bm.num_free_blocks} blocks not free")
    return found


def run_layout(folder, p, d, prompts, expected) -> dict:
    from splitserve import LLM, SamplingParams

    t0 = time.perf_counter()
    eng = engine(folder, p, d)
    with LLM.from_engine(eng) as llm:
        got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))]
        transport = eng.prefill.config.kv.transport
        row = {"prefill": list(p), "decode": list(d), "transport": transport, "token_exact": got == expected,
               "mismatches": sum(g != e for g, e in zip(got, expected)), "transfers": eng.metrics.num_transfers,
               "failures": eng.metrics.num_failures, "leaks": leaks(eng), "seconds": time.perf_counter() - t0}
    return row


def run_fault(folder, prompts, expected) -> dict:
    """1 prefill + 2 decode groups; a decode-0 rank killed once every request has a token."""
    from splitserve import SamplingParams

    eng = engine(folder, (1, 1), (1, 1), num_decode=2)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        ids = [eng.add_request(None, p, params) for p in prompts]
        tokens = {i: [] for i in ids}
        done: set[str] = set()
        killed, deadline = False, time.monotonic() + 300
        while len(done) < len(ids) and time.monotonic() < deadline:
            for out in eng.step():
                tokens[out.request_id] = list(out.token_ids)
                if out.finished:
                    done.add(out.request_id)
            if not killed and all(tokens[i] for i in ids):
                victim = eng.decodes[0].engine.executor.launcher.procs[0]
                victim.kill()
                killed = True
        got = [tokens[i] for i in ids]
        return {"killed": "decode-0 rank 0" if killed else None, "finished": len(done), "requests": len(ids),
                "token_exact": got == expected, "mismatches": sum(g != e for g, e in zip(got, expected)),
                "resent": eng.num_resent, "leaks": leaks(eng)}
    finally:
        eng.shutdown()


def main() -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="converted SmolLM2 folder (default: its shape, random)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    device = {"type": "cuda", "gpus": gpus, "name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result = report_header("multi_gpu_check", __file__, sys.argv[1:], datetime.now(timezone.utc), device)
    result.update({"layouts": [], "fault": None})
    with tempfile.TemporaryDirectory() as tmp:
        folder, hf, label = make_model(args.model, Path(tmp) / "model")
        result["model"] = label
        prompts = prompts_for(hf.config.vocab_size)
        expected = oracle(hf, prompts, MAX_TOKENS)
        del hf
        torch.cuda.empty_cache()
        for p, d in LAYOUTS:
            if p[0] * p[1] + d[0] * d[1] > gpus:
                result["layouts"].append({"prefill": list(p), "decode": list(d), "skipped": f"needs more than {gpus} GPUs"})
                continue
            try:
                row = run_layout(folder, p, d, prompts, expected)
            except Exception as err:  # noqa: BLE001 - reported, the other layouts still run
                row = {"prefill": list(p), "decode": list(d), "error": f"{type(err).__name__}: {err}",
                       "trace": traceback.format_exc()[-2000:]}
            result["layouts"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        if gpus >= 3:
            try:
                result["fault"] = run_fault(folder, prompts, expected)
            except Exception as err:  # noqa: BLE001
                result["fault"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        else:
            result["fault"] = {"skipped": f"1 prefill + 2 decode groups need 3 GPUs, {gpus} visible"}
        print("fault:", json.dumps(result["fault"]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"multi_gpu_check_{gpus}gpu_{result['date'][:10]}.json"
        path.write_text(json.dumps(result, indent=1))
        print("wrote", path)


if __name__ == "__main__":
    main()
