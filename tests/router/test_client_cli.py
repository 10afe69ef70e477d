"""`splitserve client` against a running server: plain, streamed and chat output, and a
clear error (exit code 1) when no server answers."""

from __future__ import annotations

from splitserve.cluster.cli import main


def test_client_prints_the_answer(servers, capsys, smollm2_tokenizer, smollm2_oracle):
    prompt = "The capital of France is"
    expected = smollm2_tokenizer.decode(smollm2_oracle(smollm2_tokenizer.encode(prompt), 6), skip_special_tokens=True)
    for extra in ([], ["--stream"]):
        assert main(["client", prompt, "--address", servers.grpc_address, "--max-tokens", "6", *extra]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert main(["client", "Say hi.", "--chat", "--address", servers.grpc_address, "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_client_reports_errors(capsys):
    assert main(["client", "hi", "--address", "127.0.0.1:1", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
