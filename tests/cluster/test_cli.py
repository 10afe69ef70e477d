"""`splitserve generate`: runs the engine in-process and prints text or JSON; bad input exits 2."""

from __future__ import annotations

import json

from splitserve.cluster.cli import build_parser, main


def test_generate_json(smollm2_dir, smollm2_oracle, smollm2_tokenizer, capsys):
    code = main(["generate", "The capital of France is", "--model", str(smollm2_dir), "--max-tokens", "6", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = smollm2_tokenizer.encode("The capital of France is")
    assert record["token_ids"] == smollm2_oracle(ids, 6)
    assert record["completion_tokens"] == len(record["token_ids"]) and record["prompt_tokens"] == len(ids)
    assert record["finish_reason"] in ("stop", "length")


def test_generate_chat_text(smollm2_dir, capsys):
    assert main(["generate", "Say hi.", "--chat", "--model", str(smollm2_dir), "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_input_exits_2_with_message(smollm2_dir, capsys):
    assert main(["generate", "hi", "--model", str(smollm2_dir), "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["generate", "x"])
    assert args.model is None and args.temperature == 0.0 and args.max_tokens == 64


def test_generate_disaggregated_matches(smollm2_dir, smollm2_oracle, smollm2_tokenizer, capsys):
    argv = ["generate", "The capital of France is", "--model", str(smollm2_dir), "--max-tokens", "6", "--json",
            "--mode", "disaggregated"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["token_ids"] == smollm2_oracle(smollm2_tokenizer.encode("The capital of France is"), 6)
