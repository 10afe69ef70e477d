"""`splitserve serve` as a user runs it: a real process with an embedded Ray, real ports.

The command starts, prints where it listens, serves a gRPC and an HTTP request (greedy output
token-exact with transformers), reports ready on /health, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

LISTENING = re.compile(r"gRPC on ([\d.]+):(\d+), HTTP on https?://([\d.]+):(\d+)")


class ServeProcess:
    """`splitserve serve ...` in a child process; its output collected on a thread."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
        self.proc = subprocess.Popen([sys.executable, "-m", "splitserve.cluster.cli", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_listening(self, timeout_s: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := LISTENING.search(line):
                    return f"{m[1]}:{m[2]}", int(m[4])
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("serve did not start:\n" + "".join(self.lines[-60:]))

    def stop(self, timeout_s: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError("serve did not stop within the deadline:\n" + "".join(self.lines[-40:])) from None


@pytest.fixture(scope="module")
def served(tiny_models):
    folder, oracle = tiny_models("tiny-llama")
    server = ServeProcess(["--model", str(folder), "--device", "cpu", "--num-cpus", "16", "--grpc-port", "0",
                           "--http-port", "0", "--max-model-len", "512"])
    try:
        grpc_address, http_port = server.wait_listening(240)
        yield server, grpc_address, http_port, oracle
    finally:
        server.stop()


def test_serve_answers_over_grpc_and_http_then_stops_on_sigterm(served):
    import httpx

    from splitserve import Client, SamplingParams

    server, grpc_address, http_port, oracle = served
    prompt = [5, 17, 33, 2 + 40, 90]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    with Client(grpc_address) as client:
        out = client.generate(prompt, params)
    assert list(out.token_ids) == oracle(prompt, 10)
    base = f"http://127.0.0.1:{http_port}"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    body = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True}).json()
    assert body["choices"][0]["token_ids"] == oracle(prompt, 10)
    log = "".join(server.lines)
    assert "group prefill-0: ready" in log and "group decode-0: ready" in log  # each group's state logged
    assert server.stop() == 0
