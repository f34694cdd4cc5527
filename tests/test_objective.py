"""Closed forms of the objective against Monte Carlo estimates, and the whitening."""

from __future__ import annotations

import math

import pytest
import torch

from selfconsist import objective as obj


def _normal_logpdf(x, mean, var):
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_kl_matches_monte_carlo(gen):
    mean = torch.tensor([[0.3, -1.2, 2.0]])
    logvar = torch.tensor([[-0.5, 0.4, -2.0]])
    n = 400_000
    z = mean + torch.randn(n, 3, generator=gen) * torch.exp(0.5 * logvar)
    mc = (_normal_logpdf(z, mean, logvar.exp()) - _normal_logpdf(z, 0.0, torch.ones(()))).sum(1).mean()
    assert obj.kl_to_standard_normal(mean, logvar).item() == pytest.approx(mc.item(), abs=0.02)


def test_coupling_term_matches_monte_carlo(gen):
    rho = 0.9
    mu, lv = torch.tensor([[0.5, -0.7]]), torch.tensor([[-1.0, 0.2]])
    mu2, lv2 = torch.tensor([[0.2, -0.4]]), torch.tensor([[-1.5, -0.3]])
    n = 400_000
    u = mu + torch.randn(n, 2, generator=gen) * torch.exp(0.5 * lv)
    u2 = mu2 + torch.randn(n, 2, generator=gen) * torch.exp(0.5 * lv2)
    log_p = _normal_logpdf(u2, rho * u, torch.tensor(1 - rho**2)).sum(1).mean()
    log_q = _normal_logpdf(u2, mu2, lv2.exp()).sum(1).mean()
    assert obj.coupling_log_prob(mu, lv, mu2, lv2, rho).item() == pytest.approx(log_p.item(), abs=0.02)
    assert obj.coupling_term(mu, lv, mu2, lv2, rho).item() == pytest.approx((log_p - log_q).item(), abs=0.03)


def test_coupling_constant_is_exact_not_the_official_one():
    # With both posteriors points at the kernel's mean, C = −½ d log(2π(1−ρ²)) + entropy terms;
    # check the log-prob part alone at zero variance: −½ log(2π(1−ρ²)) per element.
    rho = 0.975
    z = torch.zeros(1, 4)
    lv = torch.full((1, 4), -50.0)
    expected = -0.5 * 4 * math.log(2 * math.pi * (1 - rho**2))
    assert obj.coupling_log_prob(z, lv, z, lv, rho).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(4 * math.log(1 / (2 * math.pi)))


def test_whitening_under_nonstandard_prior(gen):
    """C(x) computed in z-units with p(z) = N(m, s²) and kernel N(m + ρ(z − m), s²(1 − ρ²))
    equals the whitened closed form; KL is invariant too."""
    rho = 0.8
    m = torch.tensor([1.5, -2.0, 0.0])
    s = torch.tensor([0.3, 2.5, 7.0])
    mu = torch.tensor([[1.7, -1.0, 3.0]])
    lv = torch.log(torch.tensor([[0.01, 4.0, 20.0]]))
    mu2 = torch.tensor([[1.6, -1.5, 1.0]])
    lv2 = torch.log(torch.tensor([[0.02, 2.0, 30.0]]))
    n = 400_000
    z = mu + torch.randn(n, 3, generator=gen) * torch.exp(0.5 * lv)
    z2 = mu2 + torch.randn(n, 3, generator=gen) * torch.exp(0.5 * lv2)
    log_p = _normal_logpdf(z2, m + rho * (z - m), s**2 * (1 - rho**2)).sum(1).mean()
    log_q = _normal_logpdf(z2, mu2, lv2.exp()).sum(1).mean()
    mh, lvh = obj.whiten(mu, lv, m, s)
    mh2, lvh2 = obj.whiten(mu2, lv2, m, s)
    closed = obj.coupling_term(mh, lvh, mh2, lvh2, rho).item()
    assert closed == pytest.approx((log_p - log_q).item(), abs=0.03)
    # KL(q(z) ‖ N(m, s²)) by Monte Carlo in z-units
    kl_mc = (_normal_logpdf(z, mu, lv.exp()) - _normal_logpdf(z, m, s**2)).sum(1).mean()
    assert obj.kl_to_standard_normal(mh, lvh).item() == pytest.approx(kl_mc.item(), abs=0.03)


def test_consistency_kl_matches_monte_carlo(gen):
    rho = 0.9
    u0 = torch.tensor([[0.4, -1.0]])
    mu2, lv2 = torch.tensor([[0.3, -0.5]]), torch.tensor([[-2.0, -1.0]])
    n = 400_000
    u2 = mu2 + torch.randn(n, 2, generator=gen) * torch.exp(0.5 * lv2)
    mc = (_normal_logpdf(u2, mu2, lv2.exp()) - _normal_logpdf(u2, rho * u0, torch.tensor(1 - rho**2))).sum(1).mean()
    assert obj.consistency_kl(u0, mu2, lv2, rho).item() == pytest.approx(mc.item(), abs=0.02)


def test_gaussian_log_likelihood_matches_normal_density():
    x = torch.rand(2, 3, 4, 4)
    mean = torch.rand(2, 3, 4, 4)
    v = 0.05
    ref = torch.distributions.Normal(mean, math.sqrt(v)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(obj.gaussian_log_likelihood(x, mean, v), ref, atol=1e-3)


def test_bernoulli_log_likelihood_matches_torch():
    x = (torch.rand(3, 10) > 0.5).float()
    p = torch.rand(3, 10) * 0.9 + 0.05
    ref = torch.distributions.Bernoulli(probs=p).log_prob(x).sum(1)
    assert torch.allclose(obj.bernoulli_log_likelihood(x, p), ref, atol=1e-5)


def test_reparameterize_uses_std_not_variance(gen):
    mean, logvar = torch.zeros(200_000, 1), torch.full((200_000, 1), math.log(4.0))
    z = obj.reparameterize(mean, logvar, gen)
    assert z.std().item() == pytest.approx(2.0, rel=0.01)  # σ = 2; the official bug would give 4


def test_rho_out_of_range_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        obj.coupling_term(z, z, z, z, 1.0)


# --- cycle consistency --------------------------------------------------------------------------

def _linear_pair(consistent: bool):
    """A linear decoder g(z) = Az and an encoder E(x) = Bx: exactly consistent when BA = I."""
    torch.manual_seed(0)
    a = torch.randn(12, 4, dtype=torch.float64)
    b = torch.linalg.pinv(a)
    if not consistent:
        b = b + 0.05 * torch.randn_like(b)
    return (lambda z: z @ a.T), (lambda x: x @ b.T)


@pytest.mark.parametrize("consistent", [True, False])
def test_idempotence_losses_vanish_exactly_on_a_consistent_linear_model(consistent):
    g, enc = _linear_pair(consistent)
    z = torch.randn(16, 4, dtype=torch.float64)
    s = torch.full((4,), 2.0, dtype=torch.float64)
    lat = obj.latent_idempotence(enc(g(z)), z, s)
    pix = obj.pixel_idempotence(g(enc(g(z))), g(z), obs_var=0.1)
    if consistent:
        assert lat.abs().max() < 1e-20 and pix.abs().max() < 1e-20
    else:
        assert (lat > 1e-6).all() and (pix > 1e-6).all()
        # the latent form is in units of s: doubling s divides it by 4
        torch.testing.assert_close(obj.latent_idempotence(enc(g(z)), z, 2 * s), lat / 4)


def test_mean_anchor_is_zero_at_the_base_and_quadratic_in_the_shift():
    m = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64).view(4, 1, 1)
    assert obj.mean_anchor(m, m, s).abs().max() == 0
    shift = 0.1 * s  # 0.1 of each channel's std everywhere
    torch.testing.assert_close(obj.mean_anchor(m + shift, m, s), torch.full((3,), 0.01, dtype=torch.float64))
