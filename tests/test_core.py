"""Package, adapters, built-in models, data loading, IO and the CLI's error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import selfconsist
from selfconsist.adapters import get_adapter_class
from selfconsist.adapters.builtin import BuiltinVAE
from selfconsist.data import colorize, load_dataset, read_idx
from selfconsist.errors import CheckpointError, DataError, SelfconsistError
from selfconsist.models import ModelConfig

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


# --- built-in models and the adapter protocol --------------------------------------------------
@pytest.mark.parametrize("arch,shape", [("mlp", (3, 28, 28)), ("conv", (1, 8, 8)), ("conv", (3, 64, 64))])
def test_builtin_models_encode_decode_save_load(tmp_path, arch, shape):
    vae = BuiltinVAE(ModelConfig(arch=arch, data_shape=shape, latent_dim=12, hidden=32, channels=(8, 16)))
    x = torch.rand(4, *shape)
    q = vae.encode(x)
    assert q.mean.shape == q.logvar.shape == (4, 12)
    assert vae.decode(q.mean).shape == (4, *shape)
    path = tmp_path / "m.safetensors"
    vae.save(path, {"selfconsist.note": "hello"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["selfconsist.config"])["arch"] == arch
    again = selfconsist.load(path)
    assert isinstance(again, BuiltinVAE) and again.metadata["selfconsist.note"] == "hello"
    assert torch.equal(again.encode(x).mean, vae.encode(x).mean)


def test_conv_rejects_bad_sizes():
    with pytest.raises(SelfconsistError, match="divisible"):
        ModelConfig(arch="conv", data_shape=(1, 10, 10), channels=(8, 16))
    with pytest.raises(SelfconsistError, match="64"):
        ModelConfig(arch="conv", data_shape=(1, 128, 128))


def test_prior_sampling_uses_prior_and_generator():
    vae = BuiltinVAE(ModelConfig(latent_dim=5))
    a = vae.sample_prior(3, torch.Generator().manual_seed(1))
    b = vae.sample_prior(3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 5) and torch.equal(a, b)


def test_encoder_state_roundtrip():
    vae = BuiltinVAE(ModelConfig(latent_dim=5, hidden=16))
    state = vae.encoder_state()
    with torch.no_grad():
        for p in vae.encoder_parameters():
            p.add_(1.0)
    vae.load_encoder_state(state)
    assert all(torch.equal(state[f"0.{k}"], v) for k, v in vae.encoder.state_dict().items())


def test_adapter_spec_resolution(tmp_path):
    assert get_adapter_class("builtin") is BuiltinVAE
    cls = get_adapter_class(f"{ROOT}/examples/custom_adapter.py:TinyVAEAdapter")
    assert cls.name == "tiny-vae"
    for bad in ("nope", f"{ROOT}/examples/custom_adapter.py:Missing", "missing.py:X"):
        with pytest.raises(SelfconsistError):
            get_adapter_class(bad)


# --- data --------------------------------------------------------------------------------------
def test_digits_and_colormnist_determinism():
    d = load_dataset("digits")
    assert d.x.shape == (1797, 1, 8, 8) and 0 <= d.x.min() and d.x.max() <= 1 and d.y is not None
    x = torch.rand(50, 1, 4, 4)
    a, b, c = colorize(x, 0), colorize(x, 0), colorize(x, 1)
    assert a.shape == (50, 3, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    # every image is the grey image with some channels switched on, never all off
    on = (a.flatten(2).amax(2) > 0) | (x.flatten(2).amax(2) == 0)
    assert on.any(1).all()


def test_idx_gz_and_raw(tmp_path):
    import gzip

    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") * 2 + arr.tobytes()
    (tmp_path / "a-images-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "b-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw)
    assert np.array_equal(read_idx(tmp_path / "a-images-idx3-ubyte"), arr)
    assert np.array_equal(read_idx(tmp_path / "b-images-idx3-ubyte.gz"), arr)
    (tmp_path / "c-images-idx3-ubyte").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "c-images-idx3-ubyte")


def test_npy_npz_and_folder(tmp_path):
    from PIL import Image

    np.save(tmp_path / "x.npy", np.random.rand(5, 8, 8).astype(np.float32))
    assert load_dataset(str(tmp_path / "x.npy")).x.shape == (5, 1, 8, 8)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 6, 6, 3), np.uint8), y=np.arange(4))
    d = load_dataset(str(tmp_path / "x.npz"))
    assert d.x.shape == (4, 3, 6, 6) and d.y.tolist() == [0, 1, 2, 3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert load_dataset(str(folder)).x.shape == (3, 3, 8, 8)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(grey / f"{i}.png")
    assert load_dataset(str(grey)).x.shape == (2, 1, 8, 8)


def test_bad_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG"):
        load_dataset(str(tmp_path / "empty"))
    np.save(tmp_path / "bad.npy", np.random.rand(5, 3).astype(np.float32))
    with pytest.raises(DataError, match="expected images"):
        load_dataset(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "nan.npy", np.full((2, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npy"))
    with pytest.raises(DataError, match="no such"):
        load_dataset(str(tmp_path / "missing.npz"))


# --- checkpoints -------------------------------------------------------------------------------
def test_bad_checkpoints_raise_clear_errors(tmp_path, digits_model):
    good = digits_model.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="truncated"):
        selfconsist.load(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        selfconsist.load(tmp_path / "corrupt.safetensors")
    with pytest.raises(CheckpointError, match="no adapter recognises"):
        selfconsist.load(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a selfconsist built-in"):
        selfconsist.load(tmp_path / "plain.safetensors", adapter="builtin")
    with pytest.raises(CheckpointError, match="no such"):
        selfconsist.load(tmp_path / "missing.safetensors")


# --- the CLI -----------------------------------------------------------------------------------
def test_help_explains_every_option():
    for cmd in ([], ["info"], ["train"], ["tune"], ["eval"], ["push"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
    r = run_cli("train", "--help")
    for opt in ("--objective", "--rho", "--steps", "--batch-size", "--lr", "--seed", "--device", "--resume"):
        assert opt in r.stdout


@pytest.fixture
def bad_files(tmp_path, digits_model):
    good = digits_model.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[:100])
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage" * 3)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    return tmp_path


@pytest.mark.parametrize("args,needle", [
    (["info", "{d}/missing.safetensors"], "no such"),
    (["info", "{d}/trunc.safetensors"], "truncated"),
    (["info", "{d}/corrupt.safetensors"], "safetensors"),
    (["info", "{d}/plain.safetensors"], "--adapter"),
    (["info", "{model}", "--adapter", "nope"], "unknown adapter"),
    (["info", "selfconsist-test/definitely-not-cached"], "selfconsist-test/definitely-not-cached"),
    (["info", "{model}", "--adapter", "{d}/x.py:Nope"], "does not exist"),
    (["tune", "{d}/trunc.safetensors", "--out", "{d}/o.safetensors"], "truncated"),
    (["tune", "{model}", "--out", "{d}/o.safetensors", "--rho", "1.5"], "rho"),
    (["tune", "{model}", "--out", "{d}/o.safetensors", "--image-size", "64"], "image-size"),
    (["train", "--out", "{d}/o.safetensors", "--data", "{d}/nothing"], "no such"),
    (["train", "--out", "{d}/o.safetensors", "--objective", "gan"], "objective"),
])
def test_bad_invocations_one_red_line_exit_2(bad_files, digits_model, args, needle):
    args = [a.format(d=bad_files, model=digits_model) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
    assert not (bad_files / "o.safetensors").exists()


def test_debug_shows_traceback(bad_files):
    r = run_cli("info", str(bad_files / "trunc.safetensors"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_info_reports_shapes_and_counts(digits_model):
    r = run_cli("info", str(digits_model), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["adapter"] == "builtin" and info["latent_shape"] == [16]
    assert info["data_shape"] == [1, 8, 8] and info["data_range"] == [0.0, 1.0]
    assert info["encoder_parameters"] > 0 and info["decoder_parameters"] > 0
    assert "nominal" in info["priors"]


@pytest.mark.slow
def test_train_cli_acceptance(tmp_path):
    """The issue's command: 300 AVAE steps on digits, well under a minute, loadable result."""
    import time

    out = tmp_path / "m.safetensors"
    t0 = time.time()
    r = run_cli("train", "--model", "mlp", "--data", "digits", "--objective", "avae", "--steps", "300",
                "--out", str(out), "--device", "cpu")
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 60
    with safe_open(str(out), "pt") as f:
        cfg = json.loads(f.metadata()["selfconsist.config"])
        train_cfg = json.loads(f.metadata()["selfconsist.train_config"])
        precision = f.metadata()["selfconsist.train_precision"]
    assert cfg["arch"] == "mlp" and cfg["latent_dim"] == 64 and train_cfg["objective"] == "avae"
    # every option not typed took TrainConfig's own default: the CLI declares none of its own
    from dataclasses import asdict

    from selfconsist.train import TrainConfig

    typed = {"model": "mlp", "data": "digits", "objective": "avae", "steps": 300, "device": "cpu"}
    expected = json.loads(json.dumps(asdict(TrainConfig(**typed))))
    assert train_cfg == expected
    assert precision == "fp32"  # the default
    vae = selfconsist.load(out)
    x = load_dataset("digits").x[:8]
    q = vae.encode(x)
    assert torch.isfinite(q.mean).all() and vae.decode(q.mean).shape == x.shape


def test_train_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from selfconsist.train import TrainConfig, train

    recipe = sys.modules["selfconsist.train"]
    cfg = TrainConfig(data="digits", steps=30, save_every=10, latent_dim=4, hidden=16, device="cpu")
    full = train(cfg, tmp_path / "full.safetensors", progress=False)

    # Interrupt a second run at step 25 (states were written at steps 10 and 20), then resume.
    original = recipe.check_finite

    def stop_at_25(step, loss):
        if step == 25:
            raise KeyboardInterrupt
        original(step, loss)

    part = tmp_path / "part.safetensors"
    monkeypatch.setattr(recipe, "check_finite", stop_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, part, progress=False)
    monkeypatch.setattr(recipe, "check_finite", original)
    assert not part.exists() and (tmp_path / "part.safetensors.state.pt").exists()
    other = TrainConfig(**{**cfg.__dict__, "lr": 5e-4})
    with pytest.raises(SelfconsistError, match="other settings"):
        train(other, part, resume=True, progress=False)
    resumed = train(cfg, part, resume=True, progress=False)
    for a, b in zip(full.state_tensors().values(), resumed.state_tensors().values(), strict=True):
        assert torch.equal(a, b)
    assert not (tmp_path / "part.safetensors.state.pt").exists()


def test_custom_adapter_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_adapter.py"), "--steps", "50",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sample_roundtrip_mse" in r.stdout
    tuned = tmp_path / "tiny_vae.tuned.safetensors"
    assert tuned.exists()
    r = run_cli("info", str(tuned), "--adapter", f"{ROOT}/examples/custom_adapter.py:TinyVAEAdapter", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["latent_shape"] == [8]
