"""Defaults that adapt to the model (issue 21): the observation variance lowered to K times
the model's own sample round-trip error, and the one-line advice of a run that did not move."""

from __future__ import annotations

from pathlib import Path

import pytest

import selfconsist
from selfconsist.tune import TuneConfig, adapted_obs_var, advice_line, resolve_config

from .conftest import run_cli


class _Model:
    likelihood, obs_var = "gaussian", 1.0


def _cfg(**kw) -> TuneConfig:
    return resolve_config(None, TuneConfig(**kw)).config


def _fig(value: float, se: float = 0.0) -> dict:
    return {"sample_roundtrip_mse": {"value": value, "stderr": se}}


def test_obs_var_is_lowered_to_k_times_the_round_trip_error_only_when_above_it():
    e0 = _fig(0.002)
    assert adapted_obs_var(_cfg(obs_var_ratio=10), _Model(), e0) == pytest.approx(0.02)
    assert adapted_obs_var(_cfg(obs_var_ratio=1000), _Model(), e0) == 1.0  # v already below
    assert adapted_obs_var(_cfg(obs_var_ratio=0), _Model(), e0) == 1.0  # off
    assert adapted_obs_var(_cfg(obs_var_ratio=10, obs_var=0.5), _Model(), e0) == 0.5  # given wins
    bern = _Model()
    bern.likelihood = "bernoulli"
    assert adapted_obs_var(_cfg(obs_var_ratio=10), bern, e0) == 1.0
    assert adapted_obs_var(_cfg(obs_var_ratio=10), _Model(), {}) == 1.0  # nothing measured
    assert adapted_obs_var(_cfg(objective="cycle"), _Model(), e0) == 1.0  # avae only
    assert adapted_obs_var(_cfg(), _Model(), e0) == pytest.approx(0.02)  # K = 10 by default
    with pytest.raises(selfconsist.SelfconsistError, match="obs-var-ratio"):
        TuneConfig(obs_var_ratio=-1)


def test_advice_only_when_the_round_trip_did_not_clearly_fall():
    cfg = _cfg()
    assert advice_line(cfg, _Model(), 1.0, _fig(0.01, 1e-4), _fig(0.005, 1e-4)) is None  # −50%
    line = advice_line(cfg, _Model(), 1.0, _fig(0.01, 1e-3), _fig(0.0098, 1e-3))
    assert line is not None and "\n" not in line and "within noise" in line
    assert "--obs-var 0.02" in line  # min(v/10, 2·e₀) to one significant digit
    line = advice_line(cfg, _Model(), 1.0, _fig(0.01, 1e-6), _fig(0.0097, 1e-6))  # −3%, significant
    assert line is not None and "under 10%" in line
    assert "--obs-var 0.02" in line
    assert "--obs-var 0.1" in advice_line(cfg, _Model(), 1.0, _fig(0.5), _fig(0.5))  # v/10 < 2·e₀
    assert "for the worse" in advice_line(cfg, _Model(), 1.0, _fig(0.01, 1e-4), _fig(0.2, 1e-3))
    bern = _Model()
    bern.likelihood = "bernoulli"
    assert "--lambda-rec 20" in advice_line(cfg, bern, 1.0, _fig(0.01), _fig(0.01))
    # the cycle objective's aim (real images' loops) is not the sample round trip: no advice
    assert advice_line(_cfg(objective="cycle"), _Model(), 1.0, _fig(0.01), _fig(0.01)) is None


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory) -> Path:
    """A digits MLP VAE trained with v = 1 (a likelihood far weaker than its round-trip error)."""
    from selfconsist.train import TrainConfig, train

    path = tmp_path_factory.mktemp("weak") / "weak.safetensors"
    train(TrainConfig(data="digits", steps=200, device="cpu", latent_dim=8, hidden=64, obs_var=1.0),
          path, progress=False)
    return path


def test_tune_adapts_v_and_records_it(weak_model, tmp_path):
    vae = selfconsist.load(weak_model)
    res = selfconsist.tune(vae, TuneConfig(steps=5, batch_size=16, eval_samples=64, device="cpu",
                                           obs_var_ratio=10), progress=False)
    e0 = res.before["sample_roundtrip_mse"]["value"]
    assert res.obs_var == pytest.approx(10 * e0) and res.obs_var < 1.0
    res = selfconsist.tune(selfconsist.load(weak_model), TuneConfig(
        steps=5, batch_size=16, eval_samples=64, device="cpu", obs_var_ratio=0), progress=False)
    assert res.obs_var == 1.0


def test_cli_run_that_does_not_move_ends_with_one_advice_line(weak_model, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run_cli("tune", str(weak_model), "--out", str(out), "--steps", "2", "--lr", "1e-7",
                "--obs-var-ratio", "0", "--batch-size", "16", "--eval-samples", "128",
                "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tune: the sample round trip changed") and "--obs-var" in last
    assert r.stderr.count("--obs-var ") == 1
