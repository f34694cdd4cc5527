"""Where the latents z₀ that tuning decodes come from, and the frozen base model.

:class:`Z0Source` draws z₀ from the prior, the prior refined through the frozen base encoder,
a latents file, or the base posteriors of a folder of the user's images (``tune --images``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import objective as obj
from .adapters.base import VAEAdapter
from .errors import SelfconsistError
from .metrics import encode_batched


def load_latents(path: str | Path, latent_shape: tuple[int, ...]) -> Tensor:
    """Latents (N, *latent_shape) from .npy, .pt (tensors only) or .safetensors (first tensor)."""
    path = Path(path)
    if not path.is_file():
        raise SelfconsistError(f"--latents {path}: no such file")
    try:
        if path.suffix == ".npy":
            import numpy as np

            z = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if not tensors:
                raise SelfconsistError(f"--latents {path}: the file holds no tensors")
            z = next(iter(tensors.values()))
        elif path.suffix in (".pt", ".pth"):
            z = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise SelfconsistError(f"--latents {path}: use .npy, .pt or .safetensors")
    except SelfconsistError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise SelfconsistError(f"--latents {path}: cannot read ({e})") from None
    if not isinstance(z, Tensor):
        raise SelfconsistError(f"--latents {path}: expected one tensor")
    z = z.float()
    if tuple(z.shape[1:]) != tuple(latent_shape) or z.shape[0] == 0:
        want = ", ".join(map(str, latent_shape))
        raise SelfconsistError(f"--latents {path}: shape {tuple(z.shape)}, expected (N, {want})")
    if not torch.isfinite(z).all():
        raise SelfconsistError(f"--latents {path}: contains NaN or Inf")
    return z


def load_images(folder: str | Path, vae: VAEAdapter, fit: str = "crop") -> Tensor:
    """A folder of images as a batch in the model's data shape and range (``--images``)."""
    from .data import load_image_folder

    path = Path(folder)
    if not path.is_dir():
        raise SelfconsistError(f"--images {path}: no such folder")
    try:
        data = load_image_folder(path, tuple(vae.data_shape), fit=fit, data_range=vae.data_range)
    except SelfconsistError as e:
        raise SelfconsistError(f"--images: {e}") from None
    return data.x


def frozen_copy(vae: VAEAdapter) -> VAEAdapter:
    """A frozen deep copy: the base encoder for refinement and the anchor. It costs one more
    copy of the model's weights, and keeps the reference fixed while the encoder trains."""
    base = copy.deepcopy(vae)
    for p in base.encoder_parameters():
        p.requires_grad_(False)
    base.freeze_decoder()
    base.set_encoder_mode(False)
    return base


class Z0Source:
    """Where the latents z₀ that are decoded into training samples come from.

    * ``prior``: z₀ ~ p(z), the adapter's prior (for diffusers models, the latent distribution
      the diffusion pipeline decodes from);
    * ``refined``: a prior draw followed by ``prior_refine`` steps of z ← μ_base(g(z)) through
      the frozen base model. Still data-free; the draws land where the encoder puts decoded
      images, which for a sharp VAE is far from the Gaussian;
    * ``latents``: rows of a user's latents file;
    * ``images``: z₀ = μ + σ·ε from the base posteriors of a user's images, encoded once.
    """

    def __init__(self, vae: VAEAdapter, cfg: Any, base: VAEAdapter | None = None,
                 images: Tensor | None = None) -> None:
        self.vae, self.cfg, self.base = vae, cfg, base
        self.latents = load_latents(cfg.latents, vae.latent_shape) if cfg.latents else None
        self.posteriors = encode_batched(vae, images) if images is not None else None
        self.kind = ("latents" if cfg.latents else "images" if images is not None
                     else "refined" if cfg.prior_refine else "prior")

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(z₀, indices of the images drawn or None)."""
        dev = self.vae.device
        if self.latents is not None:
            return self.latents[torch.randint(self.latents.shape[0], (n,), generator=gen)].to(dev), None
        if self.posteriors is not None:
            idx = torch.randint(self.posteriors[0].shape[0], (n,), generator=gen)
            mean, logvar = (t[idx].to(dev) for t in self.posteriors)
            return obj.reparameterize(mean, logvar, gen), idx
        z = self.vae.sample_prior(n, gen)
        if self.cfg.prior_refine:
            with torch.no_grad():
                for _ in range(self.cfg.prior_refine):
                    z = self.base.encode(self.base.decode(z).float()).mean.float()
        return z, None
