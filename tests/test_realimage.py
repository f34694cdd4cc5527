"""Real-image figures (selfconsist.realimage), image folders of any size, and eval on them."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from selfconsist import realimage as R
from selfconsist.adapters.base import DiagonalGaussian, VAEAdapter
from selfconsist.data import fit_image, load_dataset, load_image_folder
from selfconsist.errors import DataError


class PixelVAE(VAEAdapter):
    """Latent = image: μ(x) = x + offset (per channel), g(z) = gain·z, on (C, H, W) data.

    With gain 1 and no offset the encoder and decoder are exact inverses; a gain a < 1 is a
    decoder with known shrinkage (x_K = a^K·x₀ while nothing clips).
    """

    name = "test-pixel"

    def __init__(self, shape: tuple[int, int, int] = (3, 16, 16), gain: float = 1.0,
                 offset: Tensor | None = None, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__()
        self.shape, self.gain, self._range = shape, gain, (lo, hi)
        self.offset = torch.zeros(shape[0]) if offset is None else offset
        self.dummy = nn.Linear(1, 1)  # parameters for device/modules

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def data_range(self) -> tuple[float, float]:
        return self._range

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean = x + self.offset.view(1, -1, 1, 1)
        return DiagonalGaussian(mean, torch.full_like(mean, -4.0))

    def decode(self, z: Tensor) -> Tensor:
        return self.gain * z

    def encoder_modules(self) -> list[nn.Module]:
        return [self.dummy]

    def decoder_modules(self) -> list[nn.Module]:
        return []

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        raise NotImplementedError


def images(n: int = 6, shape: tuple[int, int, int] = (3, 16, 16), lo: float = -0.8,
           hi: float = 0.8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


# --- PSNR and SSIM --------------------------------------------------------------------------------

def test_psnr_of_known_errors():
    x = images(4)
    # a constant error c on every element: MSE = c², PSNR = 10 log10((hi − lo)²/c²)
    for c in (0.01, 0.1, 0.5):
        got = R.psnr_per_image(x + c, x, (-1.0, 1.0))
        assert torch.allclose(got, torch.full((4,), 10 * math.log10(4.0 / c**2), dtype=got.dtype))
    # per image: image i gets error c_i on half its elements → MSE_i = c_i²/2
    c = torch.tensor([0.05, 0.1, 0.2, 0.4])
    y = x.clone()
    y[:, :, :8] += c.view(4, 1, 1, 1)
    want = 10 * torch.log10(1.0 / (c.double() ** 2 / 2))
    assert torch.allclose(R.psnr_per_image(y, x, (0.0, 1.0)), want)
    # identical images: capped, finite
    assert torch.all(R.psnr_per_image(x, x, (-1.0, 1.0)) == R.PSNR_CAP_DB)
    with pytest.raises(ValueError, match="bounded"):
        R.psnr_per_image(x, x, (-math.inf, math.inf))


@pytest.mark.parametrize("shape,rng", [((3, 24, 31), (-1.0, 1.0)), ((1, 11, 40), (0.0, 1.0)),
                                       ((3, 64, 48), (0.0, 255.0))])
def test_ssim_matches_scikit_image(shape, rng):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    lo, hi = rng
    x = lo + (hi - lo) * torch.rand(3, *shape, generator=g, dtype=torch.float64)
    y = (x + 0.15 * (hi - lo) * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(lo, hi)
    y[0] = x[0]  # one identical pair: SSIM 1
    got = R.ssim_per_image(x, y, rng)
    want = [structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=hi - lo, channel_axis=0)
            for i in range(3)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert got[0] == pytest.approx(1.0, abs=1e-12) and got[1] < 0.9
    with pytest.raises(ValueError, match="11"):
        R.ssim_per_image(x[:, :, :10], y[:, :, :10], rng)


# --- cycles --------------------------------------------------------------------------------------

def test_cycles_of_an_exact_inverse_lose_nothing():
    vae = PixelVAE()
    x = images(5)
    res = R.cycle_metrics(vae, x, (1, 2, 5, 10), batch_size=2, keep=3)
    e = res.estimates
    for k in (1, 2, 5, 10):
        assert e[f"cycle_psnr@{k}"].value == R.PSNR_CAP_DB
    assert e["image_psnr"].value == R.PSNR_CAP_DB
    assert e["image_ssim"].value == pytest.approx(1.0)
    assert e["cycle_db_lost"].value == 0.0
    assert res.chains.shape == (3, 5, 3, 16, 16) and res.steps == [0, 1, 2, 5, 10]
    assert torch.equal(res.chains[:, 0], x[:3]) and torch.equal(res.chains[:, -1], x[:3])


def test_cycles_of_a_shrinking_decoder_have_the_known_psnr():
    a = 0.9
    vae = PixelVAE(gain=a)
    x = images(7)
    res = R.cycle_metrics(vae, x, (1, 2, 5, 10), batch_size=3)
    m = x.double().pow(2).flatten(1).mean(1)  # x_K − x₀ = (a^K − 1)·x₀, nothing clips
    psnr = {k: 10 * torch.log10(4.0 / ((1 - a**k) ** 2 * m)) for k in (1, 2, 5, 10)}
    for k in (1, 2, 5, 10):
        est = res.estimates[f"cycle_psnr@{k}"]
        assert est.value == pytest.approx(float(psnr[k].mean()), rel=1e-6)
        assert est.stderr == pytest.approx(float(psnr[k].std() / math.sqrt(7)), rel=1e-5)
    assert res.estimates["image_psnr"].value == pytest.approx(float(psnr[1].mean()), rel=1e-6)
    lost = psnr[1] - psnr[10]  # = 20 log10((1 − a^10)/(1 − a)), the same for every image
    assert res.estimates["cycle_db_lost"].value == pytest.approx(
        20 * math.log10((1 - a**10) / (1 - a)), rel=1e-6)
    assert float(lost.std()) < 1e-6 and res.estimates["cycle_db_lost"].stderr < 1e-5
    assert res.estimates["cycle_psnr@10"].value < res.estimates["cycle_psnr@1"].value


def test_cycle_chain_clips_to_the_data_range():
    vae = PixelVAE(gain=2.0, lo=0.0, hi=1.0)
    x = torch.full((2, 3, 16, 16), 0.6)
    chain = R.cycle_chain(vae, x, 3)
    assert chain.shape == (2, 4, 3, 16, 16)
    assert torch.all(chain[:, 1:] == 1.0)  # 2·0.6 = 1.2 clipped to 1, and it stays there
    # PSNR(x₁, x₀) = 10 log10(1/0.4²) for every K
    res = R.cycle_metrics(vae, x, (1, 3))
    assert res.estimates["cycle_psnr@3"].value == pytest.approx(10 * math.log10(1 / 0.16))
    assert res.estimates["cycle_db_lost"].value == pytest.approx(0.0, abs=1e-9)
    assert "image_ssim" in res.estimates


def test_latent_compatibility_of_a_known_offset():
    shape = (3, 12, 12)
    x = images(8, shape, seed=2)
    # give the base latents (= the images) exact per-channel standard deviations s_c
    s = torch.tensor([0.1, 0.2, 0.4])
    flat = x.transpose(0, 1).reshape(3, -1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True) * s[:, None]
    x = flat.reshape(3, 8, *shape[1:]).transpose(0, 1).contiguous()
    b = torch.tensor([0.01, -0.04, 0.02])
    base = PixelVAE(shape, lo=-10.0, hi=10.0)
    tuned = PixelVAE(shape, offset=b, lo=-10.0, hi=10.0)
    res = R.latent_compatibility(base, tuned, x, batch_size=3)
    want = float((b.abs() / s).mean())  # every channel has the same number of elements
    assert res["latent_shift"].value == pytest.approx(want, rel=1e-5)
    assert res["latent_shift"].stderr < 1e-6  # the same shift in every image
    # g(μ_t) − g(μ_b) = b_c: MSE = mean_c b_c², range 20
    assert res["latent_decode_psnr"].value == pytest.approx(
        10 * math.log10(400 / float(b.pow(2).mean())), rel=1e-5)
    same = R.latent_compatibility(base, base, x)
    assert same["latent_shift"].value == 0.0 and same["latent_decode_psnr"].value == R.PSNR_CAP_DB


def test_shift_warning_threshold():
    assert R.shift_warning(0.05) is None and R.shift_warning(R.SHIFT_WARN) is None
    line = R.shift_warning(0.44)
    assert line is not None and "0.440" in line and "\n" not in line


# --- image folders --------------------------------------------------------------------------------

def _save(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_folder_crop_and_tile(tmp_path):
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 32:] = 255  # left half black, right half white
    _save(tmp_path / "a_wide.png", wide)
    _save(tmp_path / "b_tall.jpg", np.full((70, 40), 128, np.uint8))  # greyscale JPEG
    _save(tmp_path / "c_small.png", np.full((10, 12, 3), 200, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")  # ignored

    crop = load_image_folder(tmp_path, (3, 16, 16), "crop")
    assert crop.x.shape == (3, 3, 16, 16) and crop.x.dtype == torch.float32
    # 32×64 → 16×32 → the centre 16 columns: 8 black, 8 white
    assert crop.x[0, :, :, :7].max() < 0.05 and crop.x[0, :, :, 9:].min() > 0.95
    assert torch.allclose(crop.x[1], torch.full((3, 16, 16), 128 / 255), atol=0.02)

    tile = load_image_folder(tmp_path, (3, 16, 16), "tile")
    # 32×64: 2×4 tiles; 70×40: 4×2; 10×12 is scaled up to 16×19: 1
    assert tile.x.shape == (8 + 8 + 1, 3, 16, 16)
    assert tile.x[:4].max() < 0.05 or tile.x[0].max() < 0.05  # top-left tiles of a_wide: black
    assert tile.x[3].min() > 0.95  # top-right tile: white

    grey = load_image_folder(tmp_path, (1, 8, 8), "crop", data_range=(-1.0, 1.0))
    assert grey.x.shape == (3, 1, 8, 8) and grey.x.min() >= -1.0 and grey.x.min() < -0.9

    via_spec = load_dataset(str(tmp_path), shape=(3, 16, 16), fit="tile")
    assert torch.equal(via_spec.x, tile.x)
    with pytest.raises(DataError, match="different sizes"):  # without a model shape: as before
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="fit"):
        fit_image(wide / 255.0, (16, 16), "stretch")


def test_folder_refuses_empty_and_unreadable(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG images") as e:
        load_image_folder(empty, (3, 16, 16))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    _save(bad / "a.png", np.zeros((20, 20, 3), np.uint8))
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="cannot read image") as e:
        load_image_folder(bad, (3, 16, 16))
    assert "b.png" in str(e.value) and "\n" not in str(e.value)
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    _save(truncated / "full.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    raw = (truncated / "full.png").read_bytes()
    (truncated / "full.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="full.png"):
        load_image_folder(truncated, (3, 16, 16))


# --- eval on a tiny diffusers AutoencoderKL and a folder of photos -----------------------------------

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Four of scikit-image's bundled photos, shrunk (different sizes and aspect ratios)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name, side in (("astronaut", 48), ("coffee", 40), ("chelsea", 56), ("rocket", 44)):
        im = Image.fromarray(getattr(data, name)())
        im.thumbnail((side, side))
        im.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def kl_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny AutoencoderKL and a copy whose encoder's latent means are moved by 0.5."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("kl")
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                                sample_size=32, latent_channels=4).eval()
    m.save_pretrained(root / "base")
    with torch.no_grad():
        m.quant_conv.bias[:4] += 0.5  # the first 4 moment channels are the mean
    m.save_pretrained(root / "moved")
    return root / "base", root / "moved"


@pytest.mark.diffusers
def test_cli_eval_on_an_image_folder(kl_pair, photo_folder, tmp_path, capsys, caplog):
    from selfconsist.cli import main

    base, moved = kl_pair
    out = tmp_path / "eval"
    args = ["eval", str(base), "--compare", str(moved), "--data", str(photo_folder), "--fit",
            "tile", "--cycles", "1,2,5,10", "--out", str(out), "--samples", "4", "--pgd-steps",
            "1", "--eps", "0.2", "--fast", "--device", "cpu", "--quiet"]
    # The CLI gives the "selfconsist" logger its own stderr handler (no propagation to the
    # root logger), so listen on that logger itself.
    logger = logging.getLogger("selfconsist")
    logger.addHandler(caplog.handler)
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        logger.removeHandler(caplog.handler)
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["fit"] == "tile" and m["config"]["cycles"] == [1, 2, 5, 10]
    # every photo gives at least one 32×32 tile (smaller sides are scaled up first)
    assert m["data"]["n_test"] == m["data"]["n"] >= 4
    keys = {"image_psnr", "image_ssim", "cycle_psnr@1", "cycle_psnr@2", "cycle_psnr@5",
            "cycle_psnr@10", "cycle_db_lost"}
    for name in ("model", "tuned"):
        res = m["models"][name]
        assert keys <= set(res), (name, keys - set(res))
        for k in keys:
            assert math.isfinite(res[k]["value"]) and res[k]["stderr"] >= 0, k
        assert res["image_psnr"]["value"] == pytest.approx(res["cycle_psnr@1"]["value"])
        assert res["cycle_db_lost"]["value"] == pytest.approx(
            res["cycle_psnr@1"]["value"] - res["cycle_psnr@10"]["value"])
        assert -1.0 <= res["image_ssim"]["value"] <= 1.0
    assert "latent_shift" not in m["models"]["model"]
    shift = m["models"]["tuned"]["latent_shift"]["value"]
    assert shift > R.SHIFT_WARN
    assert math.isfinite(m["models"]["tuned"]["latent_decode_psnr"]["value"])
    assert len(m["warnings"]) == 1 and f"{shift:.3f}" in m["warnings"][0]
    assert any(m["warnings"][0] == r.getMessage() for r in caplog.records)
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and m["warnings"][0] in report
    for k in keys | {"latent_shift", "latent_decode_psnr"}:
        assert f"`{k}`" in report and f"`{k}`" in stdout
    assert (out / "cycles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](cycles.png)" in report

    # the same model twice: no shift, no warning; the crop fit gives one image per photo
    out2 = tmp_path / "same"
    args2 = [a if a != str(moved) else str(base) for a in args]
    args2[args2.index("tile")] = "crop"
    args2[args2.index(str(out))] = str(out2)
    with pytest.raises(SystemExit) as e:
        main(args2 + ["--no-figures", "--cycles", "1,3", "--compare-name", "again"])
    assert e.value.code in (0, None)
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["data"]["n"] == 4 and m2["warnings"] == []
    assert m2["models"]["again"]["latent_shift"]["value"] == 0.0
    assert "cycle_psnr@3" in m2["models"]["model"] and "cycle_psnr@10" not in m2["models"]["model"]


def test_cli_eval_refuses_an_unreadable_image(digits_model, tmp_path):
    from .conftest import run_cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    _save(folder / "ok.png", np.zeros((8, 8), np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = run_cli("eval", str(digits_model), "--data", str(folder), "--out", str(tmp_path / "e"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.jpg" in lines[0], r.stderr
    r = run_cli("eval", str(digits_model), "--data", "digits", "--cycles", "0,2",
                "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "--cycles" in r.stderr


def test_model_card_carries_the_real_image_figures():
    from selfconsist.modelcard import CardInfo, real_image_section, render_section

    def est(v: float) -> dict:
        return {"value": v, "stderr": 0.1}

    common = {"sample_roundtrip_mse": est(0.01)}
    real = {"image_psnr": est(30.5), "image_ssim": est(0.91), "cycle_psnr@1": est(30.5),
            "cycle_psnr@10": est(17.8), "cycle_db_lost": est(12.7)}
    metrics = {"models": {"model": {**common, **real},
                          "tuned": {**common, **real, "image_psnr": est(25.3),
                                    "latent_shift": est(0.44), "latent_decode_psnr": est(31.0)}},
               "warnings": ["tuned: the encoder's latents moved"]}
    card = render_section(CardInfo(repo_id="me/vae", eval_metrics=metrics,
                                   figures=["eval/cycles.png", "eval/drift.png"]))
    assert "### Real images" in card and "| | model | tuned |" in card
    assert "| single-pass PSNR (dB), per-image mean | 30.5 ± 0.1 | 25.3 ± 0.1 |" in card
    assert "after 10 encode → decode cycles" in card and "| 17.8 ± 0.1 |" in card
    assert "| dB lost from cycle 1 to cycle 10 | 12.7 ± 0.1 | 12.7 ± 0.1 |" in card
    assert "| latent shift of real images (base-latent std units) | – | 0.44 ± 0.1 |" in card
    assert "> **Warning:** tuned: the encoder's latents moved" in card
    assert card.count("eval/cycles.png") == 1 and "eval/drift.png" in card
    assert card.index("### Real images") < card.index("![cycles]") < card.index("### All metrics")
    # an eval without image data: no such section
    assert real_image_section({"models": {"model": common}}) == []
    assert "### Real images" not in render_section(
        CardInfo(repo_id="me/vae", eval_metrics={"models": {"model": common}}))


@pytest.mark.parametrize("n", [1, 5])
def test_evaluate_reports_a_known_shift_and_warns(n, caplog):
    import selfconsist
    from selfconsist.evaluate import EvalConfig

    shape = (3, 12, 12)
    x = images(n, shape, lo=0.2, hi=0.8, seed=3)  # [0, 1] data, mapped to [-1, 1] by eval
    base = PixelVAE(shape)
    mu = 2 * x - 1
    s = mu.transpose(0, 1).reshape(3, -1).std(1)
    b = 0.3 * s  # a shift of 0.3 base-latent standard deviations in every channel
    tuned = PixelVAE(shape, offset=b)
    cfg = EvalConfig(samples=4, pgd_steps=1, eps=(0.1,), bootstrap=2, responsive_samples=2,
                     device="cpu", figures=False, cycles=(1, 3))
    with caplog.at_level(logging.WARNING, logger="selfconsist"):
        m = selfconsist.evaluate(base, compare=tuned, data=x, config=cfg).metrics
    res = m["models"]["tuned"]
    assert res["latent_shift"]["value"] == pytest.approx(0.3, rel=1e-4)
    # the base model is an exact inverse; the tuned one adds b_c per cycle: x_k = x₀ + k·b
    # (nothing clips), so PSNR_k = 10 log10(2² / mean_c (k·b_c)²) for every image
    assert m["models"]["model"]["cycle_psnr@3"]["value"] == R.PSNR_CAP_DB
    assert m["models"]["model"]["cycle_db_lost"]["value"] == 0.0
    for k in (1, 3):
        want = 10 * math.log10(4.0 / float((k * b).pow(2).mean()))
        assert res[f"cycle_psnr@{k}"]["value"] == pytest.approx(want, rel=1e-5)
    assert res["cycle_db_lost"]["value"] == pytest.approx(20 * math.log10(3), rel=1e-5)
    assert len(m["warnings"]) == 1 and "0.300" in m["warnings"][0]
    assert [r.getMessage() for r in caplog.records] == m["warnings"]


# --- pipeline-style cycles (sampled posterior, uint8 between cycles) and the idempotent bound ----

def test_quantize_uint8_is_what_a_saved_png_reads_back():
    x = images(2)
    q = R.quantize_uint8(x, (-1.0, 1.0))
    want = torch.from_numpy(np.round((x.numpy() + 1) / 2 * 255).astype(np.uint8)).double() / 255 * 2 - 1
    torch.testing.assert_close(q.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(R.quantize_uint8(q, (-1.0, 1.0)), q)  # idempotent


def test_pipeline_cycles_on_an_identity_model_have_known_answers():
    """Identity model (μ(x) = x, σ = e⁻², g = id): each pipeline cycle adds N(0, σ²) noise
    and quantises, so PSNR@1 ≈ 10·log10(4/(σ² + Δ²/12)) with Δ = 2/255; the mean chain
    is exact (120 dB cap)."""
    x = R.quantize_uint8(images(64, shape=(3, 16, 16), lo=-0.3, hi=0.3), (-1.0, 1.0))  # no clipping
    vae = PixelVAE()
    mean = R.cycle_metrics(vae, x, cycles=(1, 4), mode="mean")
    assert mean.estimates["image_psnr"].value == pytest.approx(R.PSNR_CAP_DB)
    pipe = R.cycle_metrics(vae, x, cycles=(1, 4), mode="pipeline", seed=3)
    sigma2 = math.exp(-4.0)
    step = 2.0 / 255
    want1 = 10 * math.log10(4.0 / (sigma2 + step**2 / 12))
    assert pipe.estimates["pipe_image_psnr"].value == pytest.approx(want1, abs=0.15)
    # K independent noises add up: MSE@4 ≈ 4σ² (+ quantisation), a loss of ≈ 10·log10(4) dB
    assert pipe.estimates["pipe_cycle_db_lost"].value == pytest.approx(10 * math.log10(4.0), abs=0.3)
    again = R.cycle_metrics(vae, x, cycles=(1, 4), mode="pipeline", seed=3)
    assert again.estimates["pipe_cycle_psnr@4"].value == pipe.estimates["pipe_cycle_psnr@4"].value


class DriftVAE(PixelVAE):
    """μ(x) = x + b (a constant offset b per channel), g = id: the mean chain drifts by b per
    cycle, x_K = x₀ + K·b, while the decoder is exactly invertible."""


def test_idempotent_bound_undoes_an_encoder_drift():
    b = torch.tensor([0.02, -0.03, 0.01])
    vae = DriftVAE(offset=b)
    x = images(8, lo=-0.5, hi=0.5)
    mean = R.cycle_metrics(vae, x, cycles=(1, 5), mode="mean")
    bound = R.cycle_metrics(vae, x, cycles=(1, 5), mode="bound")
    # the encoder loses 10·log10(25) ≈ 14 dB from cycle 1 to 5 (error K·b against b)
    assert mean.estimates["cycle_db_lost"].value == pytest.approx(10 * math.log10(25), abs=0.05)
    # the bound keeps the first encode (same x₁) and inverts g exactly afterwards: nothing lost
    assert abs(bound.estimates["bound_cycle_db_lost"].value) < 0.1
    assert "bound_image_psnr" not in bound.estimates  # the first pass is the encoder's, as above


def test_invert_decoder_touches_no_parameters():
    vae = PixelVAE(gain=0.5)
    x = images(2)
    z = R.invert_decoder(vae, x, torch.zeros_like(x), steps=200, lr=0.05)
    assert (vae.decode(z) - x).abs().max() < 1e-2
    assert all(p.grad is None for p in vae.dummy.parameters())
