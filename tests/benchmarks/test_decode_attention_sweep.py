"""benchmarks/decode_attention_sweep.py on CPU: its pure parts (byte counts, bandwidth
fraction, config specs, the stages' config lists, ranking, the table)."""

from __future__ import annotations

import pytest

from bench_modules import load_benchmark


@pytest.fixture(scope="module")
def sweep():
    pytest.importorskip("triton")
    return load_benchmark("decode_attention_sweep")


def test_bytes_moved_llama3_8b_batch64_4k(sweep):
    shape = sweep.MAIN
    assert shape.kv_bytes == 1 << 30  # 64 rows x 4096 tokens x 8 heads x 128 x bf16, K and V
    assert shape.qo_bytes == 1 << 20  # q and out: 64 x 32 x 128 x bf16 each
    assert shape.bytes_moved == (1 << 30) + (1 << 20)


def test_bandwidth_fraction(sweep):
    assert sweep.bandwidth_fraction(2e12, 1.0, 4e12) == pytest.approx(0.5)
    # 1 GiB + 1 MiB in 330 us against a 4.10 TB/s copy: ~0.80
    assert sweep.bandwidth_fraction(sweep.MAIN.bytes_moved, 330e-6, 4.10e12) == pytest.approx(0.7944, abs=1e-3)


def test_config_spec_round_trip_and_partial_override(sweep):
    DecodeConfig = sweep.DecodeConfig
    cfg = DecodeConfig.parse("block_n=32, warps=8;stages=4,programs_per_sm=16")
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.programs_per_sm) == (32, 8, 4, 16)
    assert cfg.min_partition == DecodeConfig().min_partition  # not named: the base's
    assert DecodeConfig.parse(cfg.spec()) == cfg
    base = DecodeConfig(block_n=128, num_warps=8)
    assert DecodeConfig.parse("num_stages=5", base) == DecodeConfig(block_n=128, num_warps=8, num_stages=5)
    assert DecodeConfig.parse("", base) == base


@pytest.mark.parametrize("spec", ["block_n=48", "warps=3", "stages=0", "tile=64", "block_n", "block_n=sixty"])
def test_bad_config_specs_are_refused(sweep, spec):
    with pytest.raises(ValueError):
        sweep.DecodeConfig.parse(spec)


def test_stage_config_lists(sweep):
    DecodeConfig = sweep.DecodeConfig
    base = DecodeConfig(min_partition=512, programs_per_sm=4)
    launch = sweep.launch_configs(base)
    assert len(launch) == len(set(launch)) == len(sweep.LAUNCH_SHAPES)
    assert all(c.min_partition == 512 and c.programs_per_sm == 4 for c in launch)
    splits = sweep.split_configs([base])
    assert sorted(c.programs_per_sm for c in splits) == [p for p in sweep.PROGRAMS_PER_SM if p != 4]
    assert {c.min_partition for c in sweep.partition_configs(base)} == set(sweep.MIN_PARTITIONS) - {512}


def fake_report(sweep):
    a, b, c = "block_n=64,warps=4,stages=3", "block_n=32,warps=4,stages=4", "block_n=128,warps=8,stages=3"
    rows = [
        {"shape": "b64_ctx4k", "config": a, "ok": True, "splits": 3, "time_us": 340.0, "TBps": 3.16,
         "frac_of_copy": 0.77, "rel_err": 3e-3},
        {"shape": "b64_ctx4k", "config": b, "ok": True, "splits": 3, "time_us": 320.0, "TBps": 3.36,
         "frac_of_copy": 0.82, "rel_err": 3e-3},
        {"shape": "b64_ctx4k", "config": c, "ok": False, "splits": 3, "error": "OutOfResources: shared memory"},
        {"shape": "b1_ctx8k", "config": a, "ok": True, "splits": 32, "time_us": 15.0, "TBps": 2.2,
         "frac_of_copy": 0.54, "rel_err": 3e-3},
    ]
    shapes = [{"name": "b64_ctx4k", "batch": 64, "context": 4096, "bytes_moved": 1 << 30},
              {"name": "b1_ctx8k", "batch": 1, "context": 8192, "bytes_moved": 1 << 25}]
    return {"rows": rows, "shapes": shapes, "copy_bw_TBps": 4.1, "default_config": a}


def test_ranking_skips_failures_and_sorts_by_time(sweep):
    report = fake_report(sweep)
    order = [r["config"] for r in sweep.ranked(report["rows"], "b64_ctx4k")]
    assert order == ["block_n=32,warps=4,stages=4", "block_n=64,warps=4,stages=3"]
    best = sweep.best_configs(report["rows"], "b64_ctx4k", 1)
    assert best == [sweep.DecodeConfig(block_n=32, num_warps=4, num_stages=4)]


def test_table_shows_every_row_and_the_failure(sweep):
    report = fake_report(sweep)
    report["best"] = {"b64_ctx4k": report["rows"][1]}
    text = sweep.format_table(report)
    assert "FAILED OutOfResources" in text
    rows = text[text.index("b64_ctx4k:"):]
    assert rows.index("block_n=32,warps=4,stages=4") < rows.index("block_n=64,warps=4,stages=3")  # fastest first
    assert "best b64_ctx4k: block_n=32,warps=4,stages=4" in text


def test_stages_run_in_order_within_budget_and_save_json(sweep, monkeypatch, tmp_path):
    """The stage logic with `measure` faked (no GPU): a time per config from its fields."""
    import argparse

    def fake_measure(case, shape, cfg, copy_bw, device):
        t = 300.0 + abs(cfg.block_n - 32) + 10 * abs(cfg.num_stages - 4) + abs(cfg.programs_per_sm - 16)
        return {"shape": shape.name, "config": cfg.spec(), "splits": 1, "ok": cfg.num_stages > 2, "time_us": t,
                "TBps": 3.0, "frac_of_copy": 0.75, "rel_err": 3e-3}

    monkeypatch.setattr(sweep, "measure", fake_measure)
    monkeypatch.setattr(sweep.Sweep, "case", lambda self, shape: None)
    args = argparse.Namespace(out=tmp_path / "sweep.json", budget_s=1e9, top=2)
    report = {"rows": [], "copy_bw": 4e12, "copy_bw_TBps": 4.0, "default_config": sweep.DECODE.spec(),
              "shapes": [{"name": s.name, "batch": s.batch, "context": s.context, "bytes_moved": s.bytes_moved}
                         for s in sweep.SHAPES]}
    sw = sweep.Sweep(args, report, "cpu", t_start=0.0)
    monkeypatch.setattr(sw, "elapsed", lambda: 1.0)
    sweep.sweep(sw, sweep.DECODE, [])
    main_rows = [r for r in report["rows"] if r["shape"] == sweep.MAIN.name]
    assert len(main_rows) == len({r["config"] for r in main_rows})  # nothing measured twice
    best = report["best"][sweep.MAIN.name]["config"]
    # the fake time ignores min_partition: the default's stays
    assert best == sweep.DecodeConfig.parse("block_n=32,warps=4,stages=4,programs_per_sm=16", sweep.DECODE).spec()
    assert report["recommendation"] == f'SPLITSERVE_DECODE_CONFIG="{best}"'
    assert {r["shape"] for r in report["rows"]} == {s.name for s in sweep.SHAPES}
    assert (tmp_path / "sweep.json").exists()

    # Out of budget: nothing more runs and the report says where it stopped.
    report["rows"].clear()
    monkeypatch.setattr(sw, "elapsed", lambda: 2e9)
    sweep.sweep(sw, sweep.DECODE, [])
    assert report["rows"] == [] and "budget" in report["stopped"]
