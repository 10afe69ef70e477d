"""`ServeConfig`: the async-scheduling switch from a flag or the YAML file reaches every group's
engine config, and asking for it where a group has several pipeline stages is refused before
anything starts (tp > 1 takes it). Mode auto is the default and is checked for both layouts it
may start; ``gpus_per_rank``, ``server.api_servers`` and ``ray.placement_timeout_s`` come from
the file or a flag and are refused up front when they cannot work."""

from __future__ import annotations

import pytest

from splitserve.cluster.cli import build_parser, serve_config_from_args
from splitserve.cluster.placement import resolve_local
from splitserve.cluster.serve_config import Mode, ServeConfig, ServerSpec, config_from_dict


def engine_config(cfg: ServeConfig, role, device: str):
    """The EngineConfig each group of ``role`` gets (mode auto resolved as the local router does)."""
    return resolve_local(cfg).service(device).engine.engine_config(role)


def _serve(*flags: str):
    return serve_config_from_args(build_parser().parse_args(["serve", *flags])).validate()


@pytest.mark.parametrize(("flags", "want"), [((), None), (("--async-scheduling",), True),
                                            (("--no-async-scheduling",), False)])
def test_flag_reaches_each_group(flags, want):
    cfg = _serve(*flags)
    assert cfg.async_scheduling is want
    for role in cfg.roles():
        assert engine_config(cfg, role, "cpu").scheduler.async_scheduling is want


def test_yaml_key_and_pipeline_stages():
    assert config_from_dict({"async_scheduling": False}).validate().async_scheduling is False
    tp2 = config_from_dict({"async_scheduling": True, "groups": {"decode": {"tp": 2}}}).validate()
    assert engine_config(tp2, "decode", "cpu").scheduler.async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling needs pp = 1.*decode"):
        config_from_dict({"async_scheduling": True, "groups": {"decode": {"pp": 2}}}).validate()
    with pytest.raises(ValueError, match="pp = 1"):
        _serve("--async-scheduling", "--prefill-pp", "2")


# ---- mode auto, shared GPUs, front-door processes, the placement deadline ---------------------


def test_mode_auto_is_the_default_and_asks_for_both_layouts():
    cfg = _serve()
    assert cfg.mode == Mode.AUTO == "auto" and cfg.roles() == ("prefill", "decode")
    assert config_from_dict({"mode": "auto"}).mode == "auto"
    assert config_from_dict({"mode": "aggregated"}).roles() == ("worker",)
    with pytest.raises(ValueError, match="mode must be one of .*auto"):
        config_from_dict({"mode": "split"})
    # auto may start either layout: both are checked up front.
    with pytest.raises(ValueError, match="auto mode needs at least one worker group"):
        config_from_dict({"groups": {"worker": {"count": 0}}})
    with pytest.raises(ValueError, match="async_scheduling needs pp = 1.*worker"):
        config_from_dict({"async_scheduling": True, "groups": {"worker": {"pp": 2}}})


def test_gpus_per_rank_shares_one_gpu_between_one_rank_groups():
    assert config_from_dict({"gpus_per_rank": 0.5}).gpus_per_rank == 0.5
    assert _serve("--gpus-per-rank", "0.5").gpus_per_rank == 0.5 and _serve().gpus_per_rank == 1.0
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=r"gpus_per_rank must be in \(0, 1\]"):
            config_from_dict({"gpus_per_rank": bad})
    with pytest.raises(ValueError, match="one-rank groups only; decode groups have tp x pp > 1"):
        config_from_dict({"gpus_per_rank": 0.5, "mode": "disaggregated", "groups": {"decode": {"tp": 2}}})
    with pytest.raises(ValueError, match="3 prefill and decode groups would need 1.5 GPUs.*at most 2 groups"):
        _serve("--gpus-per-rank", "0.5", "--decode-groups", "2")
    # Aggregated groups exchange no KV: any number may share GPUs.
    assert config_from_dict({"mode": "aggregated", "gpus_per_rank": 0.5, "groups": {"worker": {"count": 4}}})


def test_api_servers_default_follows_the_cpus(monkeypatch):
    assert config_from_dict({"server": {"api_servers": 3}}).server.resolved_api_servers() == 3
    assert _serve("--api-servers", "2").server.api_servers == 2
    for cpus, want in ((1, 1), (2, 1), (16, 2), (31, 3), (64, 4), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert ServerSpec().resolved_api_servers() == want, cpus
    with pytest.raises(ValueError, match="server.api_servers must be >= 1"):
        _serve("--api-servers", "0")


def test_placement_timeout_setting():
    assert config_from_dict({"ray": {"placement_timeout_s": 5}}).ray.placement_timeout_s == 5
    assert _serve("--placement-timeout", "7.5").ray.placement_timeout_s == 7.5
    with pytest.raises(ValueError, match="placement_timeout_s must be positive"):
        _serve("--placement-timeout", "0")


# ---- authentication fails closed ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_refuses_to_start(key):
    with pytest.raises(ValueError, match="api_key is empty"):
        ServeConfig(server=ServerSpec(api_key=key)).validate()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_api_key_file_refuses_to_start(tmp_path, content):
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(ValueError, match="is empty"):
        ServeConfig(server=ServerSpec(api_key_file=str(path))).validate()
    with pytest.raises(ValueError, match="cannot be read"):
        ServeConfig(server=ServerSpec(api_key_file=str(tmp_path / "missing"))).validate()


def test_a_key_without_tls_off_loopback_warns(caplog):
    ServeConfig(server=ServerSpec(api_key="k")).validate()
    assert "clear text" not in caplog.text  # loopback: fine
    ServeConfig(server=ServerSpec(api_key="k", host="0.0.0.0")).validate()
    assert "clear text" in caplog.text


def test_per_key_cache_salts_need_a_key(tmp_path):
    with pytest.raises(ValueError, match="cache_salt_per_key"):
        ServeConfig(server=ServerSpec(cache_salt_per_key=True)).validate()
    ServeConfig(server=ServerSpec(api_key="k", cache_salt_per_key=True)).validate()
    path = tmp_path / "cfg.yaml"
    path.write_text("server: {api_key: k, cache_salt_per_key: true}\n")
    from splitserve.cluster.serve_config import load_serve_config

    assert load_serve_config(path).server.cache_salt_per_key


# ---- FP8 weights (issue 18) ----------------------------------------------------------------------


def test_quantization_from_flag_or_yaml_reaches_each_group_and_a_bad_one_is_refused():
    for cfg in (_serve("--quantization", "fp8"), config_from_dict({"quantization": "fp8"}).validate()):
        assert cfg.quantization == "fp8"
        for role in cfg.roles():
            assert engine_config(cfg, role, "cpu").quantization == "fp8"
    assert engine_config(_serve(), "decode", "cpu").quantization is None
    with pytest.raises(ValueError, match="quantization must be null or one of .*fp8.*'int4'"):
        config_from_dict({"quantization": "int4"}).validate()
    with pytest.raises(SystemExit):  # argparse refuses it before any config is built
        build_parser().parse_args(["serve", "--quantization", "awq"])
