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


def check_run(run: dict, num_prompts: int, output_tokens: int, gaps: bool = True) -> None:
    """``gaps=False``: a server may send a request's tokens in one event (splitserve's front
    doors merge the chunks that queued up meanwhile), leaving no inter-token gap to measure."""
    assert run["num_completed"] == num_prompts and run["num_failed"] == 0 and run["num_wrong_length"] == 0
    assert run["output_tokens"] == output_tokens
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(run[key]) == STAT_KEYS and (run[key]["count"] > 0 or (key == "itl_s" and not gaps))
        if run[key]["count"]:  # (no gap at all when every request's tokens came in one event)
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


# --- the grpc backend and the comparison (splitserve's front doors over random:tiny-llama) ---------

TINY_SERVER = Path(__file__).resolve().parent / "tiny_server.py"
SMALL_CHAT = ["--workload", "chat", "--input-len", "12", "--output-len", "4", "--max-input", "40", "--min-output", "2",
              "--max-output", "8", "--slo-ttft", "5", "--slo-tpot", "1", "--no-progress"]
ENGINE = ["--model", "random:tiny-llama", "--device", "cpu", "--num-threads", "1", "--kv-cache-gib", "0.01"]


def test_grpc_run_writes_report(tmp_path: Path, tiny_servers):
    out = tmp_path / "grpc.json"
    report = serve_bench.main(["--backend", "grpc", "--target", tiny_servers.target, "--input-len", "8",
                               "--output-len", "4", "--num-prompts", "3", "--request-rate", "50", "--num-warmup", "1",
                               "--server-device", "cpu", "--out", str(out), "--no-progress"])
    assert json.loads(out.read_text()) == report
    b = report["backend"]
    assert (b["backend"], b["target"], b["model"], b["vocab_size"]) == ("grpc", tiny_servers.target, "random:tiny-llama", 256)
    assert report["device"]["type"] == "remote" and report["device"]["server"] == "cpu"
    [run] = report["runs"]
    check_run(run, 3, 12, gaps=False)
    assert run["process_cpu_s"] > 0
    assert "grpc" in serve_bench.format_table(report) and out.with_suffix(".png").stat().st_size > 0


@pytest.fixture
def sent(monkeypatch):
    """The requests each backend kind was given, per call of its ``run``."""
    import serve_backends

    calls: dict[str, list] = {}
    for cls in (serve_backends.OfflineBackend, serve_backends.HTTPBackend, serve_backends.GRPCBackend):
        def run(self, requests, *args, _original=cls.run, **kwargs):
            calls.setdefault(self.name, []).append(requests)
            return _original(self, requests, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    return calls


def test_compare_engine_then_both_front_doors(tmp_path: Path, tiny_servers, sent, restore_torch_threads):
    out = tmp_path / "compare.json"
    argv = ["--compare", *ENGINE, "--url", tiny_servers.url, "--target", tiny_servers.target, *SMALL_CHAT,
            "--num-prompts", "4", "--sweep-rates", "40", "inf", "--num-warmup", "1", "--out", str(out)]
    report = serve_bench.main(argv)

    assert json.loads(out.read_text()) == report and out.with_suffix(".png").stat().st_size > 0
    for key in ("benchmark", "command", "date", "git_commit", "device", "workload", "slo", "backends", "ratios"):
        assert key in report
    assert report["mode"] == "compare" and report["order"] == ["offline", "http", "grpc"]
    assert report["device"]["type"] == "cpu" and report["vocab_size"] == 256 and report["warnings"] == []
    parts = report["backends"]
    assert [parts[k]["backend"]["model"] for k in ("offline", "http", "grpc")] == ["random:tiny-llama"] * 3
    total = report["workload"]["total_output_tokens"]
    for name, part in parts.items():
        assert [r["request_rate"] for r in part["runs"]] == [40.0, "inf"]
        for run in part["runs"]:
            check_run(run, 4, total, gaps=name == "offline")
    assert parts["grpc"]["prompt_first_id_shift"] == 1 and "prompt_first_id_shift" not in parts["http"]

    # One workload: the same requests (warm-up, then one list per rate) for the engine and over
    # HTTP; over gRPC the same but each prompt's first id (the server's prefix cache saw them).
    assert len(sent["offline"]) == len(sent["http"]) == len(sent["grpc"]) == 3
    assert sent["offline"] == sent["http"]
    for engine_reqs, grpc_reqs in zip(sent["offline"], sent["grpc"]):
        assert [(q.prompt_ids[1:], q.output_len, q.arrival_s) for q in engine_reqs] == \
               [(q.prompt_ids[1:], q.output_len, q.arrival_s) for q in grpc_reqs]
        assert all(a.prompt_ids[0] != b.prompt_ids[0] for a, b in zip(engine_reqs, grpc_reqs))
    assert sent["offline"][1] != sent["offline"][2]  # fresh ids per rate

    for kind in ("http", "grpc"):
        rows = report["ratios"][kind]
        assert [r["request_rate"] for r in rows] == [40.0, "inf"]
        for row, e, s in zip(rows, parts["offline"]["runs"], parts[kind]["runs"]):
            # (from the figures before the report rounds them to µs; TTFTs here are >= 1 ms)
            assert row["ttft_p50"] == pytest.approx(s["ttft_s"]["p50"] / e["ttft_s"]["p50"], rel=0.01)
            assert row["ttft_p50_diff_ms"] == pytest.approx((s["ttft_s"]["p50"] - e["ttft_s"]["p50"]) * 1000, abs=1e-2)
            assert row["output_tokens_per_s"] == pytest.approx(
                s["throughput"]["output_tokens_per_s"] / e["throughput"]["output_tokens_per_s"], rel=1e-3)
            assert row["tpot_mean"] >= 0 and row["tpot_p99"] >= 0 and row["requests_per_s"] > 0
            assert row["num_completed"] == {"engine": 4, "server": 4}
    table = serve_bench.format_compare_table(report)
    assert "server / engine per rate" in table and table.count(" grpc ") >= 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compare_server_first_starts_and_stops_the_server(tmp_path: Path, monkeypatch, restore_torch_threads):
    """--server-cmd: the server runs for the server part only, and is gone before the engine is built."""
    import serve_backends

    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    server_up_when_engine_built = []
    original = serve_bench.make_backend

    def make_backend(args, kind=None):
        if kind == "offline":
            server_up_when_engine_built.append(serve_backends.server_ready(None, target))
        return original(args, kind)
    monkeypatch.setattr(serve_bench, "make_backend", make_backend)

    out = tmp_path / "first.json"
    report = serve_bench.main(["--compare", "--compare-order", "server-first", *ENGINE, "--target", target,
                               "--server-cmd", f"{sys.executable} {TINY_SERVER} {grpc_port} {http_port}",
                               "--server-wait", "60", *SMALL_CHAT, "--num-prompts", "3", "--request-rate", "30",
                               "--num-warmup", "0", "--out", str(out)])
    assert report["order"] == ["grpc", "offline"] and list(report["ratios"]) == ["grpc"]
    assert server_up_when_engine_built == [False]
    assert report["server"]["exit_code"] == 0 and report["server"]["ready_after_s"] > 0
    log = Path(report["server"]["log"])
    assert log == out.with_suffix(".server.log") and "stopped" in log.read_text()
    [row] = report["ratios"]["grpc"]
    assert row["request_rate"] == 30.0 and row["output_tokens_per_s"] > 0


def test_server_cmd_that_exits_is_reported(tmp_path: Path):
    with pytest.raises(SystemExit, match="exited with 3"):
        serve_bench.main(["--backend", "grpc", "--target", f"127.0.0.1:{free_port()}", "--server-wait", "30",
                          "--server-cmd", f"{sys.executable} -c 'import sys; print(\"boom\"); sys.exit(3)'",
                          "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert "boom" in (tmp_path / "x.server.log").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--compare"], "--url (HTTP) and/or --target (gRPC)"),
    (["--server-cmd", "true"], "--server-cmd needs a server backend"),
])
def test_bad_compare_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        serve_bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_server_defaults():
    assert serve_bench.parse_args(["--compare", "--target", "h:1"]).backend == "compare"
    assert serve_bench.parse_args(["--backend", "grpc"]).target == "127.0.0.1:50051"
    args = serve_bench.parse_args(["--backend", "http"])
    assert (args.url, args.target) == ("http://127.0.0.1:8000", None)
    assert serve_bench.make_backend(args).vocab_size == 32000


def test_workload_is_one_per_rate_and_shift_moves_only_first_ids():
    lengths = [(5, 2), (3, 1), (7, 4)]
    a = serve_bench.workload(lengths, 10.0, 0, 1, 256)
    assert a == serve_bench.workload(lengths, 10.0, 0, 1, 256)
    assert a != serve_bench.workload(lengths, 10.0, 0, 2, 256)
    shifted = serve_bench.workload(lengths, 10.0, 0, 1, 256, shift=1)
    for q, s in zip(a, shifted):
        assert (s.prompt_ids[1:], s.output_len, s.arrival_s) == (q.prompt_ids[1:], q.output_len, q.arrival_s)
        assert s.prompt_ids[0] != q.prompt_ids[0] and 32 <= s.prompt_ids[0] < 224  # token_id_range(256)


def test_ratio_row_without_figures():
    empty = {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    engine = {"request_rate": 4.0, "ttft_s": {**empty, "p50": 0.1}, "tpot_s": {**empty, "mean": 0.02, "p99": 0.03}, "num_completed": 2,
              "throughput": {"output_tokens_per_s": 100.0, "requests_per_s": 2.0}}
    server = {"request_rate": 4.0, "ttft_s": empty, "tpot_s": empty, "num_completed": 0,
              "throughput": {"output_tokens_per_s": 0.0, "requests_per_s": 0.0}}
    row = serve_bench.ratio_row(engine, server)
    assert row["tpot_mean"] is row["ttft_p50"] is row["ttft_p50_diff_ms"] is None
    assert row["output_tokens_per_s"] == 0.0 and row["num_completed"] == {"engine": 2, "server": 0}
    assert serve_bench.ratio_row(server, engine)["output_tokens_per_s"] is None  # nothing to divide by
