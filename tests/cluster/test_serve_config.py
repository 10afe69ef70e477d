"""`ServeConfig`: the async-scheduling switch from a flag or the YAML file reaches every group's
engine config, and asking for it where a group has several pipeline stages is refused before
anything starts (tp > 1 takes it)."""

from __future__ import annotations

import pytest

from splitserve.cluster.cli import build_parser, serve_config_from_args
from splitserve.cluster.groups import engine_config
from splitserve.cluster.serve_config import config_from_dict


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
