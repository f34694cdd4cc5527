"""The before/after measurement of tune is sized to the run."""

from __future__ import annotations

from selfconsist.budget import FIXED_SHARE, FLOOR_UNITS, TUNE_STEP_UNITS, plan_measurement


def test_default_run_keeps_full_measurement() -> None:
    # ColorMNIST MLP default: 5000 steps × 128, 16-d flat latent → the full, exact measurement.
    p = plan_measurement(5000, 128, (16,))
    assert (p.roundtrip_samples, p.probe_samples, p.probe_mode) == (1024, 64, "element")
    assert p.cost_units <= FIXED_SHARE * p.run_units


def test_short_run_on_big_spatial_latent_probes_per_channel() -> None:
    # SD-1.x at 64²: latent 4×8×8 = 256 elements; a 2-step batch-1 run used to probe per element.
    p = plan_measurement(2, 1, (4, 8, 8))
    assert p.probe_mode == "channel"
    assert p.cost_units <= 2 * FLOOR_UNITS
    assert p.roundtrip_samples >= 16 and p.probe_samples >= 8


def test_cost_within_share_for_default_runs_of_every_family() -> None:
    for shape in [(16,), (64,), (4, 8, 8), (4, 32, 32), (4, 64, 64), (16, 32, 32)]:
        p = plan_measurement(5000, 128, shape)
        assert p.cost_units <= FIXED_SHARE * 5000 * 128 * TUNE_STEP_UNITS, shape
    big = plan_measurement(5000, 128, (4, 64, 64))
    assert big.probe_mode == "channel"  # 16k elements: per element would be far over budget


def test_explicit_eval_samples_is_honoured() -> None:
    assert plan_measurement(2, 1, (4, 8, 8), 4).roundtrip_samples == 4
    assert plan_measurement(5000, 128, (16,), 300).roundtrip_samples == 300


def test_tune_measures_as_planned(digits_model) -> None:
    import io
    import logging

    import selfconsist
    from selfconsist.settings import default_of
    from selfconsist.tune import TuneConfig

    # Progress is logging (the "selfconsist" logger): capture it with a handler of our own.
    stream, logger = io.StringIO(), logging.getLogger("selfconsist")
    handler, level = logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        vae = selfconsist.load(digits_model)
        res = selfconsist.tune(vae, TuneConfig(steps=2, batch_size=4, device="cpu"),
                               progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    err = stream.getvalue()
    plan = plan_measurement(2, 4, tuple(vae.latent_shape))
    assert f"n={plan.roundtrip_samples}" in err and "measuring after" in err
    # a 2-step run measures on the floor budget, not on 1024 samples
    assert plan.roundtrip_samples < 1024
    from selfconsist.metrics import roundtrip_summary

    fresh = roundtrip_summary(selfconsist.load(digits_model), n=plan.roundtrip_samples, seed=1,
                              rho=default_of(TuneConfig, "rho"))
    assert res.before["sample_roundtrip_mse"] == fresh["sample_roundtrip_mse"]


def test_eval_fast_preset_and_probe_sizing() -> None:
    from selfconsist.evaluate import EvalConfig, fast_config, probe_max_elements

    fast = fast_config(EvalConfig(pgd_steps=7))
    assert (fast.samples, fast.pgd_steps, fast.responsive_samples, fast.bootstrap) == (256, 7, 16, 50)
    cfg = EvalConfig()
    assert probe_max_elements(cfg, 256) == cfg.max_responsive_elements  # 64·257 ≤ 2·1000·11
    # 64 × (d + 1) over budget: probe per channel (max_elements below d)
    assert probe_max_elements(EvalConfig(samples=100), 256) < 256


def test_eval_cli_fast(tmp_path, digits_model) -> None:
    import json

    from .conftest import run_cli

    r = run_cli("eval", str(digits_model), "--out", str(tmp_path / "ev"), "--fast", "--no-figures",
                "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "sample_roundtrip_mse" in json.dumps(m) and '"samples": 256' in json.dumps(m)
