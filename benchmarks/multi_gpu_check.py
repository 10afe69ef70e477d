"""Disaggregation across several GPUs: every prefill/decode layout that fits on this machine's
GPUs, greedy output against transformers, then a fault run (a decode group killed mid-stream).

For each layout (prefill tp x pp -> decode tp x pp) whose ranks fit on the visible GPUs (one
GPU per rank, so KV moves over NCCL between devices), a `DisaggEngine` with its rank
processes generates greedily for a fixed set of prompts; the tokens must equal transformers
`generate()` on the same weights (float32, the oracle run on cuda:0). The model is the real
SmolLM2-135M-Instruct when ``--model`` names its converted folder, else its shape with
seeded random weights (the GPU machine has no `gguf` to convert the shipped file). SmolLM2's
9 heads and 3 KV heads do not split over tp 2, so layouts with a tp-2 side use a tiny
Llama-shaped model (4 heads, 2 KV heads, seeded random weights); each row names its model.

The fault run (needs 1 + 2 groups' ranks): one prefill group and two decode groups; once
every request has streamed a token, the rank process of the decode group running the most
of them is killed; every request must still finish token-exact (moved to the other decode
group: ``resent`` counts them, ``exercised`` says the kill hit running requests), and
afterwards every remaining group's KV blocks must be free again and no transfer open.

``--device cpu`` runs every layout and the fault run on the CPU over gloo: a dry run of the
script itself, so that scarce GPU time is not spent finding its bugs.

Usage (GPU machine, NVLink multicast off):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/multi_gpu_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
from results_meta import multicast_off, report_header  # noqa: E402

#: (prefill tp, pp), (decode tp, pp): the pairings issue 9 asks for, smallest first.
LAYOUTS = [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (1, 1)), ((1, 1), (1, 2)),
           ((2, 1), (2, 1))]
MAX_TOKENS = 16


def prompts_for(vocab_size: int, n: int = 8) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (length,), generator=gen).tolist()
            for length in (5, 17, 33, 64, 100, 129, 200, 7)[:n]]


@dataclass
class Model:
    """A model folder with its transformers oracle's answers for `prompts`."""

    folder: Path
    label: str
    num_heads: int
    num_kv_heads: int
    prompts: list[list[int]]
    expected: list[list[int]]

    def splits_over(self, tp: int) -> bool:
        return self.num_heads % tp == 0 and self.num_kv_heads % tp == 0


def make_model(spec: str | None, folder: Path, device: str, num_prompts: int, shape: str = "smollm2-135m") -> Model:
    """The model at ``spec`` (a converted folder), or ``shape`` with seeded random weights saved
    to ``folder``; transformers answers the prompts (float32, on ``device``) and is let go."""
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    if spec:
        hf, folder, label = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32), Path(spec), spec
    else:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(random_config(shape), dtype=torch.float32)
        hf.save_pretrained(folder)
        label = f"random:{shape} (seed 0)"
    hf = hf.to(device).eval()
    prompts = prompts_for(hf.config.vocab_size, num_prompts)
    model = Model(folder, label, hf.config.num_attention_heads, hf.config.num_key_value_heads, prompts,
                  oracle(hf, prompts, MAX_TOKENS, device))
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def oracle(model, prompts: list[list[int]], max_tokens: int, device: str) -> list[list[int]]:
    import torch

    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=model.config.eos_token_id, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def device_summary(kind: str) -> dict:
    """What the result file says of the machine: "cuda" or "cpu" (a dry run over gloo)."""
    import torch

    return {"type": kind, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "name": torch.cuda.get_device_name(0) if kind == "cuda" else "cpu"}


def engine(folder: Path, p: tuple[int, int], d: tuple[int, int], device: str, num_decode: int = 1):
    from splitserve.workers.config import CacheConfig, ParallelConfig
    from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
    from splitserve.workers.engine import EngineConfig

    def cfg(tp_pp):
        return EngineConfig(model=str(folder), device=device, dtype="float32", show_progress=False,
                            cache=CacheConfig(block_size=16, num_blocks=2048), parallel=ParallelConfig(*tp_pp))
    return DisaggEngine(DisaggConfig(prefill=cfg(p), decode=cfg(d), num_decode=num_decode, in_process=False,
                                     transfer_timeout_s=60))


def leaks(eng) -> list[str]:
    found = []
    if eng.num_open_transfers or eng.has_unfinished_requests():
        found.append(f"{eng.num_open_transfers} transfers open, {eng.num_live_requests} requests live")
    for g in eng.groups:
        if g.healthy:
            kv = g.engine.kv_usage()
            if kv.num_free_blocks != kv.num_blocks:
                found.append(f"{g.name}: {kv.num_blocks - kv.num_free_blocks} blocks not free")
    return found


def run_layout(model: Model, p, d, device: str) -> dict:
    from splitserve import LLM, SamplingParams

    t0 = time.perf_counter()
    eng = engine(model.folder, p, d, device)
    with LLM.from_engine(eng) as llm:
        outs = llm.generate(model.prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        got, expected = [o.token_ids for o in outs], model.expected
        transport = eng.prefill.config.kv.transport
        row = {"prefill": list(p), "decode": list(d), "model": model.label, "transport": transport,
               "token_exact": got == expected,
               "mismatches": sum(g != e for g, e in zip(got, expected)), "transfers": eng.metrics.num_transfers,
               "failures": eng.metrics.num_failures, "leaks": leaks(eng), "seconds": time.perf_counter() - t0}
    return row


def run_fault(model: Model, device: str) -> dict:
    """1 prefill + 2 decode groups, requests streamed; once every request has a token, the rank
    of the decode group running the most of them is killed. They must move to the other group
    (``resent``) and still finish token-exact, with nothing left held."""
    from splitserve import SamplingParams

    eng = engine(model.folder, (1, 1), (1, 1), device, num_decode=2)
    expected = model.expected
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        # streamed: a request that does not stream reports only when it has finished
        ids = [eng.add_request(None, p, params, stream=True) for p in model.prompts]
        tokens = {i: [] for i in ids}
        done: set[str] = set()
        killed, deadline = None, time.monotonic() + 300
        while len(done) < len(ids) and time.monotonic() < deadline:
            for out in eng.step():
                tokens[out.request_id] = list(out.token_ids)
                if out.finished:
                    done.add(out.request_id)
            if killed is None and all(tokens[i] for i in ids):
                group = max(eng.decodes, key=lambda g: g.engine.num_running)
                killed = {"group": group.name, "rank": 0, "running": group.engine.num_running,
                          "tokens_so_far": sum(len(t) for t in tokens.values())}
                group.engine.executor_for_tests.launcher.procs[0].kill()
        got = [tokens[i] for i in ids]
        return {"model": model.label, "killed": killed, "finished": len(done), "requests": len(ids),
                "token_exact": got == expected, "mismatches": sum(g != e for g, e in zip(got, expected)),
                "resent": eng.num_resent, "exercised": bool(killed and killed["running"] and eng.num_resent),
                "leaks": leaks(eng)}
    finally:
        eng.shutdown()


def main() -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    multicast_off()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="converted SmolLM2 folder (default: its shape, random)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: every layout and the fault run over gloo, a dry run of this script")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per layout (at most 8)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else None  # CPU ranks: any number
    oracle_device = "cuda:0" if cuda else "cpu"
    result = report_header("multi_gpu_check", __file__, sys.argv[1:], datetime.now(timezone.utc),
                           device_summary(args.device))
    result.update({"layouts": [], "fault": None})
    with tempfile.TemporaryDirectory() as tmp:
        models = {"main": make_model(args.model, Path(tmp) / "model", oracle_device, args.prompts)}
        result["model"] = models["main"].label
        for p, d in LAYOUTS:
            if gpus is not None and p[0] * p[1] + d[0] * d[1] > gpus:
                result["layouts"].append({"prefill": list(p), "decode": list(d), "skipped": f"needs more than {gpus} GPUs"})
                continue
            model = models["main"]
            if not all(model.splits_over(tp) for tp in (p[0], d[0])):
                # SmolLM2's 9 heads / 3 KV heads do not split over tp 2: a Llama-shaped tiny model does
                if "split" not in models:
                    models["split"] = make_model(None, Path(tmp) / "split", oracle_device, args.prompts, "tiny-llama")
                model = models["split"]
            try:
                row = run_layout(model, p, d, args.device)
            except Exception as err:  # noqa: BLE001 - reported, the other layouts still run
                row = {"prefill": list(p), "decode": list(d), "model": model.label,
                       "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
            result["layouts"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        if gpus is None or gpus >= 3:
            try:
                result["fault"] = run_fault(models["main"], args.device)
            except Exception as err:  # noqa: BLE001
                result["fault"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        else:
            result["fault"] = {"skipped": f"1 prefill + 2 decode groups need 3 GPUs, {gpus} visible"}
        print("fault:", json.dumps(result["fault"]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        what = f"{gpus}gpu" if cuda else "cpu-gloo"
        path = args.out / f"multi_gpu_check_{what}_{result['date'][:10]}.json"
        path.write_text(json.dumps(result, indent=1))
        print("wrote", path)


if __name__ == "__main__":
    main()
