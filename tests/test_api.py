"""What a diffusers/hf user tries first: load and tune in-memory models, the package layout,
the loading flags on every command, file-name hints, path-vs-Hub-id, --version, push's flags."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfconsist
from selfconsist import hub
from selfconsist.adapters import ldm_keys
from selfconsist.errors import SelfconsistError
from selfconsist.hub import is_repo_ref

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = selfconsist.TuneConfig(steps=3, batch_size=2, lr=1e-3, device="cpu", eval_samples=4, seed=0)
TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
            sample_size=32, latent_channels=4, scaling_factor=0.5, shift_factor=0.1)


def tiny_kl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**TINY).eval()


# --- the library's shape ------------------------------------------------------------------

def test_no_module_outside_cli_imports_cli():
    pkg = ROOT / "selfconsist"
    offenders = []
    for f in pkg.rglob("*.py"):
        if "cli" in f.relative_to(pkg).parts[:1] or f.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                names = [a.name for a in node.names]
                if "cli" in mod.lstrip(".").split(".")[:2] or (mod.strip(".") == "" and "cli" in names) \
                        or mod.startswith("selfconsist.cli"):
                    offenders.append(f"{f.relative_to(ROOT)}: from {mod} import {names}")
            elif isinstance(node, ast.Import):
                offenders += [f"{f.relative_to(ROOT)}: import {a.name}" for a in node.names
                              if a.name.startswith("selfconsist.cli")]
    assert not offenders, offenders


def test_import_submodule_gives_the_module_and_functions_stay_callable():
    code = ("import types, logging, selfconsist.train as t, selfconsist.tune as u, selfconsist.evaluate as e\n"
            "import selfconsist\n"
            "assert isinstance(t, types.ModuleType) and hasattr(t, 'TrainConfig'), t\n"
            "assert isinstance(u, types.ModuleType) and hasattr(u, 'TuneConfig'), u\n"
            "assert isinstance(e, types.ModuleType) and hasattr(e, 'EvalConfig'), e\n"
            "assert callable(selfconsist.tune) and callable(selfconsist.train)\n"
            "assert logging.getLogger('huggingface_hub').level == logging.NOTSET\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_resolve_restores_huggingface_hub_logging(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hf_logging

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with pytest.raises(SelfconsistError):
            hub.resolve("owner/not-cached")
        assert hf_logging.get_verbosity() == hf_logging.INFO  # was left at ERROR
    finally:
        hf_logging.set_verbosity(before)


# --- in-memory models ---------------------------------------------------------------------

@pytest.mark.diffusers
def test_tune_autoencoder_kl_returns_a_tuned_copy_and_leaves_the_callers_model_alone():
    model = tiny_kl().half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = selfconsist.tune(model, QUICK, progress=False)
    # the caller's model: same dtype, same weights, still trainable everywhere
    assert all(p.dtype == torch.float16 and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tuned = result.model
    assert type(tuned) is type(model) and tuned is not model
    assert all(p.dtype == torch.float16 and p.requires_grad for p in tuned.parameters())
    state = tuned.state_dict()
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("encoder."))
    assert all(torch.equal(state[k], before[k]) for k in state if k.startswith("decoder."))


@pytest.mark.diffusers
def test_load_accepts_models_adapters_and_forwards_options():
    model = tiny_kl()
    vae = selfconsist.load(model, image_size=16, scaling_factor=0.25)
    assert vae.image_size == (16, 16) and vae.model.config.scaling_factor == 0.25
    assert model.config.scaling_factor == 0.5 and vae.model is not model
    assert selfconsist.load(vae) is vae
    with pytest.raises(SelfconsistError, match="cannot load a Linear"):
        selfconsist.load(torch.nn.Linear(2, 2))


def test_tune_accepts_a_path(digits_model, tmp_path):
    result = selfconsist.tune(str(digits_model), QUICK, tmp_path / "t.safetensors", progress=False)
    assert result.model is result.vae and (tmp_path / "t.safetensors").is_file()


# --- paths and Hub ids --------------------------------------------------------------------

def test_mistyped_local_paths_are_never_hub_ids():
    for text in ("examples/nonexistent.safetensors", "./owner/name", "owner/name.safetensors",
                 "tests/nothing_here", "selfconsist/missing"):
        assert not is_repo_ref(text), text
    for text in ("stabilityai/sd-vae-ft-mse", "owner/name:vae", "owner/sd-3.5-large",
                 "owner/name:vae.safetensors"):
        assert is_repo_ref(text), text


def test_mistyped_path_says_missing_without_trying_the_hub():
    # No HF_HUB_OFFLINE: a Hub lookup would print "not in the local Hugging Face cache".
    r = run_cli("info", "examples/nonexistent.safetensors", cwd=ROOT)
    assert r.returncode == 2
    assert "no such file or folder" in r.stderr and "Hugging Face" not in r.stderr


# --- file-name hints ----------------------------------------------------------------------

SD_ARCH = {"latent_channels": 4, "block_out_channels": (128, 256, 512, 512), "use_quant_conv": True,
           "layers_per_block": 2, "in_channels": 3}


@pytest.mark.parametrize("name, want, how", [
    ("cinematic_xl_vae.safetensors", "sdxl", "hint"),  # "ema" inside "cinematic" made it SD
    ("my_softedge_vae.safetensors", "sd", "default"),  # "ft" inside "softedge" made it a hint
    ("vae-ft-mse-840000-ema-pruned.safetensors", "sd", "hint"),
    ("sdxl_vae.safetensors", "sdxl", "hint"),
    ("ponyDiffusionV6XL_vae.safetensors", "sdxl", "hint"),
    ("sd_xl_base_1.0_vae.safetensors", "sdxl", "hint"),
])
def test_file_name_hints_match_whole_words(name, want, how):
    known, got_how = ldm_keys.match_known(SD_ARCH, name)
    assert (known.name, got_how) == (want, how)


@pytest.mark.diffusers
def test_guessed_statistics_are_announced(tmp_path, caplog):
    from safetensors.torch import save_file

    from selfconsist.adapters.ldm_keys import ldm_state_dict

    big = {**TINY, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(**big)
    sd = {k: v.half().contiguous() for k, v in ldm_state_dict(model.state_dict()).items()}
    path = tmp_path / "cinematic_xl_vae.safetensors"
    save_file(sd, str(path))
    vae = selfconsist.load(path, image_size=16)
    notes = [r.getMessage() for r in caplog.records
             if r.name == "selfconsist" and r.levelname == "WARNING"]  # stderr, even unconfigured
    assert vae.model.config.scaling_factor == pytest.approx(0.13025)
    assert len(notes) == 1 and notes[0].startswith("note:") and "guessed from the file name" in notes[0]
    assert selfconsist.load(path, image_size=16, model_type="sd").model.config.scaling_factor == \
        pytest.approx(0.18215)


# --- the command line ---------------------------------------------------------------------

LOAD_FLAGS = ("--image-size", "--revision", "--variant", "--model-type", "--scaling-factor",
              "--shift-factor", "--config", "--enable-tiling", "--gradient-checkpointing")


def test_every_loading_flag_on_tune_eval_and_info():
    from typer.main import get_command

    from selfconsist.cli import _register, app

    _register()
    group = get_command(app)
    for name in ("tune", "eval", "info"):
        opts = {o for p in group.commands[name].params for o in p.opts}
        missing = [f for f in LOAD_FLAGS if f not in opts]
        assert not missing, (name, missing)


def test_version_flag():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"selfconsist {selfconsist.__version__}"


@pytest.mark.diffusers
def test_tuned_single_file_reloads_at_its_size_and_statistics_from_the_cli(tmp_path):
    from safetensors.torch import save_file

    from selfconsist.adapters.ldm_keys import ldm_state_dict

    src = tmp_path / "mystery_vae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(tiny_kl().state_dict()).items()},
              str(src))
    out = tmp_path / "tuned.safetensors"
    r = run_cli("tune", str(src), "--out", str(out), "--steps", "2", "--batch-size", "2",
                "--eval-samples", "4", "--device", "cpu", "--image-size", "32x32",
                "--scaling-factor", "0.3", "--shift-factor", "0.05", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("info", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["image_size"] == [32, 32] and info["scaling_factor"] == 0.3
    assert info["shift_factor"] == 0.05
    r = run_cli("info", str(out), "--json", "--image-size", "64")
    assert json.loads(r.stdout)["image_size"] == [64, 64]


def test_push_takes_repo_id_first_like_hf_upload(tmp_path, digits_model):
    dest = tmp_path / "preview"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run_cli("push", "me/tuned", str(digits_model), "--dry-run", str(dest), "--license", "mit",
                "--commit-message", "m", "--commit-description", "d", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(dest) and (dest / "README.md").is_file()
    assert (dest / digits_model.name).read_bytes() == digits_model.read_bytes()
    r = run_cli("push", "me/tuned", env=env)
    assert r.returncode == 2 and "OUTDIR" in r.stderr


@pytest.mark.pythae
def test_tune_pythae_model_returns_a_tuned_pythae_model():
    models = pytest.importorskip("pythae.models")
    torch.manual_seed(0)
    model = models.VAE(models.VAEConfig(input_dim=(1, 8, 8), latent_dim=4, reconstruction_loss="mse"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = selfconsist.tune(model, QUICK, progress=False).model
    assert type(tuned) is type(model) and tuned is not model and tuned.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items()
               if k.startswith("encoder."))


def test_card_says_library_diffusers_for_diffusers_folders():
    from selfconsist import modelcard

    info = modelcard.CardInfo(repo_id="me/vae", model_kind="diffusers")
    assert modelcard.front_matter(info)["library_name"] == "diffusers"
    info = modelcard.CardInfo(repo_id="me/vae", model_kind="builtin")
    assert modelcard.front_matter(info)["library_name"] == "selfconsist"
