"""Figures on real images that latent-diffusion users care about.

A diffusion model is trained on the *base* encoder's latents of real images, so a tuned
encoder is only safe for them if (a) real images still reconstruct as well, (b) repeated
encode → decode cycles degrade them less, and (c) their latents stay where they were.
Everything here is a pure function of tensors, computed per image (then averaged), so that a
standard error across images can be reported beside each mean.
"""

from __future__ import annotations

from torch import Tensor


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
#: on the base latents is likely to notice. See the README's latent-diffusion section for the
#: evidence; ``examples/ldm/`` holds the script that computes it.
SHIFT_WARN = 0.1


def shift_warning(shift: float, on: str = "real images") -> str | None:
    """One plain line when a mean latent shift (measured ``on`` these inputs) is large enough
    to matter, else None."""
    if shift <= SHIFT_WARN:
        return None
    return (f"the encoder's latents of {on} moved by {shift:.3f} of their standard "
            f"deviation (> {SHIFT_WARN}): a diffusion model trained on the base latents may no "
            f"longer read them correctly")
