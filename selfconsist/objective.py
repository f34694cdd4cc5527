r"""The AVAE objective as pure functions.

Notation follows ``docs/design.md``:

* prior p(z) = N(m, diag s²); whitened coordinates u = (z − m)/s;
* encoder q(z|x) = N(μ, diag σ²); whitened μ̂ = (μ − m)/s, σ̂ = σ/s, so log σ̂² = log σ² − 2 log s;
* decoder mean g(z); Gaussian likelihood with observation variance v, or Bernoulli;
* coupling kernel p(u′|u) = N(ρu, (1 − ρ²) I).

Every function takes batched tensors (batch first) and returns one value per
batch item, summed over the remaining (latent or data) elements. Nothing here
knows about models: the training recipes feed these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
#: The Bernoulli likelihood's clamp of p to [ε, 1 − ε] (mlp_step differentiates through it).
BERNOULLI_EPS = 1e-6


def _sum_per_item(t: Tensor) -> Tensor:
    """Sum over every dimension except the first (the batch)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def whiten(mean: Tensor, logvar: Tensor, prior_mean: Tensor, prior_std: Tensor) -> tuple[Tensor, Tensor]:
    r"""Map q(z) = N(μ, σ²) to whitened coordinates u = (z − m)/s.

    μ̂ = (μ − m)/s,   log σ̂² = log σ² − 2 log s.
    ``prior_mean`` and ``prior_std`` broadcast against ``mean`` (without the batch dim).
    """
    mean_hat = (mean - prior_mean) / prior_std
    logvar_hat = logvar - 2.0 * torch.log(prior_std)
    return mean_hat, logvar_hat


def kl_to_standard_normal(mean_hat: Tensor, logvar_hat: Tensor) -> Tensor:
    r"""KL(N(μ̂, σ̂²) ‖ N(0, 1)), summed over elements.

    KL = ½ Σᵢ (μ̂ᵢ² + σ̂ᵢ² − 1 − log σ̂ᵢ²).

    KL is invariant under the whitening map, so this equals KL(q(z|x) ‖ p(z))
    for the prior N(m, s²).
    """
    return 0.5 * _sum_per_item(mean_hat.pow(2) + logvar_hat.exp() - 1.0 - logvar_hat)


def kl_diagonal_gaussians(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor,
                          logvar_p: Tensor) -> Tensor:
    r"""KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) for diagonal Gaussians, summed over elements.

    KL = ½ Σᵢ (log σ_pᵢ² − log σ_qᵢ² + (σ_qᵢ² + (μ_qᵢ − μ_pᵢ)²) / σ_pᵢ² − 1).

    ``tune``'s anchor uses it with q the tuned and p the frozen base encoder on the same input.
    It is invariant under a shared affine map of z, so raw and whitened latents give the same
    value. With a sharp base posterior (SD-style VAEs: σ_p ≈ 1% of the latent spread) it is
    dominated by (μ_q − μ_p)²/(2σ_p²), i.e. very large per unit of shift, which is why the
    useful anchor weights there are small (see the README's latent-diffusion section).
    """
    var_ratio = (logvar_q - logvar_p).exp()
    return 0.5 * _sum_per_item(logvar_p - logvar_q + var_ratio
                               + (mean_q - mean_p).pow(2) / logvar_p.exp() - 1.0)


def gaussian_log_likelihood(x: Tensor, x_mean: Tensor, obs_var: float) -> Tensor:
    r"""log N(x; g(z), v I), summed over data elements.

    log p(x|z) = −‖x − g(z)‖² / (2v) − (D/2) log(2πv).
    """
    return gaussian_log_likelihood_of_residual(x - x_mean, obs_var)


def gaussian_log_likelihood_of_residual(residual: Tensor, obs_var: float) -> Tensor:
    r""":func:`gaussian_log_likelihood` from the residual r = g(z) − x (either sign):
    −‖r‖² / (2v) − (D/2) log(2πv). ``mlp_step`` reuses r for the gradient (g(z) − x)/v."""
    d = residual[0].numel()
    sq = _sum_per_item(residual.pow(2))
    return -sq / (2.0 * obs_var) - 0.5 * d * (LOG_2PI + math.log(obs_var))


def bernoulli_log_likelihood(x: Tensor, x_mean: Tensor, eps: float = BERNOULLI_EPS) -> Tensor:
    r"""log Bernoulli(x; p = g(z)), summed over elements; x ∈ [0, 1] (continuous x allowed).

    log p(x|z) = Σ x log p + (1 − x) log(1 − p), with p clamped to [ε, 1 − ε].
    """
    p = x_mean.clamp(eps, 1.0 - eps)
    return _sum_per_item(x * torch.log(p) + (1.0 - x) * torch.log1p(-p))


def log_likelihood(x: Tensor, x_mean: Tensor, likelihood: str, obs_var: float) -> Tensor:
    """Dispatch to :func:`gaussian_log_likelihood` or :func:`bernoulli_log_likelihood`."""
    if likelihood == "gaussian":
        return gaussian_log_likelihood(x, x_mean, obs_var)
    if likelihood == "bernoulli":
        return bernoulli_log_likelihood(x, x_mean)
    raise ValueError(f"unknown likelihood {likelihood!r}; expected 'gaussian' or 'bernoulli'")


def coupling_log_prob(
    mean_hat: Tensor, logvar_hat: Tensor, mean_hat2: Tensor, logvar_hat2: Tensor, rho: float
) -> Tensor:
    r"""E_{q(u|x) q(u′|x̃)}[log p(u′|u)] in closed form, summed over elements.

    With p(u′|u) = N(ρu, (1 − ρ²)), per element:

        −½ log(2π(1 − ρ²)) − [σ̂′² + ρ² σ̂² + (μ̂′ − ρ μ̂)²] / (2(1 − ρ²)).

    (The official code's constant, d·log(1/2π), is wrong; this one is exact.)
    """
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must lie in (0, 1), got {rho}")
    one_m = 1.0 - rho * rho
    quad = logvar_hat2.exp() + rho * rho * logvar_hat.exp() + (mean_hat2 - rho * mean_hat).pow(2)
    return _sum_per_item(-0.5 * math.log(2.0 * math.pi * one_m) - quad / (2.0 * one_m))


def gaussian_entropy(logvar_hat: Tensor) -> Tensor:
    r"""H[N(μ̂, σ̂²)] = ½ Σᵢ log(2πe σ̂ᵢ²), summed over elements (whitened units)."""
    return _sum_per_item(0.5 * (LOG_2PI + 1.0 + logvar_hat))


def coupling_term(
    mean_hat: Tensor, logvar_hat: Tensor, mean_hat2: Tensor, logvar_hat2: Tensor, rho: float
) -> Tensor:
    r"""C(x) = E[log p(u′|u)] + H[q(u′|x̃)]: minus the KL from the re-encoding to the kernel.

    (μ̂, σ̂²) describe q(u|x), (μ̂′, σ̂′²) the re-encoding q(u′|x̃) of x̃ = g(z).
    In z-units the kernel's log density gains −Σ log s and the entropy +Σ log s,
    so C is the same number in either coordinate system.
    """
    return coupling_log_prob(mean_hat, logvar_hat, mean_hat2, logvar_hat2, rho) + gaussian_entropy(
        logvar_hat2
    )


def consistency_kl(
    mean_hat0: Tensor, mean_hat2: Tensor, logvar_hat2: Tensor, rho: float
) -> Tensor:
    r"""KL(q(u′|g(z₀)) ‖ N(ρu₀, 1 − ρ²)), summed over elements; u₀ is a point (a prior sample).

    KL = ½ Σᵢ [ (σ̂′ᵢ² + (μ̂′ᵢ − ρu₀ᵢ)²)/(1 − ρ²) − 1 − log σ̂′ᵢ² + log(1 − ρ²) ].
    """
    one_m = 1.0 - rho * rho
    t = (logvar_hat2.exp() + (mean_hat2 - rho * mean_hat0).pow(2)) / one_m
    return 0.5 * _sum_per_item(t - 1.0 - logvar_hat2 + math.log(one_m))


def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""z = μ + ε·σ with ε ~ N(0, I). (The official code multiplies by σ², which is wrong.)

    ε is drawn on the generator's device and moved to ``mean``'s, so a CPU generator gives the
    same stream whether the model runs on CPU or GPU.
    """
    gen_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
    return mean + eps * torch.exp(0.5 * logvar)


def elbo(log_lik: Tensor, kl: Tensor) -> Tensor:
    r"""The VAE ELBO per item: E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)) (one-sample estimate of the first term)."""
    return log_lik - kl


def avae_objective(log_lik: Tensor, kl: Tensor, coupling: Tensor, lambda_rec: float = 1.0) -> Tensor:
    r"""The AVAE bound per item: λ_rec·E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)) + C(x).

    From scratch, x is data and λ_rec = 1. Post hoc, x = g(z₀) with z₀ ~ p(z) and only the
    encoder trains: λ_rec = 1 is the faithful bound, 0 skips the backward pass through the
    decoder, and larger values (tune's default 5) sharpen the likelihood of the noise-free
    model samples.
    """
    return lambda_rec * log_lik - kl + coupling


# --- Cycle consistency (docs/design.md, "Cycle-consistency objectives") -----------------------
# What an encode → decode loop needs is an encoder that inverts the decoder on the decoder's own
# range, E(g(z)) = z, so that the latent stops moving after the first encode. These are the
# per-item losses ``tune --objective cycle`` minimises; means over elements keep their scale
# independent of the image size.


def latent_idempotence(mean_reenc: Tensor, z: Tensor, scale: Tensor) -> Tensor:
    r"""Latent idempotence: mean over elements of ((μ(g(z)) − z)/s)².

    ``scale`` s is the latent standard deviation (the prior's std; for a latent-diffusion VAE
    1/scaling_factor), so the value is in units of the latent spread: 0.01 ≙ a 0.1-σ step.
    """
    return ((mean_reenc - z) / scale).pow(2).reshape(z.shape[0], -1).mean(dim=1)


def pixel_idempotence(x_cycled: Tensor, x: Tensor, obs_var: float) -> Tensor:
    r"""Pixel idempotence: mean over elements of (g(μ(g(z))) − g(z))² / v.

    x = g(z) is a decoded sample and ``x_cycled`` = g(μ(x)) the same image after one more
    encode → decode; the gradient reaches the encoder *through* the frozen decoder, so latent
    errors count by how much they change the image. Up to constants this is −(2/D)·log p(x|μ(x))
    of the Gaussian likelihood with variance v: the AVAE's λ_rec term at the posterior mean.
    """
    return (x_cycled - x).pow(2).reshape(x.shape[0], -1).mean(dim=1) / obs_var


def mean_anchor(mean: Tensor, mean_base: Tensor, scale: Tensor) -> Tensor:
    r"""Anchor: mean over elements of ((μ_tuned(x) − μ_base(x))/s)², on inputs x that the
    cycle term does not move (the user's images, or decoded samples pushed off the decoder's
    range). Unlike KL(q_tuned ‖ q_base), whose weight per unit of shift is 1/σ_base² (huge for
    SD-style posteriors), it measures the shift in the same units as the latent shift metric.
    """
    return ((mean - mean_base) / scale).pow(2).reshape(mean.shape[0], -1).mean(dim=1)
