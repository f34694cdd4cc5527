"""Tune's latent-diffusion recipe on a tiny in-process AutoencoderKL: z₀ sources (refined prior,
images), the anchor to the frozen base encoder, the latent shift, and per-family defaults."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402

from selfconsist import objective as obj  # noqa: E402
from selfconsist.adapters.diffusers import DiffusersVAE  # noqa: E402
from selfconsist.errors import SelfconsistError  # noqa: E402
from selfconsist.tune import TuneConfig, Z0Source, _frozen_copy, load_images, tune  # noqa: E402

pytestmark = pytest.mark.diffusers

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
            sample_size=16, latent_channels=4, scaling_factor=0.5, shift_factor=0.1)
QUICK = dict(steps=4, batch_size=2, lr=1e-2, device="cpu", eval_samples=4, seed=0)


def tiny_vae() -> DiffusersVAE:
    torch.manual_seed(0)
    return DiffusersVAE(AutoencoderKL(**TINY).eval())


def encoder_distance(a: DiffusersVAE, b: DiffusersVAE) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in
               zip(a.encoder_parameters(), b.encoder_parameters(), strict=True))


def test_kl_diagonal_gaussians_known_answer():
    # KL(N(1, 1) ‖ N(0, 4)) = ½ (log 4 − 0 + (1 + 1)/4 − 1) per element, 3 elements.
    m, lv = torch.ones(1, 3), torch.zeros(1, 3)
    got = obj.kl_diagonal_gaussians(m, lv, torch.zeros(1, 3), torch.full((1, 3), math.log(4.0)))
    assert got.item() == pytest.approx(3 * 0.5 * (math.log(4.0) + 0.5 - 1.0), rel=1e-6)
    assert obj.kl_diagonal_gaussians(m, lv, m, lv).item() == pytest.approx(0.0, abs=1e-7)


def test_refined_prior_is_a_fixed_point_iteration_of_the_base():
    vae = tiny_vae()
    base = _frozen_copy(vae)
    src = Z0Source(vae, TuneConfig(prior_refine=2, **QUICK), base)
    z, idx = src.sample(3, torch.Generator().manual_seed(1))
    z0 = vae.sample_prior(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base.encode(base.decode(base.encode(base.decode(z0)).mean)).mean
    assert idx is None and src.kind == "refined"
    torch.testing.assert_close(z, want)


def test_base_copy_is_frozen_and_independent():
    vae = tiny_vae()
    base = _frozen_copy(vae)
    assert not any(p.requires_grad for p in base.encoder_parameters())
    with torch.no_grad():
        for p in vae.encoder_parameters():
            p.add_(1.0)
    assert encoder_distance(vae, base) == pytest.approx(1.0)
    assert encoder_distance(base, tiny_vae()) == 0.0


def test_huge_anchor_keeps_the_encoder_at_the_base():
    free, anchored, ref = tiny_vae(), tiny_vae(), tiny_vae()
    tune(free, TuneConfig(**QUICK), progress=False)
    res = tune(anchored, TuneConfig(anchor=1e6, **QUICK), progress=False)
    moved, kept = encoder_distance(free, ref), encoder_distance(anchored, ref)
    # Adam's first steps move every weight by about lr whatever the loss scale, so compare the
    # latents: the anchored encoder's must stay far closer to the base's than the free one's.
    assert kept <= moved
    free_shift = tune(tiny_vae(), TuneConfig(**QUICK), progress=False).latent_shift["value"]
    assert res.latent_shift["value"] < 0.5 * free_shift


def test_latent_shift_is_reported_and_recorded(tmp_path):
    from selfconsist.io import META_PREFIX, read_safetensors_header

    vae = tiny_vae()
    out = tmp_path / "t"
    res = tune(vae, TuneConfig(**QUICK), out, progress=False)
    assert res.latent_shift["on"] == "decoded prior samples"
    assert res.latent_shift["value"] > 0 and math.isfinite(res.latent_shift["stderr"])
    header = read_safetensors_header(out / "diffusion_pytorch_model.safetensors")
    import json

    metrics = json.loads(header["__metadata__"][META_PREFIX + "metrics"])
    assert metrics["latent_shift"]["value"] == pytest.approx(res.latent_shift["value"])


def test_for_model_applies_family_defaults_then_options(monkeypatch):
    vae = tiny_vae()
    monkeypatch.setattr(DiffusersVAE, "tune_defaults", {"rho": 0.99, "steps": 7})
    cfg = TuneConfig.for_model(vae, steps=3, lr=None)
    assert (cfg.rho, cfg.steps, cfg.lr) == (0.99, 3, TuneConfig().lr)
    assert TuneConfig.for_model(None, rho=None).rho == TuneConfig().rho


@pytest.mark.parametrize("bad", [dict(prior_refine=-1), dict(anchor=-1.0), dict(fit="stretch"),
                                 dict(latents="a.npy", images="d"),
                                 dict(prior_refine=1, images="d")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SelfconsistError):
        TuneConfig(**bad)


def _png_folder(folder, n: int = 3, size: int = 20):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        a = (torch.rand(size, size + 7, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def test_images_posteriors_and_anchor_on_images(tmp_path):
    vae = tiny_vae()
    folder = _png_folder(tmp_path / "imgs")
    cfg = TuneConfig(images=str(folder), anchor=1e-3, **QUICK)
    src = Z0Source(vae, cfg, None, load_images(folder, vae))
    z, idx = src.sample(4, torch.Generator().manual_seed(0))
    assert src.kind == "images" and idx is not None and z.shape == (4, *vae.latent_shape)
    res = tune(vae, cfg, progress=False)
    assert res.latent_shift["on"] == "images"


def _run_cli(*args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "selfconsist", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["empty", "unreadable", "missing"])
def test_images_refusals_are_one_line(tmp_path, case):
    model = tmp_path / "m"
    AutoencoderKL(**TINY).save_pretrained(model)
    folder = tmp_path / "imgs"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    r = _run_cli("tune", str(model), "--out", str(out), "--images", str(folder), "--steps", "2",
                 "--batch-size", "2")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "--images" in lines[0] and "Traceback" not in r.stderr
    if case == "unreadable":
        assert "broken.png" in lines[0]
    assert not out.exists()
