"""The testbed's photos: natural images bundled with scikit-image and scikit-learn (offline).

Whole photos are held out, never crops of training photos, so the held-out set measures what a
user's unseen images would see. ``chelsea`` and ``cat`` are the same photo, so ``cat`` is in
neither list.

    python examples/ldm/photos.py heldout runs/ldm/heldout   # 53 held-out crops (PNG, 64 px)
    python examples/ldm/photos.py user runs/ldm/user         # 64 crops of training photos (--images)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HELDOUT = ("coffee", "chelsea", "camera")
TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "coins",
         "moon", "clock", "grass", "gravel", "brick", "china", "flower")
SIZE = 64


def photo(name: str) -> torch.Tensor:
    """One photo as a float tensor (3, H, W) in [0, 1]; grey photos are repeated to RGB."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        a = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        a = getattr(skimage.data, name)()
    a = np.asarray(a, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1)


def crop(img: torch.Tensor, top: int, left: int, side: int, size: int = SIZE) -> torch.Tensor:
    """A square crop resized (antialiased) to ``size``: (3, size, size)."""
    patch = img[:, top:top + side, left:left + side][None]
    return F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def grid_crops(names: tuple[str, ...], scales: tuple[float, ...]) -> list[tuple[str, torch.Tensor]]:
    """Deterministic crops: at each scale (fraction of the shorter side), a grid of
    non-overlapping squares covering the photo."""
    out = []
    for name in names:
        img = photo(name)
        h, w = img.shape[1:]
        for s in scales:
            side = int(min(h, w) * s)
            for top in range(0, h - side + 1, side):
                for left in range(0, w - side + 1, side):
                    out.append((f"{name}_s{s:g}_{top}_{left}", crop(img, top, left, side)))
    return out


def heldout_crops() -> list[tuple[str, torch.Tensor]]:
    return grid_crops(HELDOUT, (0.5, 0.35, 0.25))


def user_crops(n: int = 64, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Random crops of the *training* photos: stand-ins for a user's own unlabelled images."""
    g = torch.Generator().manual_seed(seed)
    imgs = {name: photo(name) for name in TRAIN}
    out = []
    for i in range(n):
        name = TRAIN[int(torch.randint(len(TRAIN), (1,), generator=g))]
        img = imgs[name]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.15 + 0.85 * float(torch.rand(1, generator=g))))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        out.append((f"{i:03d}_{name}", crop(img, top, left, side)))
    return out


def write_pngs(crops: list[tuple[str, torch.Tensor]], folder: str | Path) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, x in crops:
        a = (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{name}.png")
    return folder


if __name__ == "__main__":
    which, dest = sys.argv[1], sys.argv[2]
    crops = {"heldout": heldout_crops, "user": user_crops}[which]()
    print(f"{len(crops)} crops → {write_pngs(crops, dest)}")
