"""Self-consistency metrics, written against the adapter protocol only.

Every function takes a :class:`~selfconsist.adapters.VAEAdapter` and returns
plain floats (or tensors for per-element figures) together with a standard error
where it is a mean over samples. Notation as in ``docs/design.md``:
whitened codes μ̂ = (μ − m)/s under the prior N(m, s²), decoder mean g(z).

Nothing here looks inside a model: the PGD attack, the probe and the decoder
responses only call ``vae.encode``, ``vae.decode``, ``vae.prior`` and
``vae.data_range``, so they work for every model family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
def encode_batched(vae: VAEAdapter, x: Tensor, batch_size: int = 64,
                   device: torch.device | str | None = "cpu") -> tuple[Tensor, Tensor]:
    """Raw (mean, log-variance) of q(z|x), float32, encoding ``batch_size`` inputs at a time
    and gathering them on ``device``: the CPU by default, so that a large set of latents never
    has to sit on the accelerator; None keeps them on the model's device. The one batched
    encode of the package (tune, eval and the real-image figures all use it)."""
    out = torch.device(vae.device if device is None else device)
    means, logvars = [], []
    for i, b in _batches(x.shape[0], batch_size):
        q = vae.encode(x[i : i + b].to(vae.device))
        means.append(q.mean.float().to(out))
        logvars.append(q.logvar.float().to(out))
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def encode_mean(vae: VAEAdapter, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Whitened (μ̂, log σ̂²) of q(z|x), computed in batches, on the model's device."""
    p = vae.prior
    mean, logvar = encode_batched(vae, x, batch_size, device=None)
    return obj.whiten(mean, logvar, p.mean, p.std)


@torch.no_grad()
def decode_batched(vae: VAEAdapter, z: Tensor, batch_size: int = 256) -> Tensor:
    """g(z) for a stack of latents, ``batch_size`` at a time (same device as ``z``)."""
    outs = [vae.decode(z[i : i + b].to(vae.device)).float().to(z.device)
            for i, b in _batches(z.shape[0], batch_size)]
    return torch.cat(outs)


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


def roundtrip_corr(u0: Tensor, mu_hat: Tensor, mask: Tensor | None = None,
                   generator: torch.Generator | None = None, reps: int = 200) -> Estimate:
    """Latent round-trip correlation ρ̄ = (1/|S|) Σ_{i∈S} corr_k(u₀[k, i], μ̂[k, i]).

    ``u0``/``mu_hat`` are (n × d) whitened prior draws and the means of their re-encodings;
    S is ``mask`` (all elements when None). The standard error is the bootstrap over the n
    prior samples (rows drawn with replacement, ``reps`` replicates), i.e. the sampling error
    of ρ̄ itself, not the spread of the per-element correlations.
    """
    if mask is not None:
        cols = mask.reshape(-1).cpu()
        u0, mu_hat = u0[:, cols], mu_hat[:, cols]
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return bootstrap(lambda rows: float(per_element_corr(u0[rows], mu_hat[rows]).mean()),
                     (u0.shape[0],), gen, reps)


# --- decoder-responsive elements -------------------------------------------------------------

@dataclass
class DecoderResponses:
    """Per-sample decoder responses to unit perturbations of latent groups.

    ``per_sample[k, j]`` = ‖g(z_k + δ·s⊙e_j) − g(z_k)‖² for group j (an element, or a whole
    channel); ``groups[i]`` is the group of latent element i, so a group mask ``m`` expands to an
    element mask as ``m[groups]``. ``mode`` is ``"element"`` or ``"channel"``.
    """

    per_sample: Tensor  # (n, G) float64
    groups: Tensor  # (d,) int64
    mode: str

    def mask(self, share: float = 0.01, rows: Tensor | None = None) -> Tensor:
        """Element mask: rⱼ ≥ share · maxⱼ' rⱼ' with rⱼ the mean response (over ``rows``)."""
        r = (self.per_sample if rows is None else self.per_sample[rows]).mean(0)
        group_mask = r >= share * r.max() if float(r.max()) > 0 else torch.zeros_like(r, dtype=bool)
        return group_mask[self.groups]


@torch.no_grad()
def decoder_responses(vae: VAEAdapter, generator: torch.Generator, n: int = 64,
                      delta: float = 1.0, batch_size: int = 256,
                      max_elements: int = 1024) -> DecoderResponses:
    """Decoder responses rⱼ(z) = ‖g(z + δ·s⊙eⱼ) − g(z)‖², z ~ p(z), δ in prior standard deviations.

    Batched: several perturbed copies of the n base latents go through the decoder in one call
    (``batch_size`` decoder inputs per call). Latents with at most ``max_elements`` elements, and
    every flat latent, are probed one element at a time (exact). Spatial latents that are larger
    (a diffusers 4×32×32 latent has 4096 elements) are probed one *channel* at a time: eⱼ is
    then the indicator of a whole channel, and each element inherits its channel's verdict; this
    costs C decodes per sample instead of C·H·W.
    """
    p = vae.prior
    shape = tuple(vae.latent_shape)
    z = vae.sample_prior(n, generator)
    d = z[0].numel()
    base = decode_batched(vae, z, batch_size)
    std = p.std.expand(shape).reshape(-1).to(z.device)
    if d <= max_elements or len(shape) < 2:
        mode, n_groups = "element", d
        groups = torch.arange(d)
    else:
        mode, n_groups = "channel", shape[0]
        groups = torch.arange(shape[0]).repeat_interleave(d // shape[0])
    groups_dev = groups.to(z.device)
    zf = z.reshape(n, d)
    per_sample = torch.zeros(n, n_groups, dtype=torch.float64)
    k = max(1, batch_size // n)  # groups per decoder call
    for g0 in range(0, n_groups, k):
        gs = torch.arange(g0, min(g0 + k, n_groups), device=z.device)
        # (len(gs), d): the perturbation of each group in this chunk
        step = (groups_dev[None, :] == gs[:, None]).to(zf.dtype) * (delta * std)[None, :]
        zz = (zf[None, :, :] + step[:, None, :]).reshape(-1, *shape)
        out = decode_batched(vae, zz, batch_size).reshape(len(gs), n, -1)
        diff = (out - base.reshape(1, n, -1)).pow(2).sum(-1)  # (len(gs), n)
        per_sample[:, g0 : g0 + len(gs)] = diff.T.double().cpu()
    return DecoderResponses(per_sample, groups, mode)


def responsive_elements(vae: VAEAdapter, generator: torch.Generator, n: int = 64,
                        delta: float = 1.0, share: float = 0.01, batch_size: int = 256,
                        max_elements: int = 1024) -> Tensor:
    """Boolean mask (d,) of decoder-responsive latent elements.

    rᵢ = E_z ‖g(z + δ·s·eᵢ) − g(z)‖² over z ~ p(z) (δ in prior standard deviations);
    element i is responsive when rᵢ ≥ share · maxⱼ rⱼ. Big spatial latents are probed per
    channel (see :func:`decoder_responses`).
    """
    r = decoder_responses(vae, generator, n=n, delta=delta, batch_size=batch_size,
                          max_elements=max_elements)
    return r.mask(share)


@torch.no_grad()
def active_units(vae: VAEAdapter, x: Tensor, threshold: float = 0.01) -> Tensor:
    """Boolean mask (d,) of latent elements with Var_x[μ̂(x)] > threshold."""
    mu, _ = encode_mean(vae, x)
    return mu.reshape(mu.shape[0], -1).var(0) > threshold


def roundtrip_summary(vae: VAEAdapter, n: int = 1024, seed: int = 0, rho: float = 0.975,
                      responsive: Tensor | None = None) -> dict[str, dict[str, float]]:
    """The data-free figures ``tune`` reports before and after.

    ``sample_roundtrip_mse``, ``latent_roundtrip_corr_responsive`` (when a mask is given: the
    headline) and ``latent_roundtrip_corr`` (all elements), both :func:`roundtrip_corr`, as in
    ``eval``; and ``consistency_kl`` per element.
    """
    g = torch.Generator().manual_seed(seed)
    r = sample_roundtrip(vae, n, g, rho)
    out = {"sample_roundtrip_mse": Estimate.of(r["mse"]).as_dict()}
    if responsive is not None and responsive.any():
        out["latent_roundtrip_corr_responsive"] = roundtrip_corr(
            r["u0"], r["mu_hat"], responsive, torch.Generator().manual_seed(seed + 1)).as_dict()
    out["consistency_kl"] = Estimate.of(r["consistency_kl"]).as_dict()
    out["latent_roundtrip_corr"] = roundtrip_corr(
        r["u0"], r["mu_hat"], None, torch.Generator().manual_seed(seed + 1)).as_dict()
    return out


# --- chains and reconstructions ----------------------------------------------------------------

@torch.no_grad()
def drift_chain(vae: VAEAdapter, x0: Tensor, k: int = 10, batch_size: int = 256,
                keep: int = 0) -> tuple[Tensor, Tensor]:
    """drift@K per input, and the first ``keep`` chains for figures.

    x₁ = g(μ(x₀)), x_{k+1} = g(μ(x_k)); drift@K = ‖x_K − x₁‖² / D (mean over the D data
    elements). Returns ``(drift (n,), chains (keep, K+1, *data_shape))`` with chains x₀ … x_K.
    """
    if k < 1:
        raise ValueError("drift needs K ≥ 1")
    drifts, chains = [], []
    for i, b in _batches(x0.shape[0], batch_size):
        x = x0[i : i + b].to(vae.device)
        steps = [x.float().cpu()] if i < keep else []
        x1 = None
        for _ in range(k):
            x = vae.decode(vae.encode(x).mean)
            if x1 is None:
                x1 = x
            if i < keep:
                steps.append(x.float().cpu())
        drifts.append((x - x1).float().pow(2).reshape(b, -1).mean(1).cpu())
        if i < keep:
            chains.append(torch.stack(steps, 1)[: keep - i])
    chain = torch.cat(chains) if chains else torch.empty(0)
    return torch.cat(drifts), chain


@torch.no_grad()
def reconstruct(vae: VAEAdapter, x: Tensor, batch_size: int = 256) -> Tensor:
    """g(μ(x)) for a stack of inputs, on the CPU."""
    return torch.cat([vae.decode(vae.encode(x[i : i + b].to(vae.device)).mean).float().cpu()
                      for i, b in _batches(x.shape[0], batch_size)])


@torch.no_grad()
def reconstruction_mse(vae: VAEAdapter, x: Tensor, batch_size: int = 256) -> Tensor:
    """Per input: ‖x − g(μ(x))‖² / D, in the model's data units."""
    out = []
    for i, b in _batches(x.shape[0], batch_size):
        xb = x[i : i + b].to(vae.device)
        rec = vae.decode(vae.encode(xb).mean)
        out.append((xb - rec).float().pow(2).reshape(b, -1).mean(1).cpu())
    return torch.cat(out)


def psnr(mse: Estimate, data_range: tuple[float, float]) -> Estimate:
    """PSNR = 10·log₁₀((hi − lo)² / MSE) of the mean MSE; stderr by the delta method,
    se = 10/ln 10 · se(MSE)/MSE. MSE is floored at 1e-12·(hi − lo)² (120 dB)."""
    span2 = (data_range[1] - data_range[0]) ** 2
    m = max(mse.value, 1e-12 * span2)
    return Estimate(10.0 * math.log10(span2 / m), 10.0 / math.log(10.0) * mse.stderr / m)


# --- PGD in ℓ∞, through the adapter protocol ---------------------------------------------------

def pgd_linf(objective: Callable[[Tensor], Tensor], x: Tensor, eps: float,
             data_range: tuple[float, float], steps: int = 20, step_size: float | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient ascent in the ℓ∞ ball, maximising ``objective`` per input.

    x′₀ = clip(x + U(−ε, ε)),  x′_{t+1} = clip(Π_ε(x′_t + α·sign ∇ objective(x′_t))),
    with α = ε/8 by default, Π_ε the projection onto ‖x′ − x‖∞ ≤ ε and clip onto the data
    range. ``objective`` maps a batch to one value per input. Returns, per input, the iterate
    (random start included) with the largest objective, so the attack never does worse than
    its random start. Gradients are taken with respect to the input only: no model
    parameter's ``.grad`` is touched.
    """
    lo, hi = data_range
    x = x.detach()
    if eps <= 0:
        return x.clone()
    alpha = eps / 8.0 if step_size is None else step_size
    noise = torch.rand(x.shape, generator=generator, dtype=torch.float32,
                       device=generator.device if generator is not None else "cpu")
    x_adv = (x + (2.0 * noise.to(x.device, x.dtype) - 1.0) * eps).clamp(lo, hi)
    best, best_val = x_adv.clone(), torch.full((x.shape[0],), -math.inf, device=x.device)
    for t in range(steps + 1):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            val = objective(x_adv)
            if val.requires_grad:
                (grad,) = torch.autograd.grad(val.sum(), x_adv, allow_unused=True)
            else:
                grad = None
        val = val.detach()
        better = val > best_val
        best[better] = x_adv.detach()[better]
        best_val = torch.where(better, val, best_val)
        if t == steps:
            break
        if grad is None:  # the objective does not depend on the input: nothing to climb
            grad = torch.zeros_like(x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)
    return best.detach()


def _whitened_mean(vae: VAEAdapter, x: Tensor) -> Tensor:
    p = vae.prior
    return ((vae.encode(x).mean.float() - p.mean) / p.std).reshape(x.shape[0], -1)


def adversarial_shift(vae: VAEAdapter, x: Tensor, eps: float, steps: int = 20,
                      generator: torch.Generator | None = None, batch_size: int = 256,
                      keep: int = 0, on_batch: Callable[[int, Tensor], None] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Per input, the largest latent shift PGD finds: max ‖μ̂(x + δ) − μ̂(x)‖², ‖δ‖∞ ≤ ε.

    Returns ``(shift (n,), x_adv[:keep])``. Divide the mean by :func:`code_pair_distance` for
    the scale-free figure. ``on_batch(start, x_adv_batch)`` sees every attacked batch, so callers
    can score all attacked inputs without keeping them all in memory.
    """
    shifts, kept = [], []
    for i, b in _batches(x.shape[0], batch_size):
        xb = x[i : i + b].to(vae.device)
        with torch.no_grad():
            mu0 = _whitened_mean(vae, xb)

        def objective(xa: Tensor, mu0: Tensor = mu0) -> Tensor:
            return (_whitened_mean(vae, xa) - mu0).pow(2).sum(1)

        xa = pgd_linf(objective, xb, eps, vae.data_range, steps, generator=generator)
        with torch.no_grad():
            shifts.append(objective(xa).double().cpu())
        if on_batch is not None:
            on_batch(i, xa)
        if i < keep:
            kept.append(xa[: keep - i].float().cpu())
    return torch.cat(shifts), (torch.cat(kept) if kept else torch.empty(0))


def code_pair_distance(mu: Tensor) -> float:
    """Mean squared distance between the codes of random pairs of inputs, E_{i≠j} ‖μ̂ᵢ − μ̂ⱼ‖².

    Computed exactly over all ordered pairs: E_{i≠j} ‖aᵢ − aⱼ‖² = 2 Σ_k Var_k(a) (unbiased
    variances), so no pairs need drawing.
    """
    m = mu.reshape(mu.shape[0], -1).double()
    if m.shape[0] < 2:
        return float("nan")
    return float(2.0 * m.var(0, unbiased=True).sum())


def ratio_estimate(num: Estimate, den: float) -> Estimate:
    """num / den, the denominator treated as fixed (its error is far smaller: it pools all
    inputs and elements). A zero denominator means every input has the same code: a shift of
    0 then counts as 0 (a constant encoder cannot be moved), anything else as infinite."""
    if not den > 1e-12:
        return Estimate(0.0 if abs(num.value) <= 1e-12 else math.inf, 0.0)
    return Estimate(num.value / den, num.stderr / den)


# --- linear probe ------------------------------------------------------------------------------

@dataclass
class LinearProbe:
    """Multinomial logistic regression on codes: logits = ((f − m)/s)·W + b.

    ``fit_probe`` uses m = 0, s = 1 (raw whitened codes) unless asked to standardise.
    """

    mean: Tensor  # (F,)
    scale: Tensor  # (F,)
    weight: Tensor  # (F, K)
    bias: Tensor  # (K,)

    def logits(self, features: Tensor) -> Tensor:
        f = features.reshape(features.shape[0], -1)
        dev, dt = f.device, f.dtype
        z = (f - self.mean.to(dev, dt)) / self.scale.to(dev, dt)
        return z @ self.weight.to(dev, dt) + self.bias.to(dev, dt)

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)


def fit_probe(features: Tensor, labels: Tensor, n_classes: int | None = None, l2: float = 1e-4,
              max_iter: int = 200, standardize: bool = False) -> LinearProbe:
    """Fit a linear probe by full-batch L-BFGS (deterministic: zero start, no sampling).

    Minimises  mean_i CE(softmax(W·f̃ᵢ + b), yᵢ) + l2·‖W‖²  over W, b. By default f̃ are the
    whitened codes μ̂ themselves: they share the prior's unit scale, and standardising would
    blow up near-inactive elements (variance ≈ 0) into features an attacker can move at will.
    ``standardize=True`` uses (f − mean)/std instead (std floored at 1e-4). Float64 on CPU.
    """
    f = features.reshape(features.shape[0], -1).double().cpu()
    y = labels.long().cpu()
    k = int(n_classes if n_classes is not None else int(y.max()) + 1)
    if standardize:
        mean, scale = f.mean(0), f.std(0, unbiased=False).clamp_min(1e-4)
    else:
        mean, scale = torch.zeros(f.shape[1], dtype=f.dtype), torch.ones(f.shape[1], dtype=f.dtype)
    ft = (f - mean) / scale
    w = torch.zeros(ft.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ft @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean.float(), scale.float(), w.detach().float(), b.detach().float())


@torch.no_grad()
def probe_predict(vae: VAEAdapter, probe: LinearProbe, x: Tensor, batch_size: int = 256) -> Tensor:
    """The probe's predicted class for each input, from μ̂(x) (on the CPU)."""
    return torch.cat([probe.predict(_whitened_mean(vae, x[i : i + b].to(vae.device))).cpu()
                      for i, b in _batches(x.shape[0], batch_size)])


@torch.no_grad()
def probe_correct(vae: VAEAdapter, probe: LinearProbe, x: Tensor, y: Tensor,
                  batch_size: int = 256) -> Tensor:
    """Per input: 1.0 when the probe on μ̂(x) predicts the label, else 0.0."""
    out = []
    for i, b in _batches(x.shape[0], batch_size):
        pred = probe.predict(_whitened_mean(vae, x[i : i + b].to(vae.device)))
        out.append((pred.cpu() == y[i : i + b].cpu()).double())
    return torch.cat(out)


def probe_correct_adversarial(vae: VAEAdapter, probe: LinearProbe, x: Tensor, y: Tensor,
                              eps: float, steps: int = 20,
                              generator: torch.Generator | None = None,
                              batch_size: int = 256) -> Tensor:
    """Per input: is the probe still right after PGD maximises its cross-entropy?

    The attack climbs CE(probe(μ̂(x + δ)), y) through the encoder mean and the probe, with the
    same ℓ∞ PGD as :func:`adversarial_shift`.
    """
    out = []
    for i, b in _batches(x.shape[0], batch_size):
        xb, yb = x[i : i + b].to(vae.device), y[i : i + b].to(vae.device)

        def objective(xa: Tensor, yb: Tensor = yb) -> Tensor:
            logits = probe.logits(_whitened_mean(vae, xa))
            return torch.nn.functional.cross_entropy(logits, yb, reduction="none")

        xa = pgd_linf(objective, xb, eps, vae.data_range, steps, generator=generator)
        with torch.no_grad():
            pred = probe.predict(_whitened_mean(vae, xa))
        out.append((pred.cpu() == yb.cpu()).double())
    return torch.cat(out)


def binomial_estimate(correct: Tensor) -> Estimate:
    """Accuracy p̂ and its analytic standard error √(p̂(1 − p̂)/n)."""
    n = correct.numel()
    p = float(correct.double().mean()) if n else float("nan")
    return Estimate(p, math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan"))


# --- bootstrap ---------------------------------------------------------------------------------

def bootstrap(stat: Callable[..., float], sizes: tuple[int, ...], generator: torch.Generator,
              reps: int = 200) -> Estimate:
    """``stat`` on the full samples, with the bootstrap standard error.

    ``stat(*rows)`` gets one index tensor per independent sample (of sizes ``sizes``): the
    identity for the value, rows drawn with replacement for each of ``reps`` replicates; the
    standard error is the replicates' standard deviation.
    """
    value = float(stat(*[torch.arange(n) for n in sizes]))
    reps_vals = torch.tensor([
        float(stat(*[torch.randint(n, (n,), generator=generator) for n in sizes]))
        for _ in range(reps)], dtype=torch.float64)
    se = float(reps_vals.std(unbiased=True)) if reps > 1 else float("nan")
    return Estimate(value, se)

