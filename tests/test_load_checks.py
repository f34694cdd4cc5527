"""What every load checks, whatever the adapter: that each load option set applies to the
adapter that loads the model. Tiny models are built in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import selfconsist
from selfconsist.adapters import LoadOptions, available_adapters, get_adapter_class
from selfconsist.errors import SelfconsistError

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
