"""What every load checks, whatever the adapter: that each load option set applies to the
adapter that loads the model, and that the weights are finite; and that model cards ask the
adapter registry what a checkpoint is. Tiny models are built in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import selfconsist
from selfconsist.adapters import LoadOptions, available_adapters, get_adapter_class
from selfconsist.errors import SelfconsistError
from selfconsist.io import read_safetensors_header

QUICK_TUNE = ["--steps", "2", "--batch-size", "2", "--eval-samples", "4", "--device", "cpu", "-q"]
TINY_KL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
               sample_size=32, latent_channels=4)


def _cli(capsys, args: list[str]) -> tuple[int, str, list[str]]:
    """Run the CLI in-process: exit code, stdout and the non-empty stderr lines."""
    from selfconsist.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def _one_error_line(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _tiny_kl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**TINY_KL).eval()


@pytest.fixture(scope="module")
def pythae_folder(tmp_path_factory) -> Path:
    models = pytest.importorskip("pythae.models")
    torch.manual_seed(0)
    model = models.VAE(models.VAEConfig(input_dim=(1, 8, 8), latent_dim=4))
    folder = tmp_path_factory.mktemp("pythae") / "vae"
    model.save(str(folder))
    return folder


# --- load options ---------------------------------------------------------------------------

def test_an_option_that_does_not_apply_is_refused_by_the_cli(digits_model, capsys):
    code, out, err = _cli(capsys, ["info", str(digits_model), "--scaling-factor", "0.5"])
    _one_error_line(code, err, "--scaling-factor does not apply to builtin models",
                    "(it applies to: diffusers)")
    assert out == ""
    code, _, err = _cli(capsys, ["info", str(digits_model), "--enable-tiling"])
    _one_error_line(code, err, "--enable-tiling does not apply to builtin models")


def test_an_option_that_does_not_apply_to_pythae_is_refused(pythae_folder, capsys):
    code, _, err = _cli(capsys, ["info", str(pythae_folder), "--scaling-factor", "0.5"])
    _one_error_line(code, err, "--scaling-factor does not apply to pythae models",
                    "(it applies to: diffusers)")
    code, _, err = _cli(capsys, ["info", str(pythae_folder), "--image-size", "16"])
    _one_error_line(code, err, "--image-size does not apply to pythae models")
    assert selfconsist.load(pythae_folder, data_range=(-1.0, 1.0)).data_range == (-1.0, 1.0)


def test_an_option_that_does_not_apply_is_refused_in_python(digits_model):
    with pytest.raises(SelfconsistError, match=r"--scaling-factor does not apply to builtin models"):
        selfconsist.load(digits_model, scaling_factor=0.5)
    with pytest.raises(SelfconsistError, match=r"data_range does not apply to builtin models "
                                               r"\(it applies to: pythae\)"):
        selfconsist.load(digits_model, data_range=(0.0, 1.0))
    with pytest.raises(SelfconsistError, match="unknown load option 'scalling_factor'"):
        selfconsist.load(digits_model, scalling_factor=0.5)  # a typo no longer does nothing
    # trust_remote_code concerns the whole load (the Hub download too): every adapter takes it
    assert selfconsist.load(digits_model, trust_remote_code=True).name == "builtin"


def test_in_memory_models_are_checked_too():
    pytest.importorskip("diffusers")
    with pytest.raises(SelfconsistError, match="data_range does not apply to diffusers models"):
        selfconsist.load(_tiny_kl(), data_range=(0.0, 1.0))
    assert selfconsist.load(_tiny_kl(), tiling=True).model.use_tiling


def test_one_load_options_class_one_name_per_knob():
    from selfconsist import loading
    from selfconsist.adapters.options import option_label
    from selfconsist.cli.common import LOAD_OPTIONS

    assert loading.LoadOptions is LoadOptions is selfconsist.LoadOptions
    names = {f.name for f in dataclasses.fields(LoadOptions)}
    assert set(LOAD_OPTIONS) <= names and "enable_tiling" not in names
    for name in available_adapters():  # the registry knows what each adapter takes
        assert get_adapter_class(name).load_options <= names, name
    for name, (_, opt) in LOAD_OPTIONS.items():  # each CLI flag is the one LoadOptions names
        assert opt.param_decls[0].split("/")[0] == option_label(name)
    assert option_label("tiling") == "--enable-tiling"
    # only what is set travels; False is a setting too (--no-gradient-checkpointing)
    assert LoadOptions(tiling=True, gradient_checkpointing=False).given() == {
        "tiling": True, "gradient_checkpointing": False}


# --- non-finite weights ---------------------------------------------------------------------

def test_builtin_model_with_a_nan_weight_is_refused_by_tune(digits_model, tmp_path, capsys):
    tensors = load_file(str(digits_model))
    meta = read_safetensors_header(digits_model)["__metadata__"]
    name = sorted(k for k in tensors if k.startswith("encoder.") and k.endswith(".weight"))[0]
    tensors[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = tmp_path / "o.safetensors"
    code, _, err = _cli(capsys, ["tune", str(bad), "-o", str(out), *QUICK_TUNE])
    _one_error_line(code, err, f"tensor {name} holds 1 NaN value")
    assert "--lr" not in err[0] and not out.exists()
    with pytest.raises(SelfconsistError, match=f"tensor {name} holds 1 NaN"):
        selfconsist.load(bad)


@pytest.mark.diffusers
def test_diffusers_models_with_a_non_finite_weight_are_refused(tmp_path, capsys):
    from selfconsist.adapters.ldm_convert import ldm_state_dict

    model = _tiny_kl()
    with torch.no_grad():
        model.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "folder")
    out = tmp_path / "o"
    code, _, err = _cli(capsys, ["tune", str(tmp_path / "folder"), "-o", str(out), *QUICK_TUNE])
    _one_error_line(code, err, "tensor encoder.conv_in.weight holds 1 NaN value")
    assert not out.exists()
    # a single LDM-layout file: the tensor is named by its key in the file
    sd = ldm_state_dict(_tiny_kl().state_dict())
    sd["encoder.down.0.block.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vae.safetensors"))
    code, _, err = _cli(capsys, ["info", str(tmp_path / "vae.safetensors"),
                                 "--scaling-factor", "0.5"])  # (no note on a guessed factor)
    _one_error_line(code, err, "tensor encoder.down.0.block.0.conv1.weight holds 1 Inf value")
    # and an in-memory model
    with pytest.raises(SelfconsistError, match="encoder.conv_in.weight holds 1 NaN"):
        selfconsist.load(model)


def test_custom_adapter_model_with_a_nan_weight_is_refused(tmp_path, capsys):
    import sys

    spec = f"{Path(__file__).resolve().parents[1]}/examples/custom_adapter.py:TinyVAEAdapter"
    network = sys.modules[get_adapter_class(spec).__module__].TinyVAE  # the user's own model
    state = {k: v.contiguous() for k, v in network().state_dict().items()}
    state["dec.0.bias"][3] = float("-inf")
    save_file(state, str(tmp_path / "tiny.safetensors"))
    code, _, err = _cli(capsys, ["info", str(tmp_path / "tiny.safetensors"), "--adapter", spec])
    _one_error_line(code, err, "tensor decoder.0.bias holds 1 Inf value")


# --- model cards ask the registry -----------------------------------------------------------

@pytest.mark.diffusers
def test_a_single_file_ldm_vae_gets_the_latent_diffusion_card(tmp_path, digits_model):
    from selfconsist import hub, modelcard
    from selfconsist.adapters.ldm_convert import ldm_state_dict

    model = _tiny_kl()
    path = tmp_path / "sdxl_vae.tuned.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(model.state_dict()).items()}, str(path))
    assert modelcard.model_kind(path) == "ldm-single-file"
    files = hub.plan_upload(hub.find_bundle(path), "me/vae")
    card = files["README.md"].decode()
    assert 'AutoencoderKL.from_single_file(hf_hub_download("me/vae", "sdxl_vae.tuned.safetensors"))' \
        in card and "ComfyUI" in card
    # the other kinds are unchanged
    model.save_pretrained(tmp_path / "folder")
    assert modelcard.model_kind(tmp_path / "folder") == "diffusers"
    assert modelcard.model_kind(digits_model) == "builtin"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert modelcard.model_kind(tmp_path / "plain.safetensors") == "safetensors"
    (tmp_path / "junk").mkdir()
    assert modelcard.model_kind(tmp_path / "junk") == "folder"


def test_a_pythae_folder_gets_the_pythae_card(pythae_folder):
    from selfconsist import modelcard

    assert modelcard.model_kind(pythae_folder) == "pythae"
