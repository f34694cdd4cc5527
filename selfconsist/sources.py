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
      images, which for a sharp VAE is far from the Gaussian. With ``refine_reuse`` N > 1 the
      refined draws come from a pool of N·n of them: each call takes n at random from the
      pool, after replacing its m = ⌈n/N⌉ oldest by fresh ones, so each draw serves about N
      batches and the refinement costs about 1/N of its passes (the pool is part of the
      resumable state: :meth:`pool_state`);
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
        self.reuse = (cfg.refine_reuse or 1) if self.kind == "refined" else 1  # None: unresolved
        self.pool: Tensor | None = None  # refined draws kept for reuse (reuse > 1)
        self.oldest = 0  # the pool's next row to replace (a ring: the oldest draw goes first)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(z₀, indices of the images drawn or None)."""
        dev = self.vae.device
        if self.latents is not None:
            return self.latents[torch.randint(self.latents.shape[0], (n,), generator=gen)].to(dev), None
        if self.posteriors is not None:
            idx = torch.randint(self.posteriors[0].shape[0], (n,), generator=gen)
            mean, logvar = (t[idx].to(dev) for t in self.posteriors)
            return obj.reparameterize(mean, logvar, gen), idx
        if self.reuse > 1:
            return self._from_pool(n, gen), None
        return self._refined(n, gen), None

    def _refined(self, n: int, gen: torch.Generator) -> Tensor:
        """n prior draws, each refined ``prior_refine`` times (none: plain prior draws)."""
        z = self.vae.sample_prior(n, gen)
        if self.cfg.prior_refine:
            with torch.no_grad():
                for _ in range(self.cfg.prior_refine):
                    z = self.base.encode(self.base.decode(z).float()).mean.float()
        return z

    def _from_pool(self, n: int, gen: torch.Generator) -> Tensor:
        # Why a pool: for a latent-diffusion VAE the refinement is ~4 of the ~12 model passes of
        # a step (docs/performance.md). A draw's later uses still differ, since the cycle's
        # iterates and the anchor's noise are drawn afresh for every batch.
        size, fresh = self.reuse * n, -(-n // self.reuse)
        if self.pool is None or self.pool.shape[0] != size:  # filled in batches of n: no more memory
            self.pool, self.oldest = torch.cat([self._refined(n, gen) for _ in range(self.reuse)]), 0
        else:
            rows = ((self.oldest + torch.arange(fresh)) % size).to(self.pool.device)
            self.pool[rows] = self._refined(fresh, gen)
            self.oldest = (self.oldest + fresh) % size
        return self.pool[torch.randperm(size, generator=gen)[:n].to(self.pool.device)]

    def pool_state(self) -> dict[str, Any] | None:
        """What a resumed run needs to continue the same draws (None without a pool)."""
        if self.pool is None:
            return None
        return {"pool": self.pool.detach().cpu(), "oldest": self.oldest}

    def load_pool_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.pool, self.oldest = None, 0
            return
        self.pool = state["pool"].to(self.vae.device)
        self.oldest = int(state["oldest"])
