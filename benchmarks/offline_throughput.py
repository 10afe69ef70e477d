"""Offline throughput: splitserve's continuous batching vs transformers' padded batches (CPU).

One seeded workload of random token-id prompts (greedy, ignore_eos: every request generates
exactly its ``max_tokens``) runs through both systems on the same float32 weights:

    make_requests(workload, vocab)            # seeded prompt lengths, output lengths, token ids
    -> run_splitserve(...)                     # warm-up, then ONE timed LLM.generate over all prompts
    -> run_transformers(...)                   # warm-up, then timed model.generate over padded batches
    -> compare_outputs(...)                    # how many requests have token-identical greedy output
    -> write JSON (+ a PNG bar chart beside it) and print a short table

The comparison is the honest one for a static-batching baseline: a transformers batch decodes
until its longest request is done, so only each request's own ``max_tokens`` count as useful
output; the tokens generated past that for shorter requests are reported as waste. Requests
stay in arrival order unless ``--hf-sort-by-length`` groups them by input length.

Run it on a quiet machine (it is CPU-bound and uses every torch thread):

    python benchmarks/offline_throughput.py                 # the full workload, default model
    python benchmarks/offline_throughput.py --quick         # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta, beside this script
import results_meta  # noqa: E402
from results_meta import BENCH_DIR, REPO_ROOT, RESULTS_DIR, git_commit, slug  # noqa: E402,F401
from results_meta import cpu_model  # noqa: E402

#: splitserve must beat transformers' padded batches by this factor in output tokens/s.
TARGET_RATIO = 1.5
#: Ids this close to either end of the vocabulary are skipped (special tokens live there).
SPECIAL_ID_MARGIN = 100

#: Workload knobs: the full run, and `--quick` (a smoke test). Explicit flags override either.
FULL = dict(num_prompts=64, min_input=16, max_input=512, min_output=16, max_output=256, hf_batch_size=8)
QUICK = dict(num_prompts=6, min_input=8, max_input=32, min_output=4, max_output=12, hf_batch_size=2)


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    #: Input lengths are drawn uniformly from [min_input, max_input] tokens.
    min_input: int
    max_input: int
    #: max_tokens is drawn uniformly from [min_output, max_output].
    min_output: int
    max_output: int
    seed: int
    quick: bool

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if not 1 <= self.min_input <= self.max_input:
            raise ValueError(f"need 1 <= --min-input <= --max-input, got {self.min_input}..{self.max_input}")
        if not 1 <= self.min_output <= self.max_output:
            raise ValueError(f"need 1 <= --min-output <= --max-output, got {self.min_output}..{self.max_output}")


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class SystemResult:
    """One system's timed run; ``outputs`` (per request, its useful tokens) stays out of the JSON."""

    output_tokens: int
    seconds: float
    outputs: list[list[int]] = field(repr=False)
    #: System-specific facts (settings, steps, waste) that go into the JSON as they are.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"output_tokens": self.output_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_s": round(self.tokens_per_s, 3), **self.details}


# --- the workload ---------------------------------------------------------------------------


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[lo, hi) of prompt token ids: clear of the special ids at both ends of the vocabulary."""
    margin = min(SPECIAL_ID_MARGIN, vocab_size // 8)  # tiny test vocabularies keep most ids
    if vocab_size - 2 * margin < 1:
        raise ValueError(f"vocabulary of {vocab_size} ids is too small for random prompts")
    return margin, vocab_size - margin


def make_requests(workload: Workload, vocab_size: int) -> list[Request]:
    """The seeded workload, in arrival order."""
    rng = random.Random(workload.seed)
    lo, hi = token_id_range(vocab_size)
    requests = []
    for _ in range(workload.num_prompts):
        num_input = rng.randint(workload.min_input, workload.max_input)
        max_tokens = rng.randint(workload.min_output, workload.max_output)
        requests.append(Request([rng.randrange(lo, hi) for _ in range(num_input)], max_tokens))
    return requests


def warmup_requests(vocab_size: int) -> list[Request]:
    """Two short requests of different lengths (so transformers' warm-up pads, like the real run)."""
    lo, hi = token_id_range(vocab_size)
    ids = [lo + i % (hi - lo) for i in range(12)]
    return [Request(ids, 4), Request(ids[:7], 4)]


# --- splitserve -----------------------------------------------------------------------------


def run_splitserve(folder: Path, requests: list[Request], max_num_batched_tokens: int,
                   max_num_seqs: int, kv_cache_gib: float, show_progress: bool) -> SystemResult:
    """All requests in one `LLM.generate` call: the engine batches them continuously."""
    from splitserve import LLM, SamplingParams

    llm = LLM(model=str(folder), device="cpu", dtype="float32", kv_cache_memory=int(kv_cache_gib * 1024**3),
              max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
              show_progress=show_progress)

    def params(r: Request) -> SamplingParams:
        return SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)

    warm = warmup_requests(llm.engine.model_cfg.vocab_size)
    llm.generate([r.prompt_ids for r in warm], [params(r) for r in warm], use_tqdm=False)
    num_steps = _count_calls(llm.engine, "step")

    start = time.perf_counter()
    outs = llm.generate([r.prompt_ids for r in requests], [params(r) for r in requests])
    seconds = time.perf_counter() - start

    outputs = [list(o.token_ids) for o in outs]
    short = [i for i, (r, o) in enumerate(zip(requests, outputs)) if len(o) != r.max_tokens]
    if short:
        print(f"warning: splitserve generated fewer than max_tokens for requests {short[:10]}", file=sys.stderr)
    details = {"num_steps": num_steps[0], "max_num_batched_tokens": max_num_batched_tokens,
               "max_num_seqs": max_num_seqs, "kv_cache_gib": kv_cache_gib}
    return SystemResult(sum(map(len, outputs)), seconds, outputs, details)


def _count_calls(obj: Any, method: str) -> list[int]:
    """Count calls to ``obj.method`` from now on; the returned one-item list holds the count."""
    count, inner = [0], getattr(obj, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return inner(*args, **kwargs)

    setattr(obj, method, counted)  # an instance attribute: the class is untouched
    return count


# --- transformers ---------------------------------------------------------------------------


def hf_batches(requests: list[Request], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Request indices per batch: arrival order, or (sorted) grouped by input length."""
    order = list(range(len(requests)))
    if sort_by_length:
        order.sort(key=lambda i: len(requests[i].prompt_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def load_hf_model(folder: Path) -> Any:
    """The transformers model, float32 on CPU, with EOS stopping switched off (like ignore_eos).

    EOS is cleared on the model's own generation config: `generate()` fills unset values from it,
    so passing ``eos_token_id=None`` would not stick. Clearing it (rather than relying on
    ``min_new_tokens``, which masks the EOS logit) leaves the greedy choices untouched.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_generate_batch(model: Any, batch: list[Request], pad_id: int) -> list[list[int]]:
    """One left-padded batch, decoded to its longest max_tokens; each request's new tokens, all of them."""
    import torch

    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
    max_new = max(r.max_tokens for r in batch)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new,
                         min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
    return out[:, width:].tolist()


def run_transformers(folder: Path, requests: list[Request], batch_size: int, sort_by_length: bool,
                     show_progress: bool) -> SystemResult:
    """Padded static batches through `model.generate`; only each request's own max_tokens count."""
    import torch
    from tqdm.auto import tqdm

    model = load_hf_model(folder)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    hf_generate_batch(model, warmup_requests(model.config.vocab_size), pad_id)

    batches = hf_batches(requests, batch_size, sort_by_length)
    outputs: list[list[int]] = [[] for _ in requests]
    generated = 0
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in tqdm(batches, desc="transformers", unit="batch", disable=not show_progress):
            new_tokens = hf_generate_batch(model, [requests[i] for i in batch], pad_id)
            for i, tokens in zip(batch, new_tokens):
                outputs[i] = tokens[: requests[i].max_tokens]
                generated += len(tokens)
        seconds = time.perf_counter() - start

    useful = sum(map(len, outputs))
    details = {"batch_size": batch_size, "sort_by_length": sort_by_length, "num_batches": len(batches),
               "generated_tokens": generated, "wasted_tokens": generated - useful}
    return SystemResult(useful, seconds, outputs, details)


# --- comparison and report -------------------------------------------------------------------


def compare_outputs(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many requests have identical greedy tokens; where the others first diverge."""
    mismatches = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            first = next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            mismatches.append({"request": i, "first_diff": first})
    return {"num_requests": len(a), "num_exact_match": len(a) - len(mismatches), "mismatches": mismatches}


def device_info() -> dict[str, Any]:
    import torch
    import transformers

    return {"type": "cpu", "cpu_model": cpu_model(), "num_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python_version": platform.python_version(),
            "platform": platform.platform()}


def default_out_path(device: dict[str, Any], now: datetime) -> Path:
    return results_meta.default_out_path("offline_throughput", slug(device["cpu_model"]) or "cpu", now)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    values = [report["systems"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 4))
    bars = ax.bar(names, values, color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("output tokens/s")
    hf = report["systems"]["transformers"]
    order = "sorted by length" if hf["sort_by_length"] else "arrival order"
    ax.set_title(f"splitserve / transformers = {report['ratio']:.2f}x (target {report['target_ratio']}x)\n"
                 f"{report['workload']['num_prompts']} prompts, HF batch {hf['batch_size']} ({order})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'system':<14}{'output tok':>12}{'wall s':>10}{'tok/s':>10}"]
    for name, r in report["systems"].items():
        rows.append(f"{name:<14}{r['output_tokens']:>12}{r['seconds']:>10.2f}{r['tokens_per_s']:>10.1f}")
    hf, match = report["systems"]["transformers"], report["greedy_match"]
    verdict = "met" if report["target_met"] else "NOT met"
    order = "sorted by input length" if hf["sort_by_length"] else "arrival order"
    rows += [
        f"ratio splitserve/transformers: {report['ratio']:.2f}x (target {report['target_ratio']}x: {verdict})",
        f"transformers batches: {hf['num_batches']} x {hf['batch_size']}, {order}; "
        f"{hf['wasted_tokens']} of {hf['generated_tokens']} generated tokens wasted on padding to the longest",
        f"identical greedy outputs: {match['num_exact_match']}/{match['num_requests']} requests",
    ]
    return "\n".join(rows)


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="local Hugging Face folder (config.json + safetensors; no tokenizer needed); "
                        "default: the default model (SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", help="smoke test: the small workload below")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    for name, value in FULL.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=None, help=f"default {value}, {QUICK[name]} with --quick")
    p.add_argument("--hf-sort-by-length", action="store_true",
                   help="group transformers batches by input length (default: arrival order)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="splitserve's per-step token budget (default 2048)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="splitserve's running-sequence cap (default 256)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="splitserve's KV-cache budget (default 2.0)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch threads for both systems (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (a PNG goes beside it); default "
                        "benchmarks/results/offline_throughput_<device>_<date>.json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def model_folder(spec: str | None) -> Path:
    """The folder both systems load; `random:` specs are refused (transformers can't rebuild them)."""
    if spec is None or spec in ("default", "SmolLM2-135M-Instruct"):
        from splitserve.workers.model_source import ensure_default_model

        return ensure_default_model()
    if spec.startswith("random:"):
        raise SystemExit(f"--model {spec!r}: random weights exist only inside splitserve, so transformers "
                         "cannot load the same ones; save a model folder and pass its path")
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {spec!r}: not a folder with config.json and *.safetensors")
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write JSON and PNG, and return the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    knobs = {name: getattr(args, name) if getattr(args, name) is not None else default
             for name, default in (QUICK if args.quick else FULL).items()}
    hf_batch_size = knobs.pop("hf_batch_size")
    workload = Workload(**knobs, seed=args.seed, quick=args.quick)
    now = datetime.now(timezone.utc)

    import torch
    from transformers import AutoConfig

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    folder = model_folder(args.model)
    vocab_size = AutoConfig.from_pretrained(str(folder)).vocab_size
    requests = make_requests(workload, vocab_size)
    progress = not args.no_progress

    ours = run_splitserve(folder, requests, args.max_num_batched_tokens, args.max_num_seqs, args.kv_cache_gib,
                          progress)
    theirs = run_transformers(folder, requests, hf_batch_size, args.hf_sort_by_length, progress)

    device = device_info()
    ratio = ours.tokens_per_s / theirs.tokens_per_s if theirs.tokens_per_s > 0 else float("inf")
    report = {
        **results_meta.report_header("offline_throughput", __file__, argv, now, device),
        "model": {"spec": args.model, "path": str(folder), "vocab_size": vocab_size, "dtype": "float32"},
        "workload": {**asdict(workload), "token_id_range": list(token_id_range(vocab_size)),
                     "total_input_tokens": sum(len(r.prompt_ids) for r in requests),
                     "total_output_tokens": sum(r.max_tokens for r in requests)},
        "systems": {"splitserve": ours.to_json(), "transformers": theirs.to_json()},
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "greedy_match": compare_outputs(ours.outputs, theirs.outputs),
    }

    results_meta.save_report(args.out or default_out_path(device, now), report, write_plot, format_table)
    return report


if __name__ == "__main__":
    main()
