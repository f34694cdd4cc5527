"""Self-consistency metrics, written against the adapter protocol only.

Every function takes a :class:`~selfconsist.adapters.VAEAdapter` and returns
plain floats (or tensors for per-element figures) together with a standard error
where it is a mean over samples. Notation as in ``shared/design/avae.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import objective as obj
from .adapters.base import VAEAdapter


@dataclass
class Estimate:
    """A mean over independent samples and its standard error."""

    value: float
    stderr: float

    @classmethod
    def of(cls, samples: Tensor) -> Estimate:
        s = samples.detach().double().flatten()
        se = float(s.std(unbiased=True) / math.sqrt(s.numel())) if s.numel() > 1 else float("nan")
        return cls(float(s.mean()), se)

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "stderr": self.stderr}


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield i, min(batch_size, n - i)


@torch.no_grad()
def encode_mean(vae: VAEAdapter, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Whitened (μ̂, log σ̂²) of q(z|x), computed in batches."""
    p = vae.prior
    means, logvars = [], []
    for i, b in _batches(x.shape[0], batch_size):
        q = vae.encode(x[i : i + b].to(vae.device))
        mh, lvh = obj.whiten(q.mean.float(), q.logvar.float(), p.mean, p.std)
        means.append(mh)
        logvars.append(lvh)
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def sample_roundtrip(vae: VAEAdapter, n: int, generator: torch.Generator, rho: float = 0.975,
                     batch_size: int = 256) -> dict[str, Tensor]:
    """Per-sample figures of the round trip z₀ ~ p(z) → x = g(z₀) → q(u|x) → x̂ = g(μ(x)).

    Returns per-sample tensors:

    * ``mse``: mean over data elements of (x − x̂)²;
    * ``consistency_kl``: KL(q(u|g(z₀)) ‖ N(ρu₀, 1 − ρ²)) per latent element;
    and the matrices ``u0`` and ``mu_hat`` (n × d) for correlations.
    """
    p = vae.prior
    mse, ckl, u0s, mus = [], [], [], []
    for _, b in _batches(n, batch_size):
        z0 = vae.sample_prior(b, generator)
        x = vae.decode(z0)
        q = vae.encode(x)
        mh, lvh = obj.whiten(q.mean.float(), q.logvar.float(), p.mean, p.std)
        u0 = ((z0 - p.mean) / p.std).float()
        x_hat = vae.decode(q.mean)
        d_x = x[0].numel()
        mse.append((x - x_hat).float().pow(2).reshape(b, -1).sum(1) / d_x)
        ckl.append(obj.consistency_kl(u0, mh, lvh, rho) / mh[0].numel())
        u0s.append(u0.reshape(b, -1).cpu())
        mus.append(mh.reshape(b, -1).cpu())
    return {"mse": torch.cat(mse).cpu(), "consistency_kl": torch.cat(ckl).cpu(),
            "u0": torch.cat(u0s), "mu_hat": torch.cat(mus)}


def per_element_corr(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of columns of ``a`` and ``b`` (n × d → d); 0 where a column is constant."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    denom = a.norm(dim=0) * b.norm(dim=0)
    corr = (a * b).sum(0) / denom.clamp_min(1e-12)
    return torch.where(denom > 1e-12, corr, torch.zeros_like(corr)).float()


@torch.no_grad()
def responsive_elements(vae: VAEAdapter, generator: torch.Generator, n: int = 64,
                        delta: float = 1.0, share: float = 0.01, batch_size: int = 64) -> Tensor:
    """Boolean mask (d,) of decoder-responsive latent elements.

    rᵢ = E_z ‖g(z + δ·s·eᵢ) − g(z)‖² over z ~ p(z) (δ in prior standard deviations);
    element i is responsive when rᵢ ≥ share · maxⱼ rⱼ.
    """
    p = vae.prior
    z = vae.sample_prior(n, generator)
    d = z[0].numel()
    base = vae.decode(z).float()
    resp = torch.zeros(d, dtype=torch.float64)
    std = p.std.expand(vae.latent_shape).reshape(-1)
    for i in range(d):
        zi = z.clone().reshape(n, -1)
        zi[:, i] += delta * std[i]
        out = torch.cat([vae.decode(zi[j : j + batch_size].reshape(-1, *vae.latent_shape)).float()
                         for j in range(0, n, batch_size)])
        resp[i] = (out - base).pow(2).reshape(n, -1).sum(1).mean().double().cpu()
    return resp >= share * resp.max()


@torch.no_grad()
def active_units(vae: VAEAdapter, x: Tensor, threshold: float = 0.01) -> Tensor:
    """Boolean mask (d,) of latent elements with Var_x[μ̂(x)] > threshold."""
    mu, _ = encode_mean(vae, x)
    return mu.reshape(mu.shape[0], -1).var(0) > threshold


def roundtrip_summary(vae: VAEAdapter, n: int = 1024, seed: int = 0, rho: float = 0.975,
                      responsive: Tensor | None = None) -> dict[str, dict[str, float]]:
    """The data-free figures ``tune`` reports before and after.

    ``sample_roundtrip_mse``, ``latent_roundtrip_corr`` (mean over all elements, and over
    decoder-responsive ones when a mask is given) and ``consistency_kl`` per element.
    """
    g = torch.Generator().manual_seed(seed)
    r = sample_roundtrip(vae, n, g, rho)
    corr = per_element_corr(r["u0"], r["mu_hat"])
    out = {
        "sample_roundtrip_mse": Estimate.of(r["mse"]).as_dict(),
        "consistency_kl": Estimate.of(r["consistency_kl"]).as_dict(),
        "latent_roundtrip_corr": {"value": float(corr.mean()), "stderr": float(
            corr.std() / math.sqrt(corr.numel())) if corr.numel() > 1 else float("nan")},
    }
    if responsive is not None and responsive.any():
        c = corr[responsive.cpu()]
        out["latent_roundtrip_corr_responsive"] = {
            "value": float(c.mean()),
            "stderr": float(c.std() / math.sqrt(c.numel())) if c.numel() > 1 else float("nan")}
    return out
