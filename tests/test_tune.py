"""Post-hoc tuning: frozen decoder, changed encoder, resume after SIGKILL, NaN stop, no lost work."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import selfconsist
from selfconsist.adapters.builtin import BuiltinVAE
from selfconsist.errors import NonFiniteLossError, SelfconsistError
from selfconsist.tune import TuneConfig, load_latents, lr_factor

from .conftest import run_cli

FAST = ["--batch-size", "32", "--eval-samples", "128", "--device", "cpu", "-q"]


def _tensors(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_tune_freezes_decoder_changes_encoder_and_records_metadata(tmp_path, digits_model):
    sha_in = _sha(digits_model)
    out = tmp_path / "tuned.safetensors"
    args = ["tune", str(digits_model), "--out", str(out), "--steps", "150", "--lr", "1e-3", *FAST]
    r = run_cli("-v", *args)  # a global flag before the command, and -q (in FAST) after it
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(str(out))
    assert _sha(digits_model) == sha_in  # the input is never modified
    before, after = _tensors(digits_model), _tensors(out)
    assert before.keys() == after.keys()
    dec = [k for k in before if k.startswith("decoder.")]
    enc = [k for k in before if k.startswith("encoder.")]
    assert dec and all(before[k] == after[k] for k in dec)  # byte-identical decoder
    assert any(before[k] != after[k] for k in enc)  # the encoder moved
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    import json

    assert json.loads(meta["selfconsist.tune_config"])["steps"] == 150
    assert meta["selfconsist.input_sha256"] == sha_in
    assert meta["selfconsist.version"] == selfconsist.__version__
    metrics = json.loads(meta["selfconsist.metrics"])
    assert {"before", "after"} <= set(metrics)
    assert metrics["after"]["sample_roundtrip_mse"]["value"] < metrics["before"]["sample_roundtrip_mse"]["value"]
    # the command as typed, rerunnable: global flags (-v, -q) out wherever they stood
    assert meta["selfconsist.command"] == "selfconsist " + shlex.join([a for a in args if a != "-q"])
    assert "sample_roundtrip_mse" in r.stderr  # the before/after table
    # with its verdicts and a summary that opens it, even under -q (it is a result)
    assert "lower is better" in r.stderr and "higher is better" in r.stderr
    assert re.search(r"→ .*   (better|worse|no significant change)$", r.stderr, re.M)
    assert max(len(ln) for ln in r.stderr.splitlines()[5:]) <= 80  # the per-metric lines
    assert "Improved" in r.stderr and "Got worse" in r.stderr
    assert "Decoder-responsive elements" in r.stderr
    assert "tune: step" not in r.stderr  # -q: no progress

    # info reads as text: no JSON escapes, no 16-digit floats; --json keeps the numbers
    r = run_cli("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "\\u" not in r.stdout and not re.search(r"\.0*[1-9]\d{6,}", r.stdout)
    assert "before → after" in r.stdout and "sample_roundtrip_mse" in r.stdout
    assert re.search(r"sample_roundtrip_mse +[\d.e-]+ ± [\d.e-]+ → [\d.e-]+ ± ", r.stdout)
    r = run_cli("info", str(out), "--json")
    assert json.loads(r.stdout)["metrics"]["after"] == metrics["after"]


def test_refuses_to_overwrite_and_to_write_over_input(tmp_path, digits_model):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    r = run_cli("tune", str(digits_model), "--out", str(out), "--steps", "5", *FAST)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"precious"
    vae = selfconsist.load(digits_model)
    with pytest.raises(SelfconsistError, match="input"):
        selfconsist.tune(vae, TuneConfig(steps=2, device="cpu"), out=digits_model, overwrite=True,
                         progress=False)
    r = run_cli("tune", str(digits_model), "--out", str(out), "--steps", "5", "--overwrite", *FAST)
    assert r.returncode == 0, r.stderr
    assert selfconsist.load(out).config.latent_dim == 16


def test_kill_and_resume_is_bit_identical(tmp_path, digits_model):
    """SIGKILL mid-run, resume, and end at exactly the weights of an uninterrupted run."""
    args = ["--steps", "400", "--save-every", "40", "--seed", "3", *FAST]
    full = tmp_path / "full.safetensors"
    r = run_cli("tune", str(digits_model), "--out", str(full), *args)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed.safetensors"
    state = tmp_path / "killed.safetensors.state.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfconsist", "tune", str(digits_model), "--out", str(out),
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state.exists() and not out.exists(), "the run should have been killed mid-way"
    assert not list(tmp_path.glob(".killed*"))  or all(p.is_dir() for p in tmp_path.glob(".killed*"))

    r = run_cli("tune", str(digits_model), "--out", str(out), "--resume", *args)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(full), _tensors(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not state.exists()


class NaNAfter(BuiltinVAE):
    """A built-in VAE whose encoder starts returning NaN after ``n`` calls."""

    calls = 0
    n = 40

    def encode(self, x):
        q = super().encode(x)
        NaNAfter.calls += 1
        if NaNAfter.calls > NaNAfter.n:
            q.logvar = q.logvar * float("nan")
        return q


def test_nan_loss_stops_keeps_last_good_state_and_writes_nothing(tmp_path, digits_model):
    base = selfconsist.load(digits_model)
    vae = NaNAfter(base.config, base.encoder, base.decoder)
    vae.source.path = digits_model
    NaNAfter.calls = 0
    NaNAfter.n = 2 * 10 + 1  # eval passes don't use encode twice; the 11th step sees NaN
    out = tmp_path / "nan.safetensors"
    cfg = TuneConfig(steps=50, batch_size=16, device="cpu", eval_samples=64, save_every=5)
    with pytest.raises(NonFiniteLossError, match="nan") as err:
        selfconsist.tune(vae, cfg, out=out, progress=False)
    assert "was not written" in str(err.value) and "periodic state" in str(err.value)
    assert not out.exists()
    state = torch.load(tmp_path / "nan.safetensors.state.pt", weights_only=True)
    assert 0 < state["step"] < 50
    for v in state["encoder"].values():
        assert torch.isfinite(v).all()


def test_nan_stop_exits_nonzero_from_cli(tmp_path):
    """A model whose weights are NaN fails with one line and a non-zero exit."""
    vae = selfconsist.load(_tiny(tmp_path))
    with torch.no_grad():
        next(vae.encoder.parameters()).fill_(float("nan"))
    bad = tmp_path / "nan_weights.safetensors"
    vae.save(bad)
    r = run_cli("tune", str(bad), "--out", str(tmp_path / "o.safetensors"), "--steps", "5", *FAST)
    assert r.returncode != 0 and "nan" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def _tiny(tmp_path: Path) -> Path:
    from selfconsist.models import ModelConfig

    path = tmp_path / "tiny.safetensors"
    BuiltinVAE(ModelConfig(latent_dim=4, hidden=16)).save(path)
    return path


def test_latents_file_source(tmp_path):
    import numpy as np

    vae = selfconsist.load(_tiny(tmp_path))
    np.save(tmp_path / "z.npy", np.random.randn(20, 4).astype("float32"))
    z = load_latents(tmp_path / "z.npy", (4,))
    assert z.shape == (20, 4)
    res = selfconsist.tune(vae, TuneConfig(steps=5, batch_size=8, device="cpu", eval_samples=32,
                                           latents=str(tmp_path / "z.npy")), progress=False)
    assert res.after["sample_roundtrip_mse"]["value"] >= 0
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), "float32"))
    with pytest.raises(SelfconsistError, match="shape"):
        load_latents(tmp_path / "bad.npy", (4,))


def test_lr_schedules():
    cfg = TuneConfig(steps=100, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) < 0.01
    lin = TuneConfig(steps=100, schedule="linear")
    assert lr_factor(50, lin) == pytest.approx(0.5)
    with pytest.raises(SelfconsistError):
        TuneConfig(schedule="wiggly")
    from selfconsist import runtime

    orig = runtime.cpu_has_bf16
    try:  # a CPU without bf16 units refuses bf16 with one clear error
        runtime.cpu_has_bf16 = lambda: False
        with pytest.raises(SelfconsistError, match="bf16 units"):
            selfconsist.tune(BuiltinVAE(selfconsist.models.ModelConfig(latent_dim=2, hidden=8)),
                             TuneConfig(steps=1, device="cpu", precision="bf16"), progress=False)
    finally:
        runtime.cpu_has_bf16 = orig


def test_bundled_example_default(tmp_path):
    """`selfconsist tune` with no model tunes the committed example."""
    r = run_cli("tune", "--steps", "20", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "digits_mlp_vae.selfconsist.safetensors").exists()


def test_default_out_names():
    from selfconsist.cli.tune import default_out

    assert default_out("dir/vae.safetensors") == Path("vae.selfconsist.safetensors")
    assert default_out("models/sd-vae/") == Path("sd-vae-selfconsist")
    assert default_out("owner/name") == Path("name-selfconsist")
    assert default_out("owner/name:vae") == Path("name-selfconsist")
    assert default_out("owner/name:sdxl_vae.safetensors") == Path("sdxl_vae.selfconsist.safetensors")


def test_the_resumable_state_is_written_right_after_the_before_measurement(digits_model, tmp_path, monkeypatch):
    """A kill during the first steps (before any --save-every) must not lose the before
    measurement, which takes minutes on an SD-size model: the state exists at step 0."""
    from selfconsist.io import state_path_for
    from selfconsist.tune import TuneRecipe

    out = tmp_path / "t.safetensors"
    seen = {}

    def killed(self):
        state = torch.load(state_path_for(out), weights_only=True)
        seen.update(step=state["step"], before=state["before"])
        raise KeyboardInterrupt

    monkeypatch.setattr(TuneRecipe, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        selfconsist.tune(str(digits_model), TuneConfig(steps=50, batch_size=8, device="cpu",
                                                       eval_samples=32, save_every=1000), out=out,
                         progress=False)
    assert seen["step"] == 0 and "sample_roundtrip_mse" in seen["before"]
    assert not out.exists()
