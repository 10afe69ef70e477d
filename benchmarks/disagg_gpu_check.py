"""Disaggregated mode on one GPU: prefill and decode groups as two processes on the device
(KV by CUDA IPC), then both in this process (in-process copy); greedy output must equal
aggregated mode on the same GPU. With ``--kv-cache-dtype fp8`` (and ``--quantization fp8``) the
KV blocks move as FP8 bytes and the reference is aggregated FP8 on the same weights; a prefill
group and a decode group of different KV dtypes must then refuse to start.

Usage (GPU machine): python benchmarks/disagg_gpu_check.py [--out DIR] [--dtype bfloat16]
    [--kv-cache-dtype fp8] [--quantization fp8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from splitserve import LLM, SamplingParams
from splitserve.workers.config import CacheConfig
from splitserve.workers.disagg_engine import DisaggConfig, DisaggEngine
from splitserve.workers.engine import EngineConfig


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    args = parser.parse_args()
    opts = {"dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization}
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    prompts = [[5, 6, 7, 8], [9] * 40, list(range(3, 60)), list(range(100, 220))]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    result = {"benchmark": "disagg_gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "options": opts}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(random_config("tiny-llama"), dtype=torch.float32).save_pretrained(folder)
        with LLM(folder, device="cuda", show_progress=False, **opts) as llm:
            ref = [o.token_ids for o in llm.generate(prompts, params)]
        base = EngineConfig(model=folder, device="cuda", show_progress=False, cache=CacheConfig(block_size=4), **opts)
        # Two processes on the one GPU (CUDA IPC), then both groups in this process.
        for in_process in (False, True):
            engine = DisaggEngine(DisaggConfig(prefill=base, decode=base, in_process=in_process, transfer_timeout_s=5))
            with LLM.from_engine(engine) as llm:
                got = [o.token_ids for o in llm.generate(prompts, params)]
                transport = engine.prefill.config.kv.transport
                result[transport] = {"match": got == ref, "transfers": engine.metrics.num_transfers,
                                     "failures": engine.metrics.num_failures}
            print(f"prefill -> decode via {transport}: token-exact {got == ref}, {engine.metrics}")
        if args.kv_cache_dtype != "auto":  # mismatched KV dtypes: refused before any link connects
            other = EngineConfig(model=folder, device="cuda", show_progress=False, cache=CacheConfig(block_size=4),
                                 **{**opts, "kv_cache_dtype": "auto"})
            try:
                DisaggEngine(DisaggConfig(prefill=base, decode=other, in_process=True, transfer_timeout_s=5)).shutdown()
                result["mismatch_refused"] = False
            except Exception as exc:  # noqa: BLE001  the refusal is what is checked
                result["mismatch_refused"] = "kv_cache_dtype" in str(exc) and "float8_e4m3fn" in str(exc)
                result["mismatch_message"] = str(exc)[:300]
            print(f"mismatched KV dtypes refused: {result['mismatch_refused']} ({result.get('mismatch_message')})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "disagg_gpu_check" + ("" if args.kv_cache_dtype == "auto" else f"_kv-{args.kv_cache_dtype}")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
