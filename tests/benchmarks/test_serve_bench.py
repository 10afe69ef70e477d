"""benchmarks/serve_bench.py end to end: the offline backend on random:tiny-llama, the http
backend against a small streaming server, and the command line's checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
import serve_bench  # noqa: E402
from test_serve_backends import FakeOpenAIServer  # noqa: E402  (pytest puts this folder on sys.path)

STAT_KEYS = {"count", "mean", "p50", "p90", "p99", "max"}


@pytest.fixture
def restore_torch_threads():
    """--num-threads sets torch's thread count for the whole process; put it back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def check_run(run: dict, num_prompts: int, output_tokens: int) -> None:
    assert run["num_completed"] == num_prompts and run["num_failed"] == 0 and run["num_wrong_length"] == 0
    assert run["output_tokens"] == output_tokens
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(run[key]) == STAT_KEYS and run[key]["count"] > 0
        assert 0 <= run[key]["p50"] <= run[key]["p99"] <= run[key]["max"]
    assert set(run["throughput"]) == {"requests_per_s", "output_tokens_per_s", "total_tokens_per_s"}
    assert run["throughput"]["output_tokens_per_s"] > 0
    assert 0 <= run["slo"]["attainment"] <= 1
    assert len(run["requests"]) == num_prompts
    assert all(q["ttft_s"] <= q["e2e_s"] for q in run["requests"])


def test_offline_run_writes_report(tmp_path: Path, restore_torch_threads):
    out = tmp_path / "offline.json"
    argv = ["--model", "random:tiny-llama", "--input-len", "12", "--output-len", "5", "--num-prompts", "4",
            "--request-rate", "40", "--num-warmup", "1", "--num-threads", "1", "--kv-cache-gib", "0.01",
            "--out", str(out), "--no-progress"]
    report = serve_bench.main(argv)

    saved = json.loads(out.read_text())
    assert saved == report
    for key in ("benchmark", "command", "date", "git_commit", "device", "backend", "workload", "slo", "runs", "plot"):
        assert key in saved
    assert saved["benchmark"] == "serve_bench" and "--num-prompts 4" in saved["command"]
    assert saved["device"]["type"] == "cpu" and saved["device"]["num_threads"] == 1
    assert saved["backend"]["backend"] == "offline" and saved["backend"]["model"] == "random:tiny-llama"
    assert saved["workload"]["kind"] == "fixed" and saved["workload"]["total_output_tokens"] == 20
    assert saved["slo"] == {"ttft_s": 0.5, "tpot_s": 0.05, "target_attainment": 0.9}
    assert "max_rate_meeting_slo" not in saved  # one rate: no sweep
    [run] = saved["runs"]
    assert run["request_rate"] == 40.0
    check_run(run, 4, 20)
    assert all(q["output_tokens"] == 5 and q["start_s"] == q["arrival_s"] for q in run["requests"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_http_sweep_against_a_streaming_server(tmp_path: Path):
    out = tmp_path / "http.json"
    with FakeOpenAIServer() as server:
        server.gap_s = 0.002
        argv = ["--backend", "http", "--url", server.url, "--vocab-size", "500", "--workload", "chat",
                "--input-len", "16", "--output-len", "6", "--max-input", "64", "--min-output", "2",
                "--max-output", "12", "--num-prompts", "6", "--sweep-rates", "50", "inf", "--num-warmup", "1",
                "--slo-ttft", "5", "--slo-tpot", "1", "--server-device", "fake", "--out", str(out), "--no-progress"]
        report = serve_bench.main(argv)
        bodies = list(server.bodies)

    assert len(bodies) == 1 + 2 * 6  # warm-up, then the workload once per rate
    assert all(b["model"] == "fake-model" and max(b["prompt"]) < 500 for b in bodies)
    assert report["backend"]["backend"] == "http" and report["device"] == {**report["device"], "type": "remote",
                                                                            "server": "fake"}
    assert [r["request_rate"] for r in report["runs"]] == [50.0, "inf"]
    total = report["workload"]["total_output_tokens"]
    for run in report["runs"]:
        check_run(run, 6, total)
        assert run["mean_tokens_per_delivery"] > 1  # the server sends two tokens per chunk
    assert report["max_rate_meeting_slo"] == "inf"  # generous SLOs: every rate meets them
    assert "highest rate" in serve_bench.format_table(report)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "rates must be > 0"),
    (["--sweep-rates", "1", "-2"], "rates must be > 0"),
    (["--num-prompts", "0"], "--num-prompts"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        serve_bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_length_flags_per_workload():
    spec = serve_bench.length_spec(serve_bench.parse_args(["--workload", "chat", "--max-input", "300"]))
    assert (spec.kind, spec.input_len, spec.output_len, spec.max_input, spec.input_sigma) == ("chat", 256, 128, 300, 1.0)
    assert serve_bench.length_spec(serve_bench.parse_args([])).input_len == 1024
    with pytest.raises(SystemExit, match="fixed takes"):
        serve_bench.length_spec(serve_bench.parse_args(["--input-sigma", "2"]))
