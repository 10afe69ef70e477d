"""`ServeConfig`: the async-scheduling switch from a flag or the YAML file reaches every group's
engine config, and asking for it where a group has several pipeline stages is refused before
anything starts (tp > 1 takes it)."""

from __future__ import annotations

import pytest

from splitserve.cluster.cli import build_parser, serve_config_from_args
from splitserve.cluster.groups import engine_config
from splitserve.cluster.serve_config import ServerSpec, config_from_dict


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


def test_api_servers_default_follows_the_cpus(monkeypatch):
    assert config_from_dict({"server": {"api_servers": 3}}).server.resolved_api_servers() == 3
    assert _serve("--api-servers", "2").server.api_servers == 2
    for cpus, want in ((1, 1), (2, 1), (16, 2), (31, 3), (64, 4), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert ServerSpec().resolved_api_servers() == want, cpus
    with pytest.raises(ValueError, match="server.api_servers must be >= 1"):
        _serve("--api-servers", "0")
