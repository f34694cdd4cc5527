"""The SD-class testbed's photos: photographs from Debian's wallpaper packages (offline).

Tests and CI never need this; only training the testbed and the experiments do. Fetch once:

    mkdir -p runs/debs && cd runs/debs && apt-get download gnome-backgrounds mate-backgrounds \
        lomiri-wallpapers-16.04 plasma-workspace-wallpapers && cd -
    for d in runs/debs/*.deb; do dpkg-deb -x "$d" runs/wallpapers; done
    python examples/ldm/wallpapers.py prepare --root runs/wallpapers --out runs/ldm/photos.pt

Only photographs are used (the packages also hold renders and patterns). Whole photos are split
three ways, fixed here before any result was seen:

- TRAIN: the testbed VAE trains on random crops of these (plus the scikit-image/-learn photos).
- USER: never trained on; the same kind of photo as TEST. A user's own images (``tune --images``).
- TEST: held out from everything; the figures are measured on crops of these.

and ``UNRELATED`` (scikit-image's coffee, chelsea and camera) are a different source, never
trained on either: ``--images`` of images unlike the ones a user encodes.

    python examples/ldm/wallpapers.py crops test runs/ldm/test     # 100 PNG crops, 64 px
    python examples/ldm/wallpapers.py crops user runs/ldm/user     # 96 PNG crops
    python examples/ldm/wallpapers.py crops unrelated runs/ldm/unrelated
    # many images of the kind the user encodes (TRAIN photos, 16 crops each, + USER): the "many" runs
    python examples/ldm/wallpapers.py crops train runs/ldm/many --per-photo 16
    python examples/ldm/wallpapers.py crops user runs/ldm/many
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Every photo is resized so that its shorter side is SHORT px before any crop is taken.
SHORT = 512
SIZE = 64

_B = "usr/share/backgrounds/"
_W = "usr/share/wallpapers/"
TRAIN = {
    "bridge": _B + "Bridge_by_Sander_Klootwijk.jpg",
    "brushes": _B + "Picture_1A_by_freespace.jpg",
    "wine": _B + "Wine_by_Jakkub_Mede.jpg",
    "friends": _B + "friends_by_Aitzol_Berasategi.jpg",
    "aqua": _B + "mate/nature/Aqua.jpg",
    "blinds": _B + "mate/nature/Blinds.jpg",
    "dune": _B + "mate/nature/Dune.jpg",
    "garden": _B + "mate/nature/Garden.jpg",
    "storm": _B + "mate/nature/Storm.jpg",
    "twowings": _B + "mate/nature/TwoWings.jpg",
    "wood": _B + "mate/nature/Wood.jpg",
    "yellowflower": _B + "mate/nature/YellowFlower.jpg",
    "seeding": _B + "seeding_by_Clements_Engelhardt.jpg",
    "sunset": _B + "sunset_by_Aitzol_Berasategi.jpg",
    "bythewater": _W + "BytheWater/contents/images/1280x1024.jpg",
    "coldripple": _W + "ColdRipple/contents/images/1280x1024.jpg",
    "darkesthour": _W + "DarkestHour/contents/images/1280x1024.jpg",
    "grey": _W + "Grey/contents/images/1280x1024.jpg",
    "kite": _W + "Kite/contents/images/1280x1024.jpg",
    "onestandsout": _W + "OneStandsOut/contents/images/1280x1024.jpg",
    "volna": _W + "Volna/contents/images/5120x2880.jpg",
    "summer1am": _W + "summer_1am/contents/images/1280x1024.jpg",
}
USER = {
    "dragonfly": _B + "Dragonfly_by_Bolly.jpg",
    "life": _B + "life_by_Aitzol_Berasategi.jpg",
    "raindrops": _B + "mate/nature/RainDrops.jpg",
    "picos": _B + "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "fallenleaf": _W + "FallenLeaf/contents/images/1280x1024.jpg",
    "cups": _W + "ColorfulCups/contents/images/2560x1600.jpg",
}
TEST = {
    "aitzgorri": _B + "aitzgorri_by_Aitzol_Berasategi.jpg",
    "ladybird": _B + "mate/nature/LadyBird.jpg",
    "eveningglow": _W + "EveningGlow/contents/images/1280x1024.jpg",
    "path": _W + "Path/contents/images/1280x1024.jpg",
    "fig": _B + "Picture_0B_by_freespace.jpg",
}
#: scikit-image / scikit-learn photos also trained on (they ship with the packages).
SKIMAGE_TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "coins", "moon", "clock", "grass", "gravel", "brick", "china", "flower")
UNRELATED = ("coffee", "chelsea", "camera")
#: The photo whose cycle chain the README shows: chosen (texture and hard edges) before any
#: tuned model existed.
FIGURE_CROP = "eveningglow_s128_224_160"  # two rowing boats on a pier


def _resize_short(a: np.ndarray, short: int = SHORT) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0)
    if x.ndim == 2:
        x = x[..., None].repeat(1, 1, 3)
    x = x[..., :3].permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    s = short / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True,
                      align_corners=False)
    return (x[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def _skimage(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    return getattr(skimage.data, name)()


def prepare(root: Path, out: Path) -> None:
    """Resize every photo (shorter side SHORT) and store them as uint8 tensors in one file."""
    from PIL import Image

    photos: dict[str, dict[str, torch.Tensor]] = {"train": {}, "user": {}, "test": {}, "unrelated": {}}
    for split, table in (("train", TRAIN), ("user", USER), ("test", TEST)):
        for name, rel in table.items():
            path = root / rel
            if not path.is_file():
                sys.exit(f"error: {path} is missing; extract the wallpaper packages first (see the docstring)")
            photos[split][name] = _resize_short(np.asarray(Image.open(path).convert("RGB")))
    for name in SKIMAGE_TRAIN:
        a = _skimage(name)
        # The scikit-image photos are already small (≤ 512 px); keep their own scale.
        photos["train"]["sk_" + name] = _resize_short(a, min(SHORT, min(a.shape[:2])))
    for name in UNRELATED:
        photos["unrelated"][name] = _resize_short(_skimage(name), 512)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(photos, out)
    print(f"{sum(map(len, photos.values()))} photos → {out}")


def load(path: str | Path = "runs/ldm/photos.pt") -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(path, weights_only=True)


def crop(img: torch.Tensor, top: int, left: int, side: int, size: int = SIZE) -> torch.Tensor:
    """A square crop of a uint8 photo, resized (antialiased) to ``size``: float (3, size, size) in [0, 1]."""
    patch = img[:, top:top + side, left:left + side][None].float() / 255.0
    if side != size:
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return patch[0].clamp(0, 1)


def random_crops(imgs: list[torch.Tensor], n: int, g: torch.Generator, size: int,
                 max_side: int = 192) -> torch.Tensor:
    """n random square crops (side uniform in [size, max_side] px of the resized photo, so from
    native scale to a few × downscaled), resized to ``size``, random h-flips, scaled to [−1, 1]."""
    out = []
    for _ in range(n):
        img = imgs[int(torch.randint(len(imgs), (1,), generator=g))]
        h, w = img.shape[1:]
        side = int(torch.randint(size, min(max_side, h, w) + 1, (1,), generator=g))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        x = crop(img, top, left, side, size)
        if float(torch.rand(1, generator=g)) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return torch.stack(out) * 2 - 1


def grid_crops(photos: dict[str, torch.Tensor], per_photo: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Deterministic crops: per photo, ``per_photo`` crops on a fixed pseudo-random layout, half at
    native scale (64 px of the 512-px photo), half 2× downscaled (128 → 64 px)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, img in photos.items():
        h, w = img.shape[1:]
        for i in range(per_photo):
            side = SIZE if i % 2 == 0 else 2 * SIZE
            top = int(torch.randint(0, (h - side) // 32 + 1, (1,), generator=g)) * 32
            left = int(torch.randint(0, (w - side) // 32 + 1, (1,), generator=g)) * 32
            out.append((f"{name}_s{side}_{top}_{left}", crop(img, top, left, side)))
    return out


def write_pngs(crops: list[tuple[str, torch.Tensor]], folder: str | Path) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, x in crops:
        a = (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{name}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", type=Path, default=Path("runs/wallpapers"))
    p.add_argument("--out", type=Path, default=Path("runs/ldm/photos.pt"))
    c = sub.add_parser("crops")
    c.add_argument("split", choices=("test", "user", "unrelated", "train"))
    c.add_argument("dest")
    c.add_argument("--photos", default="runs/ldm/photos.pt")
    c.add_argument("--per-photo", type=int, default=None, help="crops per photo (default: the split's)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.root, args.out)
        return
    photos = load(args.photos)[args.split]
    per = args.per_photo or {"test": 20, "user": 16, "unrelated": 16, "train": 4}[args.split]
    crops = grid_crops(photos, per, seed={"test": 0, "user": 1, "unrelated": 2, "train": 3}[args.split])
    print(f"{len(crops)} crops → {write_pngs(crops, args.dest)}")


if __name__ == "__main__":
    main()
