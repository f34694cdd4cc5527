"""Figures on real images that latent-diffusion users care about.

A diffusion model is trained on the *base* encoder's latents of real images, so a tuned
encoder is only safe for them if (a) real images still reconstruct as well, (b) repeated
encode → decode cycles degrade them less, and (c) their latents stay where they were.
Everything here is a pure function of tensors, computed per image (then averaged), so that a
standard error across images can be reported beside each mean.

**Cycle degradation vs drift.** ``cycle_psnr@K`` follows the chain a user runs (img2img
loops, repeated inpainting): x₀ is a *real* image, x_k = clip(g(μ(x_{k−1}))), and every x_K
is compared with the original x₀, so it counts the first reconstruction's loss plus whatever
the later cycles add. ``drift@K`` / ``drift_data@K`` (:func:`selfconsist.metrics.drift_chain`)
measure ‖x_K − x₁‖² from x₁, i.e. only what the cycles after the first one change, without
clipping, and ``drift@K`` starts from model samples g(z₀), not real images. A model can have
small drift and still lose many dB per cycle against x₀ (it reconstructs badly once, then
stays put), or the reverse; ``cycle_db_lost`` = PSNR@1 − PSNR@K isolates the part that
repeated cycling adds, in the units users see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters.base import VAEAdapter
from .metrics import Estimate, encode_batched


def channel_std(mu: Tensor) -> Tensor:
    """Per-channel standard deviation of latents ``mu`` (N, C, ...) over every axis but C.

    For a flat latent (N, D) each of the D elements is its own channel. This is the unit in
    which a latent shift is stated: the spread of the base encoder's latents of real images,
    i.e. the scale a diffusion model trained on them sees.
    """
    dims = [0] + list(range(2, mu.dim()))
    return mu.float().std(dim=dims).clamp_min(1e-12)


def latent_shift_per_image(mu_base: Tensor, mu_tuned: Tensor, std: Tensor) -> Tensor:
    """Per-image mean over elements of |μ_tuned(x) − μ_base(x)| / s_c, with s_c the base
    latents' per-channel standard deviation (see :func:`channel_std`). Shape (N,)."""
    shape = (1, -1) + (1,) * (mu_base.dim() - 2)
    d = (mu_tuned.float() - mu_base.float()).abs() / std.view(shape)
    return d.flatten(1).mean(1)


#: Mean latent shift (in base-latent standard deviations) above which a diffusion model trained
#: on the base latents is likely to notice. Evidence: ``examples/ldm/shift_threshold.py`` (and
#: its ``.md``): with SD's scheduler and 50 DDIM steps the UNet's input at the second-to-last
#: step (t = 21) carries noise of 0.14 clean-latent standard deviations (mean |noise| 0.11);
#: a mean shift of 0.1 (RMS ≈ 0.125) stays below what the final steps already absorb.
SHIFT_WARN = 0.1


def shift_warning(shift: float, on: str = "real images") -> str | None:
    """One plain line when a mean latent shift (measured ``on`` these inputs) is large enough
    to matter, else None."""
    if shift <= SHIFT_WARN:
        return None
    return (f"the encoder's latents of {on} moved by {shift:.3f} of their standard "
            f"deviation (> {SHIFT_WARN}): a diffusion model trained on the base latents may no "
            f"longer read them correctly")


# --- per-image image-quality figures -------------------------------------------------------------

#: PSNR ceiling: the per-image MSE is floored at 1e-12·(hi − lo)², i.e. 120 dB, so an exact
#: reconstruction gives a finite number that a mean and a standard error can use.
PSNR_CAP_DB = 120.0


def _span(data_range: tuple[float, float]) -> float:
    span = float(data_range[1]) - float(data_range[0])
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"PSNR/SSIM need a bounded data range, got {data_range}")
    return span


def psnr_per_image(x: Tensor, y: Tensor, data_range: tuple[float, float]) -> Tensor:
    """Per image: PSNR_i = 10·log₁₀((hi − lo)² / MSE_i), MSE_i = mean over the image's D
    elements of (x − y)². Shape (N,), float64.

    The MSE is floored at 1e-12·(hi − lo)², so identical images give :data:`PSNR_CAP_DB`
    (120 dB) instead of +∞. Averaging these per-image values (the "per-image mean PSNR") is
    not the PSNR of the mean MSE (``recon_psnr``), which weights the worst images most.
    """
    span2 = _span(data_range) ** 2
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(span2 / mse.clamp_min(1e-12 * span2))


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> Tensor:
    """1-D Gaussian taps w_j ∝ exp(−j²/(2σ²)), j = −r … r, normalised to sum 1 (11 taps)."""
    j = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-(j**2) / (2.0 * sigma**2))
    return w / w.sum()


def ssim_per_image(x: Tensor, y: Tensor, data_range: tuple[float, float],
                   sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per image: SSIM (Wang et al. 2004) with an 11-tap Gaussian window, σ = 1.5.

    For each channel, with local statistics from the Gaussian window w (separable, 11 taps):
    μ_x = w∗x, σ_x² = w∗x² − μ_x², σ_xy = w∗(xy) − μ_xμ_y (population covariance), and
    C₁ = (K₁L)², C₂ = (K₂L)², L = hi − lo, K₁ = 0.01, K₂ = 0.03:

        SSIM(p) = (2μ_xμ_y + C₁)(2σ_xy + C₂) / ((μ_x² + μ_y² + C₁)(σ_x² + σ_y² + C₂)),

    averaged over the positions p where the window lies fully inside the image (a border of
    5 pixels is left out, as scikit-image does), then over channels. Inputs (N, C, H, W) with
    H, W ≥ 11; returns (N,) float64. Matches ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L,
    channel_axis=0)`` per image.
    """
    if x.dim() != 4:
        raise ValueError(f"SSIM needs images (N, C, H, W), got shape {tuple(x.shape)}")
    radius = int(3.5 * sigma + 0.5)  # scikit-image's truncate = 3.5: 11 taps at σ = 1.5
    if min(x.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1}×{2 * radius + 1}")
    span = _span(data_range)
    c1, c2 = (k1 * span) ** 2, (k2 * span) ** 2
    n, c = x.shape[:2]
    w = _gaussian_window(sigma, radius).to(x.device)
    wh, ww = w.view(1, 1, -1, 1), w.view(1, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # 'valid' convolution: only positions the window covers
        t = t.reshape(n * c, 1, *t.shape[-2:])
        return F.conv2d(F.conv2d(t, wh), ww).reshape(n, c, -1)

    xd, yd = x.double(), y.double()
    mx, my = blur(xd), blur(yd)
    vx = blur(xd * xd) - mx * mx
    vy = blur(yd * yd) - my * my
    vxy = blur(xd * yd) - mx * my
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(2).mean(1)


# --- encode → decode cycles ------------------------------------------------------------------------

def _clip(x: Tensor, data_range: tuple[float, float]) -> Tensor:
    lo, hi = data_range
    return x.clamp(lo, hi) if math.isfinite(hi - lo) else x


def quantize_uint8(x: Tensor, data_range: tuple[float, float]) -> Tensor:
    """x (in ``data_range``) as a saved 8-bit image reads back: lo + round((x − lo)/(hi − lo)·255)/255·(hi − lo)."""
    lo, hi = data_range
    return lo + torch.round((x - lo) / (hi - lo) * 255.0) / 255.0 * (hi - lo)


def invert_decoder(vae: VAEAdapter, x: Tensor, z_init: Tensor, steps: int = 50, lr: float = 0.01) -> Tensor:
    """Exact decoder inversion z = argmin_z ‖g(z) − x‖², by ``steps`` Adam steps from ``z_init``.

    The steps are taken in whitened units u = z/s (s the prior's std), so ``lr`` is a fraction
    of the latent spread, decayed by a cosine to 0 for a precise end point. Only the latents
    get gradients (``torch.autograd.grad``), never the model's parameters.
    """
    s = vae.prior.std.to(z_init.device)
    u = (z_init.float() / s).detach().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    with torch.enable_grad():
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * i / steps))
            loss = (vae.decode(u * s).float() - x).pow(2).sum()
            (u.grad,) = torch.autograd.grad(loss, u)
            opt.step()
    return (u * s).detach()


@dataclass(frozen=True)
class CycleMode:
    """How each cycle of a chain re-encodes its image.

    * ``mean`` (names as is): z = μ(x), the decoded image clipped; the deterministic chain;
    * ``pipeline`` (prefix ``pipe_``): z ~ q(z|x) sampled, as diffusers' ``retrieve_latents``
      does by default, and the decoded image clipped and quantised to 8 bits, as a tool saves
      it between edits;
    * ``bound`` (prefix ``bound_``): the first encode by the encoder, every later one by exact
      decoder inversion (:func:`invert_decoder` from μ(x)): the *idempotent bound*, the best
      that an encoder-only fix could give while leaving the first encode (and so the latents a
      diffusion model reads) where they are.
    """

    prefix: str = ""
    sample: bool = False
    quantize: bool = False
    invert_steps: int = 0


CYCLE_MODES = {"mean": CycleMode(), "pipeline": CycleMode("pipe_", sample=True, quantize=True),
               "bound": CycleMode("bound_", invert_steps=50)}


@torch.no_grad()
def _cycles(vae: VAEAdapter, x: Tensor, k: int, mode: CycleMode = CYCLE_MODES["mean"],
            gen: torch.Generator | None = None) -> Iterator[Tensor]:
    """x₁ … x_K of a chain (:class:`CycleMode`) one at a time (on the model's device, float32)."""
    rng = vae.data_range
    cur = x.to(vae.device)
    for i in range(k):
        q = vae.encode(cur)
        z = q.sample(gen) if mode.sample else q.mean
        if mode.invert_steps and i > 0:
            z = invert_decoder(vae, cur, q.mean, mode.invert_steps)
        cur = _clip(vae.decode(z).float(), rng)
        if mode.quantize and math.isfinite(rng[1] - rng[0]):
            cur = quantize_uint8(cur, rng)
        yield cur


@torch.no_grad()
def cycle_chain(vae: VAEAdapter, x: Tensor, k: int) -> Tensor:
    """The encode → decode chain of a batch: x₀ = x, x_k = clip(g(μ(x_{k−1}))), k = 1 … K.

    μ is the adapter's deterministic encoder mean (no posterior sample) and every decoded image
    is clipped to the model's data range, as an image a user saves and re-encodes would be.
    Returns (N, K + 1, *data_shape) on the CPU, x₀ included.
    """
    if k < 1:
        raise ValueError("a cycle chain needs K ≥ 1")
    return torch.stack([x.float().cpu()] + [s.cpu() for s in _cycles(vae, x, k)], 1)


@dataclass
class CycleResult:
    """What :func:`cycle_metrics` returns: the estimates by metric name, the per-image values
    behind them, and the chains of the first ``keep`` images at the figure's steps."""

    estimates: dict[str, Estimate]
    per_image: dict[str, Tensor]
    chains: Tensor  # (keep, len(steps), *data_shape)
    steps: list[int] = field(default_factory=list)


def cycle_metrics(vae: VAEAdapter, x: Tensor, cycles: Sequence[int] = (1, 2, 5, 10),
                  batch_size: int = 16, keep: int = 1,
                  figure_steps: Sequence[int] = (0, 1, 2, 5, 10), mode: str = "mean",
                  seed: int = 0) -> CycleResult:
    """Single-pass quality and cycle degradation on real images ``x`` (in the model's range).

    Per image i (then mean ± std/√n over images):

    * ``image_psnr`` = PSNR(x₁, x₀) and ``image_ssim`` = SSIM(x₁, x₀): the single pass
      (cycle 1) of :func:`cycle_chain`; SSIM only for images of at least 11×11;
    * ``cycle_psnr@K`` = PSNR(x_K, x₀) for each K in ``cycles``;
    * ``cycle_db_lost`` = PSNR(x₁, x₀) − PSNR(x_K, x₀) with K = max(cycles): the dB that
      repeated cycling costs beyond the first reconstruction (positive = degradation).

    Images go through in batches of ``batch_size``, one cycle at a time (memory: one batch
    of images, not the whole chain); only the chains of the first ``keep`` images are kept
    (at ``figure_steps`` ≤ K), for the figure. ``mode`` picks the chain (:class:`CycleMode`);
    its prefix goes in front of every name (``pipe_cycle_psnr@10``), and the posterior samples
    of ``pipeline`` come from a generator seeded with ``seed``.
    """
    cm = CYCLE_MODES[mode]
    gen = torch.Generator().manual_seed(seed) if cm.sample else None
    ks = sorted({int(c) for c in cycles})
    if not ks or ks[0] < 1:
        raise ValueError("cycles must be positive integers")
    k_max = max(ks)
    rng = vae.data_range
    steps = [s for s in figure_steps if s <= k_max]
    with_ssim = x.dim() == 4 and min(x.shape[-2:]) >= 11
    per: dict[str, list[Tensor]] = {"image_psnr": [], **({"image_ssim": []} if with_ssim else {}),
                                    **{f"cycle_psnr@{k}": [] for k in ks}}
    kept: list[Tensor] = []
    for i in range(0, x.shape[0], batch_size):
        x0 = x[i : i + batch_size].float()
        x0_dev = x0.to(vae.device)
        shown = [x0[: keep - i].cpu()] if i < keep and 0 in steps else []
        for k, xk in enumerate(_cycles(vae, x0, k_max, cm, gen), start=1):
            if k == 1:
                per["image_psnr"].append(psnr_per_image(xk, x0_dev, rng).cpu())
                if with_ssim:
                    per["image_ssim"].append(ssim_per_image(xk, x0_dev, rng).cpu())
            if k in ks:
                per[f"cycle_psnr@{k}"].append(psnr_per_image(xk, x0_dev, rng).cpu())
            if i < keep and k in steps:
                shown.append(xk[: keep - i].cpu())
        if shown:
            kept.append(torch.stack(shown, 1))
    values = {name: torch.cat(v) for name, v in per.items()}
    if k_max > 1:
        values["cycle_db_lost"] = values["image_psnr"] - values[f"cycle_psnr@{k_max}"]
    if cm.prefix:  # the single pass is the same encode in every mode but pipeline's sample
        values = {cm.prefix + name: v for name, v in values.items() if not name.startswith("image_")
                  or cm.sample}
    chains = torch.cat(kept) if kept else torch.empty(0)
    return CycleResult({k: Estimate.of(v) for k, v in values.items()}, values, chains, steps)


# --- latent compatibility between a base encoder and its tuned copy --------------------------------

@torch.no_grad()
def latent_compatibility(base: VAEAdapter, tuned: VAEAdapter, x: Tensor,
                         batch_size: int = 16) -> dict[str, Estimate]:
    """How far the tuned encoder moved real images' latents, per image i (mean ± std/√n):

    * ``latent_shift`` = mean over latent elements of |μ_t(xᵢ) − μ_b(xᵢ)| / s_c, with s_c the
      per-channel standard deviation of the base latents μ_b over these images
      (:func:`channel_std`, :func:`latent_shift_per_image`); raw encoder means, so the unit
      is the spread a diffusion model trained on the base latents sees (any scaling factor
      cancels);
    * ``latent_decode_psnr`` = PSNR(g(μ_t(xᵢ)), g(μ_b(xᵢ))), both decoded with the *base*
      decoder and clipped to its range: what the move does to the image the latent stands
      for (a tune leaves the decoder bit-identical, so this is also the tuned model's).

    ``x`` is in the model's data range. A flat latent needs at least two images (its channels
    are single elements, whose spread is across images).
    """
    mu_b = encode_batched(base, x, batch_size)[0]
    if mu_b.dim() < 3 and x.shape[0] < 2:
        raise ValueError("latent compatibility of a flat latent needs at least 2 images")
    mu_t = encode_batched(tuned, x, batch_size)[0]
    if mu_b.shape != mu_t.shape:
        raise ValueError(f"the two encoders give latents of different shapes "
                         f"{tuple(mu_b.shape[1:])} and {tuple(mu_t.shape[1:])}")
    shift = latent_shift_per_image(mu_b, mu_t, channel_std(mu_b))
    rng = base.data_range
    out = {"latent_shift": Estimate.of(shift)}
    if math.isfinite(rng[1] - rng[0]):
        psnrs = []
        for i in range(0, x.shape[0], batch_size):
            xb = _clip(base.decode(mu_b[i : i + batch_size].to(base.device)).float(), rng)
            xt = _clip(base.decode(mu_t[i : i + batch_size].to(base.device)).float(), rng)
            psnrs.append(psnr_per_image(xt.cpu(), xb.cpu(), rng))
        out["latent_decode_psnr"] = Estimate.of(torch.cat(psnrs))
    return out
