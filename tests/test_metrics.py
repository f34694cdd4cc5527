"""Metrics on models whose answers are known: a perfectly self-consistent linear-Gaussian VAE
and a constant encoder; plus the PGD attack's guarantees on a real (random) MLP VAE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from selfconsist import metrics as M
from selfconsist.adapters.base import DiagonalGaussian, VAEAdapter
from selfconsist.adapters.builtin import new_model
from selfconsist.metricdefs import DEFINITIONS
from selfconsist.models import ModelConfig

SIGMA2 = 0.01  # the linear model's fixed posterior variance


class LinearGaussianVAE(VAEAdapter):
    """g(z) = Wz with orthonormal columns W (D × d); encoder mean Wᵀx, variance SIGMA2.

    μ(g(z)) = WᵀWz = z: every round trip is exact.
    """

    name = "test-linear"

    def __init__(self, w: Tensor, lo: float = -50.0, hi: float = 50.0) -> None:
        super().__init__()
        self.enc = nn.Linear(w.shape[0], w.shape[1], bias=False)
        self.dec = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.enc.weight.copy_(w.T)
            self.dec.weight.copy_(w)
        self._range = (lo, hi)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.enc.out_features,)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.enc.in_features,)

    @property
    def data_range(self) -> tuple[float, float]:
        return self._range

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean = self.enc(x.flatten(1))
        return DiagonalGaussian(mean, torch.full_like(mean, math.log(SIGMA2)))

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.enc]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.dec]

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        raise NotImplementedError


class ConstantEncoderVAE(LinearGaussianVAE):
    """Same decoder; the encoder ignores its input: μ(x) = c for every x."""

    def __init__(self, w: Tensor) -> None:
        super().__init__(w, 0.0, 1.0)
        self.const = nn.Parameter(torch.full((w.shape[1],), 0.3))
        self.enc_holder = nn.ParameterList([self.const])

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean = self.const.expand(x.shape[0], -1)
        return DiagonalGaussian(mean, torch.zeros_like(mean))

    def encoder_modules(self) -> list[nn.Module]:
        return [self.enc_holder]


class SpatialVAE(VAEAdapter):
    """Latent (2, 4, 4); the decoder reads channel 0 only (channel 1 is ignored)."""

    name = "test-spatial"

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (2, 4, 4)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 4, 4)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean = torch.cat([x, torch.zeros_like(x)], 1)
        return DiagonalGaussian(mean, torch.zeros_like(mean))

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(z[:, :1])

    def encoder_modules(self) -> list[nn.Module]:
        return [self.lin]

    def decoder_modules(self) -> list[nn.Module]:
        return []

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        raise NotImplementedError


def orthonormal(big: int, small: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(big, small, generator=g))
    return q


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- (a) a perfectly self-consistent linear-Gaussian VAE ------------------------------------

@pytest.fixture()
def linear() -> LinearGaussianVAE:
    return LinearGaussianVAE(orthonormal(12, 4))


def test_linear_sample_roundtrip_is_exact(linear: LinearGaussianVAE) -> None:
    r = M.sample_roundtrip(linear, 500, gen(), rho=0.9)
    assert float(r["mse"].max()) < 1e-10
    corr = M.per_element_corr(r["u0"], r["mu_hat"])
    assert corr.shape == (4,)
    assert torch.allclose(corr, torch.ones(4), atol=1e-5)
    # consistency KL has a closed form here: q(u|g(z₀)) = N(u₀, σ²), the kernel N(ρu₀, 1 − ρ²)
    rho, one_m = 0.9, 1 - 0.81
    u0 = r["u0"].double()
    expected = 0.5 * ((SIGMA2 + (1 - rho) ** 2 * u0.pow(2)) / one_m - 1 - math.log(SIGMA2)
                      + math.log(one_m)).mean(1)
    assert torch.allclose(r["consistency_kl"].double(), expected, rtol=1e-4, atol=1e-5)


def test_linear_summary_and_responsive(linear: LinearGaussianVAE) -> None:
    resp = M.decoder_responses(linear, gen(1), n=16, delta=1.0)
    # ‖W(z + eᵢ) − Wz‖² = ‖Weᵢ‖² = 1 for every element and sample
    assert resp.mode == "element"
    assert torch.allclose(resp.per_sample, torch.ones(16, 4, dtype=torch.float64), atol=1e-5)
    mask = M.responsive_elements(linear, gen(1))
    assert mask.dtype == torch.bool and mask.shape == (4,) and int(mask.sum()) == 4
    s = M.roundtrip_summary(linear, n=256, seed=0, rho=0.9, responsive=mask)
    assert s["sample_roundtrip_mse"]["value"] < 1e-10
    assert s["latent_roundtrip_corr"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert s["latent_roundtrip_corr_responsive"]["value"] == pytest.approx(1.0, abs=1e-5)


def test_linear_drift_reconstruction_active_units(linear: LinearGaussianVAE) -> None:
    x = linear.decode(torch.randn(300, 4, generator=gen(2))).detach()
    drift, chains = M.drift_chain(linear, x, k=10, keep=3)
    assert float(drift.max()) < 1e-10
    assert chains.shape == (3, 11, 12)
    assert torch.allclose(chains[:, 0], x[:3]) and torch.allclose(chains[:, 10], x[:3], atol=1e-5)
    mse = M.Estimate.of(M.reconstruction_mse(linear, x))
    assert mse.value < 1e-10
    assert M.psnr(mse, linear.data_range).value > 100  # floored at 120 dB
    assert int(M.active_units(linear, x).sum()) == 4


def test_encode_batched_is_one_encode_in_pieces() -> None:
    # Any batch size gives the single full-batch encode; raw on the CPU by default, and
    # encode_mean is its whitening under the prior.
    vae = LinearGaussianVAE(torch.eye(12)[:, :4])
    x = torch.randn(37, 12, generator=gen(2))
    q = vae.encode(x)
    for bs in (1, 5, 37, 64):
        mean, logvar = M.encode_batched(vae, x, bs)
        assert mean.device.type == "cpu" and mean.dtype == torch.float32
        assert torch.allclose(mean, q.mean.detach()) and torch.equal(logvar, q.logvar)
    mh, lvh = M.encode_mean(vae, x, 5)
    p = vae.prior
    assert torch.allclose(mh, (q.mean.detach() - p.mean) / p.std)
    assert torch.allclose(lvh, q.logvar - 2 * torch.log(p.std))


def test_linear_adversarial_shift_has_the_exact_maximum() -> None:
    # W = first d columns of the identity: μ̂(x + δ) − μ̂(x) = δ[:d], so the maximum over the
    # ℓ∞ ball is d·ε², reached at the corners; 20 steps of ε/8 reach them from any start.
    vae = LinearGaussianVAE(torch.eye(12)[:, :4])
    x = vae.decode(torch.randn(200, 4, generator=gen(3))).detach()
    eps = 0.1
    shift, x_adv = M.adversarial_shift(vae, x, eps, steps=20, generator=gen(4), keep=200)
    assert torch.allclose(shift, torch.full_like(shift, 4 * eps**2), rtol=1e-4)
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    mu, _ = M.encode_mean(vae, x)
    den = M.code_pair_distance(mu)
    # E_{i≠j}‖aᵢ − aⱼ‖² over all pairs, brute force
    a = mu.double()
    brute = float(torch.cdist(a, a).pow(2).sum() / (a.shape[0] * (a.shape[0] - 1)))
    assert den == pytest.approx(brute, rel=1e-6)
    r = M.ratio_estimate(M.Estimate.of(shift), den)
    assert r.value == pytest.approx(4 * eps**2 / den, rel=1e-4)


def test_linear_probe_clean_and_adversarial() -> None:
    # label = [u₀ > 0]; after PGD at ε, the inputs with |u₀| ≲ ε flip: accuracy ≈ P(|u| > ε).
    vae = LinearGaussianVAE(torch.eye(12)[:, :4])
    z = torch.randn(3000, 4, generator=gen(5))
    x, y = vae.decode(z).detach(), (z[:, 0] > 0).long()
    feats, _ = M.encode_mean(vae, x[:2000])
    probe = M.fit_probe(feats, y[:2000], 2)
    clean = M.binomial_estimate(M.probe_correct(vae, probe, x[2000:], y[2000:]))
    assert clean.value > 0.97
    eps = 0.5
    adv = M.binomial_estimate(M.probe_correct_adversarial(vae, probe, x[2000:], y[2000:], eps,
                                                         generator=gen(6)))
    expected = float(torch.erfc(torch.tensor(eps / math.sqrt(2))))  # P(|u| > ε)
    assert adv.value == pytest.approx(expected, abs=0.07)
    assert adv.stderr == pytest.approx(math.sqrt(adv.value * (1 - adv.value) / 1000))


# --- (b) a constant encoder: robust and useless ---------------------------------------------

def test_constant_encoder_is_robust_inactive_and_at_chance() -> None:
    vae = ConstantEncoderVAE(orthonormal(12, 4))
    x = torch.rand(400, 12, generator=gen(7))
    shift, _ = M.adversarial_shift(vae, x, 0.2, generator=gen(8))
    assert float(shift.abs().max()) == 0.0
    mu, _ = M.encode_mean(vae, x)
    assert M.code_pair_distance(mu) == 0.0
    assert M.ratio_estimate(M.Estimate.of(shift), M.code_pair_distance(mu)).value == 0.0
    assert int(M.active_units(vae, x).sum()) == 0
    # balanced labels over 4 classes: the probe can only learn the class frequencies
    y = torch.arange(400) % 4
    probe = M.fit_probe(mu[:200], y[:200], 4)
    acc = M.binomial_estimate(M.probe_correct(vae, probe, x[200:], y[200:])).value
    assert acc == pytest.approx(0.25, abs=0.01)
    adv = M.probe_correct_adversarial(vae, probe, x[200:], y[200:], 0.2, generator=gen(9))
    assert float(adv.mean()) == pytest.approx(acc)
    r = M.sample_roundtrip(vae, 200, gen(10))
    assert torch.equal(M.per_element_corr(r["u0"], r["mu_hat"]), torch.zeros(4))


# --- PGD on a non-trivial model ---------------------------------------------------------------

def test_pgd_beats_random_noise_and_stays_in_bounds() -> None:
    vae = new_model(ModelConfig(data_shape=(1, 8, 8), latent_dim=8, hidden=32, depth=2), seed=0)
    for m in vae.encoder_modules() + vae.decoder_modules():
        m.eval()
    x = torch.rand(128, 1, 8, 8, generator=gen(11))
    x[:, :, :2] = 0.0  # pixels on the data range's edges: clipping must hold them inside
    x[:, :, -2:] = 1.0
    eps = 0.1
    shift, x_adv = M.adversarial_shift(vae, x, eps, steps=20, generator=gen(12), keep=128)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # the same ε as random ±ε noise (the strongest random ℓ∞ perturbation), clipped alike
    sign = torch.randint(0, 2, x.shape, generator=gen(13)).float() * 2 - 1
    x_rand = (x + eps * sign).clamp(0, 1)
    with torch.no_grad():
        mu0 = M._whitened_mean(vae, x)
        rand_shift = (M._whitened_mean(vae, x_rand) - mu0).pow(2).sum(1)
    assert float(shift.mean()) > 2.0 * float(rand_shift.mean())
    assert bool((shift >= 0).all())
    # gradients are taken with respect to the input only
    assert all(p.grad is None for p in vae.encoder_parameters())


def test_pgd_respects_a_narrow_data_range() -> None:
    # ε larger than the range: the data range wins
    x = torch.full((4, 3), 0.5)
    xa = M.pgd_linf(lambda v: (v + 1).pow(2).sum(1), x, eps=2.0, data_range=(0.0, 1.0),
                    generator=gen(14))
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert torch.equal(xa, torch.ones_like(xa))  # the maximum of Σ(x + 1)² on [0, 1]³


# --- decoder responses: batched, and per channel for big spatial latents ----------------------

def test_responses_batched_match_one_at_a_time() -> None:
    vae = new_model(ModelConfig(data_shape=(1, 8, 8), latent_dim=6, hidden=16, depth=1), seed=1)
    r = M.decoder_responses(vae, gen(15), n=10, delta=0.5, batch_size=7)
    z = vae.sample_prior(10, gen(15))
    with torch.no_grad():
        base = vae.decode(z)
        for i in range(6):
            zi = z.clone()
            zi[:, i] += 0.5
            ri = (vae.decode(zi) - base).pow(2).flatten(1).sum(1).double()
            assert torch.allclose(r.per_sample[:, i], ri, rtol=1e-5, atol=1e-9)


def test_big_spatial_latents_are_probed_per_channel() -> None:
    vae = SpatialVAE()
    exact = M.decoder_responses(vae, gen(16), n=8)
    assert exact.mode == "element" and exact.per_sample.shape == (8, 32)
    per_channel = M.decoder_responses(vae, gen(16), n=8, max_elements=8)
    assert per_channel.mode == "channel" and per_channel.per_sample.shape == (8, 2)
    for r in (exact, per_channel):
        mask = r.mask(0.01)
        assert mask.shape == (32,)
        assert bool(mask[:16].all()) and not bool(mask[16:].any())


# --- small pieces -------------------------------------------------------------------------------

def test_estimates_and_bootstrap() -> None:
    e = M.Estimate.of(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert e.value == 2.5 and e.stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    b = M.binomial_estimate(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert b.value == 0.75 and b.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    p = M.psnr(M.Estimate(0.01, 0.001), (0.0, 1.0))
    assert p.value == pytest.approx(20.0) and p.stderr == pytest.approx(10 / math.log(10) * 0.1)
    data = torch.randn(400, generator=gen(17))
    boot = M.bootstrap(lambda rows: float(data[rows].mean()), (400,), gen(18), reps=300)
    assert boot.value == pytest.approx(float(data.mean()))
    assert boot.stderr == pytest.approx(float(data.std() / 20), rel=0.25)
    again = M.bootstrap(lambda rows: float(data[rows].mean()), (400,), gen(18), reps=300)
    assert again == boot  # seeded: deterministic


def test_roundtrip_corr_is_one_definition_with_a_sampling_stderr(linear) -> None:
    # Half the elements re-encode exactly, half carry no information: the mean is ~0.5, and
    # its standard error is the sampling error over prior samples (small with n = 2000), not
    # the spread of the per-element correlations (~0.5/√8 ≈ 0.19, what tune once printed).
    g = gen(7)
    u0 = torch.randn(2000, 8, generator=g)
    mu = torch.cat([u0[:, :4], torch.randn(2000, 4, generator=g)], 1)
    est = M.roundtrip_corr(u0, mu, generator=gen(1))
    assert est.value == pytest.approx(0.5, abs=0.03)
    assert 0 < est.stderr < 0.02
    mask = torch.tensor([True] * 4 + [False] * 4)
    assert M.roundtrip_corr(u0, mu, mask, gen(1)).value == pytest.approx(1.0, abs=1e-6)
    # tune's before/after table uses the same estimator on the same draws
    s = M.roundtrip_summary(linear, n=256, seed=0, rho=0.9, responsive=torch.ones(4, dtype=bool))
    r = M.sample_roundtrip(linear, 256, torch.Generator().manual_seed(0), 0.9)
    same = M.roundtrip_corr(r["u0"], r["mu_hat"], None, torch.Generator().manual_seed(1))
    assert s["latent_roundtrip_corr"] == same.as_dict()
    assert list(s)[:2] == ["sample_roundtrip_mse", "latent_roundtrip_corr_responsive"]
    assert "latent_roundtrip_corr" in DEFINITIONS
