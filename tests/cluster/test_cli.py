"""`splitserve generate`: runs the engine in-process and prints text or JSON; bad input exits 2.
`splitserve serve`'s placement flags (``--mode auto``, ``--gpus-per-rank``, ``--api-servers``,
``--placement-timeout``) reach the `ServeConfig` without starting anything."""

from __future__ import annotations

import json

import pytest

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


def _serve_config(*argv: str):
    from splitserve.cluster.cli import serve_config_from_args

    return serve_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_mode_flag(tmp_path, capsys):
    assert _serve_config().mode == "auto"
    assert _serve_config("--mode", "aggregated").mode == "aggregated"
    # A flag left out keeps the file's mode (its default is None, not "auto").
    path = tmp_path / "serve.yaml"
    path.write_text("mode: disaggregated\n")
    assert _serve_config("--config", str(path)).mode == "disaggregated"
    assert _serve_config("--config", str(path), "--mode", "auto").mode == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mode", "split"])
    assert "invalid choice" in capsys.readouterr().err


def test_serve_placement_flags_reach_the_config():
    cfg = _serve_config("--gpus-per-rank", "0.5", "--api-servers", "3", "--placement-timeout", "20")
    assert (cfg.gpus_per_rank, cfg.server.api_servers, cfg.ray.placement_timeout_s) == (0.5, 3, 20.0)


def test_ray_address_from_the_environment(monkeypatch):
    # connect() joins $RAY_ADDRESS when nothing names a cluster; the config says so, so
    # placement treats the cluster as one that may grow.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _serve_config().ray.address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _serve_config().ray.address == "10.0.0.1:6379"
    assert _serve_config("--address", "auto").ray.address == "auto"


def test_expert_parallel_flag_reaches_every_groups_engine_config():
    from splitserve.workers.roles import GroupRole

    assert not _serve_config().group(GroupRole.WORKER).expert_parallel
    cfg = _serve_config("--expert-parallel", "--mode", "aggregated", "--worker-tp", "2")
    engine = cfg.service().engine.engine_config(GroupRole.WORKER)
    assert engine.parallel.expert_parallel and engine.parallel.tensor_parallel_size == 2
    assert build_parser().parse_args(["generate", "x", "--expert-parallel"]).expert_parallel


def test_kv_cache_dtype_flag_and_yaml_reach_every_groups_engine_config(tmp_path):
    from splitserve.workers.roles import GroupRole

    assert _serve_config().kv_cache_dtype == "auto"
    cfg = _serve_config("--kv-cache-dtype", "fp8", "--mode", "disaggregated")
    assert {cfg.service().engine.engine_config(role).kv_cache_dtype for role in cfg.roles()} == {"fp8"}
    path = tmp_path / "serve.yaml"
    path.write_text("kv_cache_dtype: fp8\nmode: aggregated\n")
    assert _serve_config("--config", str(path)).service().engine.engine_config(GroupRole.WORKER).kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp4'"):
        _serve_config("--kv-cache-dtype", "fp4")
