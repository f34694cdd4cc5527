"""The per-batch losses of post-hoc tuning, one function per objective (``tune --objective``).

Each takes a batch of latents z₀ and returns the per-item terms; :data:`OBJECTIVES` maps the
objective's name to its terms function and to how the terms combine into the loss. The math
(pure functions) is in :mod:`selfconsist.objective`; docs/design.md derives it.

``avae``   the AVAE bound on model samples, x = g(z₀), only the encoder trains:
           maximise λ_rec·log p(x|z) − KL(q(z|x) ‖ p) + C(x)  [− a·KL(q_tuned ‖ q_base)].
``cycle``  idempotence of encode → decode, what an img2img/inpainting loop needs:
           minimise ‖μ(g(z₀)) − z₀‖²/s² (latent) or ‖g(μ(g(z₀))) − g(z₀)‖²/v (pixel),
           + a·‖μ_tuned(x_a) − μ_base(x_a)‖²/s² on anchor inputs x_a that must not move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import objective as obj
from .adapters.base import VAEAdapter, randn


@dataclass
class Batch:
    """What one step works on: the latents, and the anchor inputs with their base means."""

    z0: Tensor
    anchor_x: Tensor | None = None  # the user's images (--images with --anchor)
    anchor_base: tuple[Tensor, Tensor] | None = None  # their base posteriors (mean, logvar)


def posthoc_terms(vae: VAEAdapter, z0: Tensor, cfg: Any, obs_var: float,
                  gen: torch.Generator, base: VAEAdapter | None = None,
                  anchor_x: Tensor | None = None,
                  anchor_q: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-item terms of the AVAE objective on model samples x = g(z₀).

    x̃ = g(z) with z ~ q(z|x) carries the gradient to μ, σ when λ_rec > 0; the re-encoding
    q(z′|x̃) sees x̃ as a constant (stop-gradient). With ``cfg.anchor > 0`` an ``anchor`` term
    KL(q_tuned(z|x) ‖ q_base(z|x)) is added: on ``anchor_x`` with the base posteriors
    ``anchor_q`` precomputed (the user's images), or else on the decoded samples x through the
    frozen ``base`` model (one more encoder forward).
    """
    prior = vae.prior
    with torch.no_grad():
        x = vae.decode(z0).float()
        if cfg.sample_noise:
            x = x + math.sqrt(obs_var) * randn(x.shape, gen, x.device)
    q = vae.encode(x)
    mh, lvh = obj.whiten(q.mean.float(), q.logvar.float(), prior.mean, prior.std)
    z = obj.reparameterize(q.mean.float(), q.logvar.float(), gen)
    if cfg.lambda_rec > 0:
        x_rec = vae.decode(z).float()  # the gradient reaches the encoder through z
        log_lik = obj.log_likelihood(x, x_rec, vae.likelihood, obs_var)
    else:  # cheaper: no backward pass through the decoder
        with torch.no_grad():
            x_rec = vae.decode(z).float()
        log_lik = torch.zeros(x.shape[0], device=x.device)
    q2 = vae.encode(x_rec.detach())  # x̃ is a constant: stop-gradient
    mh2, lvh2 = obj.whiten(q2.mean.float(), q2.logvar.float(), prior.mean, prior.std)
    terms = {"log_lik": log_lik, "kl": obj.kl_to_standard_normal(mh, lvh),
             "coupling": obj.coupling_term(mh, lvh, mh2, lvh2, cfg.rho)}
    if cfg.anchor > 0:
        if anchor_x is not None and anchor_q is not None:
            qa, (mb, lvb) = vae.encode(anchor_x), anchor_q
        else:
            qa = q
            with torch.no_grad():
                qb = base.encode(x)
            mb, lvb = qb.mean.float(), qb.logvar.float()
        terms["anchor"] = obj.kl_diagonal_gaussians(qa.mean.float(), qa.logvar.float(), mb, lvb)
    return terms


def avae_loss(terms: dict[str, Tensor], cfg: Any) -> Tensor:
    """−mean(λ_rec·log p(x|z) − KL + C) + a·mean(anchor KL)."""
    loss = -obj.avae_objective(terms["log_lik"], terms["kl"], terms["coupling"], cfg.lambda_rec).mean()
    if "anchor" in terms:
        loss = loss + cfg.anchor * terms["anchor"].mean()
    return loss


def perturb_off_range(x: Tensor, std: float, gen: torch.Generator, data_range: tuple[float, float]) -> Tensor:
    """Decoded samples pushed off the decoder's range: + N(0, (std·range)²) per element.

    A data-free stand-in for real images, whose residual x − g(μ(x)) is detail the decoder
    cannot produce: the anchor holds the encoder in place there while the cycle term moves it
    on the decoder's range.
    """
    lo, hi = data_range
    return x + std * (hi - lo) * randn(x.shape, gen, x.device)


def cycle_terms(vae: VAEAdapter, z0: Tensor, cfg: Any, obs_var: float,
                gen: torch.Generator, base: VAEAdapter | None = None,
                anchor_x: Tensor | None = None,
                anchor_q: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-item terms of the cycle objective (module docstring) on a batch z₀.

    With ``cfg.cycle_depth`` K > 0, z₀ is first moved k ~ U{0..K} cycles by the *current*
    encoder (no gradient): the loss then sees the latents that the loop itself reaches.
    The anchor inputs go through the encoder in the same call as the decoded samples (one
    encoder pass of 2B, not two of B).
    """
    s = vae.prior.std
    with torch.no_grad():
        depth = int(torch.randint(cfg.cycle_depth + 1, (1,), generator=gen)) if cfg.cycle_depth else 0
        for _ in range(depth):
            z0 = vae.encode(vae.decode(z0).float()).mean.float()
        x = vae.decode(z0).float()
    xa = target = None
    if cfg.anchor > 0:
        if anchor_x is not None and anchor_q is not None:
            xa, target = anchor_x, anchor_q[0]
        else:
            xa = perturb_off_range(x, cfg.anchor_noise, gen, vae.data_range)
            with torch.no_grad():
                target = base.encode(xa).mean.float()
    mean = vae.encode(x if xa is None else torch.cat([x, xa.to(x.dtype)])).mean.float()
    mu = mean[:x.shape[0]]
    if cfg.cycle_space == "latent":
        terms = {"cycle": obj.latent_idempotence(mu, z0, s)}
    else:
        terms = {"cycle": obj.pixel_idempotence(vae.decode(mu).float(), x, obs_var)}
    if xa is not None:
        terms["anchor"] = obj.mean_anchor(mean[x.shape[0]:], target, s)
    return terms


def cycle_loss(terms: dict[str, Tensor], cfg: Any) -> Tensor:
    """mean(cycle) + a·mean(anchor)."""
    loss = terms["cycle"].mean()
    if "anchor" in terms:
        loss = loss + cfg.anchor * terms["anchor"].mean()
    return loss


@dataclass(frozen=True)
class Objective:
    terms: Callable[..., dict[str, Tensor]]
    loss: Callable[[dict[str, Tensor], Any], Tensor]
    #: the term the progress bar shows second, after the loss
    headline: str


def _avae_terms(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
    # Looked up at call time so that a test can substitute posthoc_terms (tests/test_ddp.py).
    return posthoc_terms(*args, **kwargs)


OBJECTIVES: dict[str, Objective] = {
    "avae": Objective(_avae_terms, avae_loss, "coupling"),
    "cycle": Objective(cycle_terms, cycle_loss, "cycle"),
}
