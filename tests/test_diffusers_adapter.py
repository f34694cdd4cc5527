"""The diffusers adapter: folders, pipeline folders and original-layout single files, round trips
through tuning and saving, priors, refusals and the CLI. Tiny models are built in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # a guard only: CI installs the diffusers extra

from diffusers import AsymmetricAutoencoderKL, AutoencoderKL  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from selfconsist.adapters import detect, ldm_keys, load  # noqa: E402
from selfconsist.adapters.diffusers import DiffusersVAE  # noqa: E402
from selfconsist.errors import CheckpointError, SelfconsistError, UnsupportedModelError  # noqa: E402
from selfconsist.io import read_safetensors_header  # noqa: E402
from selfconsist.tune import TuneConfig, tune  # noqa: E402

pytestmark = pytest.mark.diffusers

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
            sample_size=32, latent_channels=4, scaling_factor=0.5, shift_factor=0.1)
QUICK = dict(steps=3, batch_size=2, lr=1e-3, device="cpu", eval_samples=4, seed=0)


def tiny_kl(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def base_model() -> AutoencoderKL:
    return tiny_kl()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, base_model) -> dict[str, Path]:
    """The same tiny VAE as a plain folder, an fp16 variant, a sharded folder and a pipeline."""
    root = tmp_path_factory.mktemp("diffusers")
    base_model.save_pretrained(root / "plain")
    half = tiny_kl().half()
    half.save_pretrained(root / "variant", variant="fp16")
    base_model.save_pretrained(root / "sharded", max_shard_size="200KB")
    half.save_pretrained(root / "sharded-variant", variant="fp16", max_shard_size="200KB")
    pipe = root / "pipeline"
    base_model.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    return {k: root / k for k in ("plain", "variant", "sharded", "sharded-variant")} | {
        "pipeline": pipe}


def write_ldm_file(path: Path, model: AutoencoderKL, dtype: torch.dtype, prefix: str = "",
                   extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A single-file checkpoint in the original (CompVis/LDM) layout, as ComfyUI/A1111 keep it."""
    sd = ldm_keys.ldm_state_dict(model.state_dict())
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in sd.items()}
    tensors.update(extra or {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates":
                             torch.tensor(840000, dtype=torch.int32)})
    save_file(tensors, str(path), metadata={"modelspec.title": "tiny test VAE"})
    return tensors


def assert_decoder_equal(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if k.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(sa[k].float(), sb[k].float()), k


def encoder_changed(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k].float(), sb[k].float())
               for k in sa if k.startswith(("encoder.", "quant_conv.")))


# --------------------------------------------------------------------------------------------
# key layout and config inference
# --------------------------------------------------------------------------------------------


def test_ldm_layout_matches_diffusers_own_converter(base_model):
    """Our LDM writer, read back by diffusers' single-file converter, gives the model's tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = base_model.state_dict()
    ldm = ldm_keys.ldm_state_dict(sd)
    assert "decoder.up.1.upsample.conv.weight" in ldm  # LDM numbers up blocks in reverse
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # attention as 1×1 convolutions
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(base_model.config))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k].reshape(v.shape), v), k
    # and our reader maps every LDM key to the same diffusers key
    key_map = ldm_keys.file_to_model_keys(list(ldm), "ldm", "")
    assert sorted(key_map.values()) == sorted(sd)
    for lk, mk in key_map.items():
        assert torch.equal(ldm[lk].reshape(sd[mk].shape), sd[mk])


def _meta_ldm_shapes(**cfg) -> dict[str, list[int]]:
    with torch.device("meta"):
        m = AutoencoderKL(**cfg)
    return {k: list(v.shape) for k, v in ldm_keys.ldm_state_dict(m.state_dict()).items()}


SD_ARCH = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.mark.parametrize("latent,quant,name,expected,how", [
    (4, True, "vae-ft-mse-840000-ema-pruned.safetensors", "sd", "hint"),
    (4, True, "sdxl_vae.safetensors", "sdxl", "hint"),
    (4, True, "some_vae.safetensors", "sd", "default"),
    (16, False, "ae.safetensors", "flux", "hint"),
    (16, False, "flux1-dev-vae.safetensors", "flux", "hint"),
    (16, False, "sd3.5_large_vae.safetensors", "sd3", "hint"),
    (16, False, "my_vae.safetensors", "flux", "default"),  # "vae" must not match FLUX's "ae"
])
def test_infer_config_of_published_architectures(latent, quant, name, expected, how):
    shapes = _meta_ldm_shapes(**SD_ARCH, latent_channels=latent, use_quant_conv=quant,
                              use_post_quant_conv=quant)
    cfg = ldm_keys.infer_config(shapes, "ldm")
    assert cfg["block_out_channels"] == [128, 256, 512, 512]
    assert cfg["layers_per_block"] == 2 and cfg["latent_channels"] == latent
    assert cfg["use_quant_conv"] is quant and cfg["use_post_quant_conv"] is quant
    assert cfg["in_channels"] == 3 and cfg["out_channels"] == 3 and cfg["mid_block_add_attention"]
    known, chosen_by = ldm_keys.match_known(cfg, name)
    assert known is not None and known.name == expected and chosen_by == how


def test_single_file_statistics_come_from_options_or_a_note(tmp_path, base_model, caplog):
    def notes() -> list[str]:  # the selfconsist warnings since the last call
        got = [r.getMessage() for r in caplog.records
               if r.name == "selfconsist" and r.levelname == "WARNING"]
        caplog.clear()
        return got

    write_ldm_file(tmp_path / "sdxl_vae.safetensors", base_model, torch.float16)
    vae = load(tmp_path / "sdxl_vae.safetensors", image_size=32)
    assert any("scaling factor is unknown" in n for n in notes())  # a tiny, unknown architecture
    assert vae.model.config.scaling_factor == 0.18215  # diffusers' default, as its loader does
    cfg = dict(base_model.config)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg, default=list))
    vae = load(tmp_path / "sdxl_vae.safetensors", config=str(tmp_path / "cfg.json"))
    assert vae.model.config.scaling_factor == 0.5 and vae.image_size == (32, 32)
    assert notes() == []
    with pytest.raises(SelfconsistError, match="model_type 'sd4'"):
        load(tmp_path / "sdxl_vae.safetensors", model_type="sd4")


def test_infer_config_with_prefix_and_tiny_widths(base_model):
    shapes = {"first_stage_model." + k: list(v.shape)
              for k, v in ldm_keys.ldm_state_dict(base_model.state_dict()).items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = [320, 4, 3, 3]
    assert ldm_keys.detect_layout(shapes) == ("ldm", "first_stage_model.")
    cfg = ldm_keys.infer_config(shapes, "ldm", "first_stage_model.")
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        assert list(cfg[k]) == list(base_model.config[k]) if k == "block_out_channels" \
            else cfg[k] == base_model.config[k]
    assert ldm_keys.match_known(cfg, "sdxl_vae.safetensors") == (None, "none")
    with pytest.raises(ValueError, match="norm_num_groups"):
        ldm_keys.infer_config(shapes, "ldm", "first_stage_model.", norm_num_groups=48)


def test_sniff_and_import_work_without_diffusers(folders, tmp_path, base_model):
    write_ldm_file(tmp_path / "vae.safetensors", base_model, torch.float16)
    code = (
        "import sys; sys.modules['diffusers'] = None\n"  # any import of diffusers now fails
        "import selfconsist, selfconsist.adapters as a\n"
        "from selfconsist.adapters.diffusers import DiffusersVAE as D\n"
        "from pathlib import Path\n"
        f"print(D.sniff(Path({str(folders['plain'])!r})), D.sniff(Path({str(folders['pipeline'])!r})),"
        f" D.sniff(Path({str(tmp_path / 'vae.safetensors')!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "True"]


def test_sniff_rejects_builtin_checkpoints(tmp_path):
    # selfconsist's built-in files also hold encoder.* / decoder.* keys
    save_file({"encoder.net.0.weight": torch.zeros(2, 2), "decoder.net.0.weight": torch.zeros(2, 2),
               "encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    assert not DiffusersVAE.sniff(tmp_path / "b.safetensors")
    assert not DiffusersVAE.sniff(tmp_path)  # an empty folder


# --------------------------------------------------------------------------------------------
# the model seen through the adapter
# --------------------------------------------------------------------------------------------


def test_encode_decode_match_diffusers(folders, base_model):
    vae = load(folders["plain"])
    assert isinstance(vae, DiffusersVAE) and vae.source.format == "diffusers-folder"
    assert vae.data_shape == (3, 32, 32) and vae.latent_shape == (4, 16, 16)
    assert vae.data_range == (-1.0, 1.0) and vae.likelihood == "gaussian" and vae.obs_var == 0.1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        q = vae.encode(x)
        ref = base_model.encode(x).latent_dist
        assert torch.equal(q.mean, ref.mean) and torch.equal(q.logvar, ref.logvar)
        assert torch.equal(vae.decode(q.mean), base_model.decode(ref.mean).sample)
    names = [m.__class__.__name__ for m in vae.encoder_modules()]
    assert names == ["Encoder", "Conv2d"] and vae.encoder_modules()[1] is vae.model.quant_conv
    assert [m.__class__.__name__ for m in vae.decoder_modules()] == ["Decoder", "Conv2d"]


def test_logvar_is_clamped_like_diffusers():
    m = tiny_kl()
    with torch.no_grad():
        m.quant_conv.bias[4:] = 1e4  # the log-variance half of the moments
        m.quant_conv.bias[:4] = 0.0
    vae = DiffusersVAE.from_model(m)
    with torch.no_grad():
        q = vae.encode(torch.zeros(1, 3, 32, 32))
    assert float(q.logvar.max()) == 20.0 and float(q.logvar.min()) == 20.0


def test_image_size_option(folders):
    vae = load(folders["plain"], image_size="32x48")
    assert vae.data_shape == (3, 32, 48) and vae.latent_shape == (4, 16, 24)
    vae = load(folders["plain"], image_size=16)
    assert vae.data_shape == (3, 16, 16)
    with pytest.raises(SelfconsistError, match="multiples of the VAE's downsampling factor 2"):
        load(folders["plain"], image_size=15)
    # the default is the config's sample_size, capped at 256
    big = DiffusersVAE.from_model(tiny_kl(sample_size=1024))
    assert big.data_shape == (3, 256, 256) and big.latent_shape == (4, 128, 128)


def test_priors_diffusion_and_nominal(folders):
    vae = load(folders["plain"])
    pri = vae.priors()
    assert list(pri) == ["diffusion", "nominal"] and vae.prior.name == "diffusion"
    # raw = ẑ / scaling + shift  ⇒  p(z) = N(shift, (1/scaling)²) with scaling 0.5, shift 0.1
    assert torch.allclose(pri["diffusion"].mean, torch.tensor(0.1))
    assert torch.allclose(pri["diffusion"].std, torch.tensor(2.0))
    assert float(pri["nominal"].mean) == 0.0 and float(pri["nominal"].std) == 1.0
    z = vae.sample_prior(4000, torch.Generator().manual_seed(0))
    assert z.shape == (4000, 4, 16, 16)
    assert abs(float(z.mean()) - 0.1) < 0.01 and abs(float(z.std()) - 2.0) < 0.01
    vae.set_prior("nominal")
    assert abs(float(vae.sample_prior(2000, torch.Generator().manual_seed(0)).std()) - 1.0) < 0.01


def test_prior_per_channel_latents_mean_std():
    mean, std = [0.5, -0.5, 1.0, 0.0], [2.0, 1.0, 0.5, 4.0]
    vae = DiffusersVAE.from_model(tiny_kl(latents_mean=mean, latents_std=std, scaling_factor=0.5))
    p = vae.priors()["diffusion"]
    # SDXL-style pipelines decode raw = ẑ·latents_std/scaling + latents_mean
    assert torch.allclose(p.mean.flatten(), torch.tensor(mean))
    assert torch.allclose(p.std.flatten(), torch.tensor(std) / 0.5)
    assert p.mean.shape == (4, 1, 1)


def test_in_memory_model_saves_as_a_diffusers_folder(tmp_path):
    m = tiny_kl(latents_mean=[0.5, -0.5, 1.0, 0.0], latents_std=[2.0, 1.0, 0.5, 4.0])
    DiffusersVAE.from_model(m).save(tmp_path / "mem")
    again = load(tmp_path / "mem")
    assert again.model.config.latents_std == [2.0, 1.0, 0.5, 4.0]
    assert torch.equal(again.priors()["diffusion"].std.flatten(), torch.tensor([4.0, 2.0, 1.0, 8.0]))
    sd, sm = again.model.state_dict(), m.state_dict()
    assert set(sd) == set(sm) and all(torch.equal(sd[k], sm[k]) for k in sd)


def test_memory_options_give_the_same_numbers():
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def grads(vae: DiffusersVAE) -> list[torch.Tensor]:
        vae.model.zero_grad()
        q = vae.encode(x)
        (vae.decode(q.mean).pow(2).mean() + q.logvar.mean()).backward()
        return [p.grad.clone() for p in vae.encoder_parameters()]

    plain = DiffusersVAE.from_model(tiny_kl())
    ckpt = DiffusersVAE.from_model(tiny_kl(), gradient_checkpointing=True)
    assert ckpt.checkpointing == {"encoder": True, "decoder": True}
    assert plain.checkpointing == {"encoder": False, "decoder": False}  # auto: off on CPU
    enc_only = DiffusersVAE.from_model(tiny_kl(), gradient_checkpointing="encoder")
    assert enc_only.checkpointing == {"encoder": True, "decoder": False}
    for a, b in zip(grads(plain), grads(ckpt), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    sliced = DiffusersVAE.from_model(tiny_kl(), slicing=True)
    with torch.no_grad():
        assert torch.allclose(sliced.encode(x).mean, plain.encode(x).mean, atol=1e-5)
    # tiling kicks in above sample_size (32 here): a 64×64 image is encoded in 4 blended tiles
    tiled = DiffusersVAE.from_model(tiny_kl(), tiling=True, image_size=64)
    with torch.no_grad():
        z = tiled.encode(torch.rand(1, 3, 64, 64) * 2 - 1).mean
        assert z.shape == (1, 4, 32, 32) and torch.isfinite(z).all()
        assert tiled.decode(z).shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------------------------
# round trips: load → tune → save → load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "variant", "sharded", "sharded-variant", "pipeline"])
def test_folder_roundtrip(folders, tmp_path, kind):
    src = folders[kind]
    if kind.startswith("sharded"):
        assert len(list(src.glob("*-of-*.safetensors"))) > 1
    vae = load(src)
    assert vae.source.extra["subfolder"] == ("vae" if kind == "pipeline" else None)
    assert vae.source.path == (src / "vae" if kind == "pipeline" else src)
    before = vae.model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    out = tmp_path / "tuned"
    result = tune(vae, TuneConfig(**QUICK), out=out, progress=False)
    assert result.out == out

    variant = "fp16" if kind.endswith("variant") else None
    weights = "diffusion_pytorch_model.fp16.safetensors" if variant else \
        "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", weights]
    vae_dir = src / "vae" if kind == "pipeline" else src
    assert (out / "config.json").read_bytes() == (vae_dir / "config.json").read_bytes()
    meta = read_safetensors_header(out / weights)["__metadata__"]
    assert json.loads(meta["selfconsist.tune_config"])["steps"] == 3
    assert meta["selfconsist.adapter"] == "diffusers" and meta["format"] == "pt"

    dtype = torch.float16 if variant else torch.float32
    stored = {v["dtype"] for k, v in read_safetensors_header(out / weights).items() if k != "__metadata__"}
    assert stored == {"F16" if variant else "F32"}  # the input's dtype
    reloaded = AutoencoderKL.from_pretrained(out, variant=variant, torch_dtype=dtype)
    original = AutoencoderKL.from_pretrained(vae_dir, variant=variant, torch_dtype=dtype)
    assert_decoder_equal(reloaded, original)
    assert encoder_changed(reloaded, original)
    tuned = vae.model.state_dict()
    for k, v in reloaded.state_dict().items():  # the file holds the tuned encoder, cast back
        assert torch.equal(v, tuned[k].to(dtype)), k
    assert any(not torch.equal(tuned[k], before[k]) for k in tuned if k.startswith("encoder."))

    again = load(out)  # and selfconsist reads its own output, tune record included
    assert again.metadata["selfconsist.adapter"] == "diffusers"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    if variant is None:
        with torch.no_grad():
            assert torch.equal(again.encode(x).mean, vae.to("cpu").encode(x).mean)


@pytest.mark.parametrize("prefix,dtype", [("", torch.float16),
                                          ("first_stage_model.", torch.bfloat16)])
def test_single_file_roundtrip_keeps_layout_dtypes_and_extra_keys(tmp_path, base_model, prefix, dtype):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    src = tmp_path / "vae.safetensors"
    extra = {"model_ema.decay": torch.tensor(0.9999)}
    if prefix:  # a full SD checkpoint: other networks' tensors must pass through untouched
        extra["model.diffusion_model.out.2.weight"] = torch.randn(4, 8, 3, 3).to(dtype)
        extra["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    written = write_ldm_file(src, base_model, dtype, prefix, extra)
    src_bytes = src.read_bytes()

    vae = load(src, image_size=32, scaling_factor=0.5, shift_factor=0.1)
    assert vae.source.format == "single-file" and vae.source.extra["layout"] == "ldm"
    assert vae.source.extra["prefix"] == prefix and vae.latent_shape == (4, 16, 16)
    assert float(vae.priors()["diffusion"].std) == pytest.approx(2.0)
    out = tmp_path / "vae.tuned.safetensors"
    tune(vae, TuneConfig(**QUICK), out=out, progress=False)
    assert src.read_bytes() == src_bytes  # the input is never modified

    header = read_safetensors_header(out)
    meta = header["__metadata__"]
    assert meta["modelspec.title"] == "tiny test VAE"  # the input's own metadata is kept
    assert "selfconsist.tune_config" in meta and "selfconsist.diffusers_config" in meta
    assert set(header) - {"__metadata__"} == set(written)
    encoder_keys = [k for k in written if k.startswith((prefix + "encoder.", prefix + "quant_conv."))]
    changed = 0
    with safe_open(str(out), "pt") as f_out:
        for k, t in written.items():
            u = f_out.get_tensor(k)
            assert u.dtype == t.dtype and u.shape == t.shape, k
            if k in encoder_keys:
                changed += not torch.equal(u, t)
            else:  # decoder, post_quant_conv and extra keys: byte for byte
                assert torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    assert changed > len(encoder_keys) // 2

    # read the output the way diffusers' own single-file loader converts it
    tensors = load_file(str(out))
    conv = convert_ldm_vae_checkpoint(tensors, dict(base_model.config))
    ref = AutoencoderKL.from_config(base_model.config)
    ref.load_state_dict({k: v.reshape(ref.state_dict()[k].shape).float() for k, v in conv.items()})
    original = _cast_roundtrip(base_model, dtype)
    assert_decoder_equal(ref, original)
    assert encoder_changed(ref, original)
    tuned = vae.model.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(v, tuned[k].to(dtype).float()), k

    # a reload needs no options: the config is recorded in the header
    again = load(out)
    assert again.config_source == "recorded by selfconsist"
    assert again.model.config.scaling_factor == 0.5 and again.model.config.shift_factor == 0.1
    # ...and so is the image size it was tuned at (it used to fall back to 256 px, so a file
    # tuned at 32 px could not be evaluated at its own size)
    assert again.image_size == tuple(vae.image_size) == (32, 32)
    assert load(out, image_size=64).image_size == (64, 64)  # an explicit size still wins


def _cast_roundtrip(model: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    m = AutoencoderKL.from_config(model.config)
    m.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return m


def test_diffusers_layout_single_file_uses_the_config_beside_it(folders, tmp_path):
    src = folders["plain"] / "diffusion_pytorch_model.safetensors"
    vae = load(src)
    assert vae.source.format == "single-file" and vae.source.extra["layout"] == "diffusers"
    assert vae.config_source == "config.json beside the file"
    assert vae.model.config.scaling_factor == 0.5
    tune(vae, TuneConfig(**QUICK), out=tmp_path / "t.safetensors", progress=False)
    a, b = load_file(str(tmp_path / "t.safetensors")), load_file(str(src))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("decoder.", "post_quant")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))


def test_old_diffusers_attention_names_are_read_and_kept(tmp_path, base_model):
    """Checkpoints from diffusers < 0.14 name the attention layers query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in base_model.state_dict().items():
        for new, name in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        sd[k] = v.contiguous()
    folder = tmp_path / "old"
    folder.mkdir()
    base_model.save_config(folder)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    vae = load(folder)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).mean, base_model.encode(x).latent_dist.mean)
    tune(vae, TuneConfig(**QUICK), out=tmp_path / "old2", progress=False)
    out = load_file(str(tmp_path / "old2" / "diffusion_pytorch_model.safetensors"))
    assert set(out) == set(sd) and "encoder.mid_block.attentions.0.query.weight" in out
    assert not torch.equal(out["encoder.mid_block.attentions.0.query.weight"],
                           sd["encoder.mid_block.attentions.0.query.weight"])
    assert torch.equal(out["decoder.mid_block.attentions.0.query.weight"],
                       sd["decoder.mid_block.attentions.0.query.weight"])


def test_asymmetric_autoencoder_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = AsymmetricAutoencoderKL(down_block_out_channels=(32, 64), up_block_out_channels=(32, 64),
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_down_block=1,
                                layers_per_up_block=1, norm_num_groups=32, sample_size=32)
    m.save_pretrained(tmp_path / "asym")
    vae = load(tmp_path / "asym")
    assert vae.class_name == "AsymmetricAutoencoderKL" and vae.latent_shape == (4, 16, 16)
    tune(vae, TuneConfig(**QUICK), out=tmp_path / "asym2", progress=False)
    a = AsymmetricAutoencoderKL.from_pretrained(tmp_path / "asym2")
    sa, sm = a.state_dict(), m.state_dict()
    assert all(torch.equal(sa[k], sm[k]) for k in sa if k.startswith(("decoder.", "post_quant")))
    assert any(not torch.equal(sa[k], sm[k]) for k in sa if k.startswith("encoder."))


def test_hub_cache_path_is_recorded(tmp_path, base_model):
    snap = tmp_path / "hub" / "models--someorg--tiny-vae" / "snapshots" / "0123abcd"
    base_model.save_pretrained(snap)
    vae = load(snap)
    assert vae.source.repo_id == "someorg/tiny-vae" and vae.source.revision == "0123abcd"
    assert load(snap, repo_id="a/b").source.repo_id == "a/b"


# --------------------------------------------------------------------------------------------
# errors and refusals
# --------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from selfconsist.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def test_deterministic_autoencoders_are_refused_via_cli(tmp_path, capsys):
    from diffusers import AutoencoderTiny, VQModel

    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    VQModel(block_out_channels=(32,), norm_num_groups=8, num_vq_embeddings=16,
            vq_embed_dim=3).save_pretrained(tmp_path / "vq")
    for folder, cls in (("taesd", "AutoencoderTiny"), ("vq", "VQModel")):
        assert detect(tmp_path / folder) is DiffusersVAE
        code, out, err = _cli(capsys, "info", str(tmp_path / folder))
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert cls in err and "deterministic" in err and "no posterior" in err
        assert "AutoencoderKL" in err  # says what is supported
        with pytest.raises(UnsupportedModelError):
            load(tmp_path / folder)


@pytest.mark.parametrize("cls", ["AutoencoderKLWan", "AutoencoderKLTemporalDecoder",
                                 "AutoencoderOobleck", "UNet2DConditionModel"])
def test_other_classes_are_refused_with_one_clear_line(tmp_path, capsys, cls):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": cls,
                                                      "_diffusers_version": "0.42.1"}))
    code, _, err = _cli(capsys, "info", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert cls in err and "AutoencoderKL and AsymmetricAutoencoderKL" in err


def test_broken_folders_give_clear_errors(tmp_path, base_model, folders):
    (tmp_path / "config.json").write_text((folders["plain"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="variant 'bf16'"):
        load(folders["plain"], variant="bf16")
    # weights that do not fit the config
    other = tmp_path / "other"
    base_model.save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["block_out_channels"] = [32, 96]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load(other)
    # pickled weights only with --trust-remote-code
    pickled = tmp_path / "pickled"
    base_model.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load(pickled)
    vae = load(pickled, trust_remote_code=True)
    vae.save(tmp_path / "from_bin")
    assert (tmp_path / "from_bin" / "diffusion_pytorch_model.safetensors").is_file()


def test_save_refuses_when_the_input_changed(tmp_path, base_model):
    base_model.save_pretrained(tmp_path / "m")
    vae = load(tmp_path / "m")
    w = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes())  # same bytes, new mtime: we cannot know it is the same file
    os.utime(w, ns=(1, 1))
    with pytest.raises(SelfconsistError, match="changed or vanished"):
        vae.save(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_info_and_tune(folders, tmp_path, capsys):
    code, out, err = _cli(capsys, "info", str(folders["variant"]), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["adapter"] == "diffusers" and info["latent_shape"] == [4, 16, 16]
    assert info["data_range"] == [-1.0, 1.0] and info["default_prior"] == "diffusion"
    assert "fp16" in info["format"]

    out_dir = tmp_path / "tuned"
    code, out, err = _cli(capsys, "tune", str(folders["plain"]), "--out", str(out_dir), "--steps", "3",
                          "--batch-size", "2", "--device", "cpu", "--eval-samples", "4",
                          "--image-size", "48", "-q")
    assert code == 0, err
    # --image-size reaches the adapter (a size that does not fit the VAE is refused by it)
    code, _, err = _cli(capsys, "tune", str(folders["plain"]), "--out", str(tmp_path / "x"),
                        "--steps", "1", "--device", "cpu", "--image-size", "15", "-q")
    assert code == 2 and "downsampling factor 2" in err
    reloaded = AutoencoderKL.from_pretrained(out_dir)
    assert_decoder_equal(reloaded, AutoencoderKL.from_pretrained(folders["plain"]))
    assert encoder_changed(reloaded, AutoencoderKL.from_pretrained(folders["plain"]))
    code, out, _ = _cli(capsys, "info", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["tune_config"]["steps"] == 3


# --------------------------------------------------------------------------------------------
# it works: a VAE trained on real photographs gets more self-consistent
# --------------------------------------------------------------------------------------------


def _photo_patches(n: int, size: int, seed: int = 0) -> torch.Tensor:
    import numpy as np
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # two bundled photographs, no download
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = images[rng.integers(len(images))]
        i, j = rng.integers(im.shape[0] - size), rng.integers(im.shape[1] - size)
        out.append(im[i:i + size, j:j + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.mark.slow
def test_sample_roundtrip_error_falls_on_a_vae_trained_on_photos(tmp_path):
    """Train a tiny AutoencoderKL on 16×16 photo patches the SD way (a small KL weight, latents far
    from N(0, I)), set scaling/shift from its latents as SD does, then tune post hoc."""
    torch.manual_seed(0)
    x = _photo_patches(4096, 16)
    m = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                      norm_num_groups=8, sample_size=16, latent_channels=4)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):  # about 15 s on one core
        xb = x[torch.randint(len(x), (32,), generator=gen)]
        q = m.encode(xb).latent_dist
        rec = m.decode(q.sample(gen)).sample
        nll = (rec - xb).pow(2).flatten(1).sum(1) / (2 * 0.1)
        kl = 0.5 * (q.mean.pow(2) + q.var - 1 - q.logvar).flatten(1).sum(1)
        loss = (nll + 0.01 * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        mu = m.encode(x[:512]).latent_dist.mean
    m.register_to_config(scaling_factor=float(1 / mu.std()), shift_factor=float(mu.mean()))
    m.save_pretrained(tmp_path / "photo-vae")

    vae = load(tmp_path / "photo-vae")
    assert vae.prior.name == "diffusion"
    # the generic AVAE recipe (this test predates the family defaults, which tune() now applies)
    res = tune(vae, TuneConfig(steps=100, batch_size=16, lr=3e-4, device="cpu", eval_samples=256,
                               objective="avae", prior_refine=0, anchor=0.0),
               out=tmp_path / "photo-vae-tuned", progress=False)
    b, a = res.before, res.after
    print(json.dumps({"before": b, "after": a}))  # shown with pytest -s
    mse_b, mse_a = b["sample_roundtrip_mse"], a["sample_roundtrip_mse"]
    margin = 3 * (mse_b["stderr"] ** 2 + mse_a["stderr"] ** 2) ** 0.5
    assert mse_a["value"] < mse_b["value"] - margin, (b, a)
    assert mse_a["value"] < 0.85 * mse_b["value"], (b, a)
    assert a["consistency_kl"]["value"] < b["consistency_kl"]["value"]
    assert a["latent_roundtrip_corr"]["value"] > b["latent_roundtrip_corr"]["value"] - 0.02
    tuned = AutoencoderKL.from_pretrained(tmp_path / "photo-vae-tuned")
    assert_decoder_equal(tuned, m)
    assert encoder_changed(tuned, m)


@pytest.mark.parametrize("stats,match", [
    ({"latents_mean": [0.0, 0.0, 0.0], "latents_std": [1.0, 1.0, 1.0]}, "latents_mean"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std"),
    ({"scaling_factor": 0.0}, "scaling_factor"),
    ({"scaling_factor": -0.5}, "scaling_factor"),
])
def test_bad_latent_statistics_in_config_are_a_clear_error(tmp_path, base_model, stats, match):
    # Not a traceback from priors() later on, and not a silent fallback to scaling 1.
    base_model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **stats}))
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "m")


def test_garbage_config_beside_diffusers_weights_is_named(tmp_path, base_model):
    base_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a diffusers config"):
        load(tmp_path / "m")


@pytest.mark.parametrize("word,expected", [
    ("on", {"encoder": True, "decoder": True}), ("all", {"encoder": True, "decoder": True}),
    ("encoder", {"encoder": True, "decoder": False}), ("off", {"encoder": False, "decoder": False})])
def test_gradient_checkpointing_flag_takes_what_python_takes(word, expected):
    """--gradient-checkpointing WORD loads the model as the Python value it stands for."""
    from selfconsist.adapters.options import parse_gradient_checkpointing

    vae = DiffusersVAE.from_model(tiny_kl(), gradient_checkpointing=parse_gradient_checkpointing(word))
    assert vae.checkpointing == expected
    with pytest.raises(SelfconsistError, match="on, encoder or off"):
        parse_gradient_checkpointing("sometimes")
