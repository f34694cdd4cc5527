"""Datasets as float tensors (N, C, H, W) in [0, 1], with optional integer labels.

Specs accepted by :func:`load_dataset` (and ``--data``):

* ``digits``: scikit-learn's bundled 8×8 digits (1797 images, no download);
* ``mnist:PATH`` / ``colormnist:PATH``: MNIST IDX files (gzipped or raw); PATH is
  the images file or a folder holding ``*images-idx3-ubyte[.gz]``;
* ``PATH.npy`` / ``PATH.npz`` (keys ``x`` or ``images``, optional ``y``/``labels``);
* a folder of PNG/JPEG images, of any size when the model's shape is given (``fit``:
  ``crop`` a centre crop per image, ``tile`` every non-overlapping tile; see
  :func:`fit_image`);
* a raw IDX images file.

ColorMNIST (design note): each digit gets one of the 7 non-black on/off patterns
of the R, G, B channels, drawn deterministically from ``seed``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
COLOURS = torch.tensor(
    [[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1) if (r, g, b) != (0, 0, 0)],
    dtype=torch.float32,
)


@dataclass
class Dataset:
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor | None = None  # (N,) int64
    name: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, n_train: int) -> tuple[Dataset, Dataset]:
        """First ``n_train`` items and the rest (the design note's 8k/2k split)."""
        if not 0 < n_train < len(self):
            raise DataError(f"cannot split {len(self)} items at {n_train}")
        y = self.y
        return (
            Dataset(self.x[:n_train], None if y is None else y[:n_train], self.name + "[train]"),
            Dataset(self.x[n_train:], None if y is None else y[n_train:], self.name + "[test]"),
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    n = int(np.prod(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != n:
        raise DataError(f"{path}: truncated IDX file (expected {n} values, found {data.size})")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for p in sorted(folder.iterdir()):
        if stem in p.name:
            return p
    return None


def load_mnist(path: str | Path) -> Dataset:
    """MNIST images in [0, 1], shape (N, 1, 28, 28), with labels when they sit beside them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    images = _find(path, "images-idx3") if path.is_dir() else path
    if images is None:
        raise DataError(f"{path}: no '*images-idx3-ubyte[.gz]' file in this folder")
    x = read_idx(images)
    if x.ndim != 3:
        raise DataError(f"{images}: expected (N, H, W) images, got shape {x.shape}")
    labels = _find(images.parent, images.name.split("images")[0] + "labels-idx1")
    y = None
    if labels is not None:
        yy = read_idx(labels)
        if yy.shape[0] != x.shape[0]:
            raise DataError(f"{labels}: {yy.shape[0]} labels for {x.shape[0]} images")
        y = torch.from_numpy(yy.astype(np.int64))
    return Dataset(torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], y, "mnist")


def colorize(x: Tensor, seed: int = 0) -> Tensor:
    """ColorMNIST: (N, 1, H, W) → (N, 3, H, W), each image one of 7 colours, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(COLOURS), (x.shape[0],), generator=g)
    return x * COLOURS[idx][:, :, None, None]


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits, scaled to [0, 1] (shipped with scikit-learn: no download)."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError:
        raise DataError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    d = _ld()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    return Dataset(x, torch.from_numpy(d.target.astype(np.int64)), "digits")


def _as_nchw(arr: np.ndarray, source: str) -> Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if arr.ndim != 4:
        raise DataError(f"{source}: expected images (N, H, W) or (N, C, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{source}: no images")
    x = arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        x = x / 255.0
    if not np.isfinite(x).all():
        raise DataError(f"{source}: contains NaN or Inf")
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise DataError(f"{source}: values in [{x.min():.3g}, {x.max():.3g}]; expected [0, 1] or uint8")
    return torch.from_numpy(np.ascontiguousarray(x))


def load_array(path: Path) -> Dataset:
    try:
        obj = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's message here advises allow_pickle=True, which we never do
        raise DataError(f"{path}: cannot read array file (not a .npy/.npz array of numbers)") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read array file ({e})") from None
    y = None
    if isinstance(obj, np.lib.npyio.NpzFile):
        keys = list(obj.keys())
        xkey = next((k for k in ("x", "images", "arr_0") if k in keys), None)
        if xkey is None:
            raise DataError(f"{path}: no 'x' or 'images' array (found {keys})")
        ykey = next((k for k in ("y", "labels") if k in keys), None)
        x = obj[xkey]
        if ykey is not None:
            y = torch.from_numpy(obj[ykey].astype(np.int64))
    else:
        x = obj
    data = _as_nchw(x, str(path))
    if y is not None and y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {y.shape[0]} labels for {data.shape[0]} images")
    return Dataset(data, y, path.stem)


FITS = ("crop", "tile")


def _read_image(path: Path, channels: int | None) -> np.ndarray:
    """One image file → float32 (H, W, C) in [0, 1] (C = ``channels``, or 1 for a greyscale
    file and 3 otherwise). EXIF orientation is applied; alpha is dropped; 16-bit greyscale
    keeps its precision."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    if channels is None:
        channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L") else 3
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        a = a / (65535.0 if a.max() > 255 or im.mode.startswith("I;16") else 255.0)
        a = np.clip(a, 0.0, 1.0).astype(np.float32)[..., None]
        return np.repeat(a, channels, axis=2) if channels != 1 else a
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resample an (H, W, C) float image in [0, 1] to (h, w, C), bicubic with Pillow's
    antialiasing when shrinking, per channel in float (no 8-bit rounding)."""
    from PIL import Image

    if a.shape[:2] == (h, w):
        return a
    bicubic = Image.Resampling.BICUBIC
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), mode="F").resize((w, h), bicubic))
             for c in range(a.shape[2])]
    return np.clip(np.stack(chans, -1), 0.0, 1.0)


def fit_image(a: np.ndarray, size: tuple[int, int], fit: str = "crop") -> list[np.ndarray]:
    """Fit one (H, W, C) image to the model's (h, w): a list of (h, w, C) arrays.

    * ``crop``: scale by s = max(h/H, w/W) (for a square model: the shorter side becomes the
      model's size), then take the centre h × w: one image, any aspect ratio;
    * ``tile``: the non-overlapping h × w tiles of the image, the grid centred (the margins
      that do not fill a tile are dropped evenly); an image smaller than h × w in either side
      is first scaled up by that same s, so it yields at least one tile. No resampling
      otherwise: tiles keep the photo's own pixel scale.
    """
    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    h, w = size
    big_h, big_w = a.shape[:2]
    s = max(h / big_h, w / big_w)
    if fit == "crop" or s > 1:
        nh, nw = max(h, round(big_h * s)), max(w, round(big_w * s))
        a = _resize(a, nh, nw)
        big_h, big_w = nh, nw
    if fit == "crop":
        top, left = (big_h - h) // 2, (big_w - w) // 2
        return [a[top : top + h, left : left + w]]
    rows, cols = big_h // h, big_w // w
    top, left = (big_h - rows * h) // 2, (big_w - cols * w) // 2
    return [a[top + r * h : top + (r + 1) * h, left + c * w : left + (c + 1) * w]
            for r in range(rows) for c in range(cols)]


def load_image_folder(folder: str | Path, shape: tuple[int, ...] | None = None,
                      fit: str = "crop",
                      data_range: tuple[float, float] = (0.0, 1.0)) -> Dataset:
    """The PNG/JPEG/BMP images of ``folder`` (sorted by name, not recursive) as (N, C, H, W).

    With ``shape`` = the model's (C, H, W), images of any size and aspect ratio are fitted by
    :func:`fit_image` (``crop``: one centre crop per image; ``tile``: every tile) and read with
    C channels (1: greyscale, 3: RGB). Without it, every image must already have the same size
    (a folder of greyscale files stays one channel). Values are scaled to ``data_range``:
    x = lo + (hi − lo)·p with p ∈ [0, 1] the pixel value (``selfconsist eval`` keeps [0, 1]
    and maps to the model's range itself). An empty folder, or any file that cannot be read,
    is refused with one line naming it. Needs Pillow.
    """
    folder = Path(folder)
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no PNG/JPEG images in this folder")
    channels = None if shape is None else int(shape[0])
    if channels not in (None, 1, 3):
        raise DataError(f"an image folder gives 1- or 3-channel images; the model takes {channels}")
    arrays = [_read_image(f, channels) for f in files]
    if shape is None:
        if not all(a.shape[2] == 1 for a in arrays):  # mixed folders are read as RGB
            arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"{folder}: images have different sizes {sorted(shapes)[:3]}; resize "
                            "them first")
        items = arrays
    else:
        size = (int(shape[1]), int(shape[2]))
        items = [t for a in arrays for t in fit_image(a, size, fit)]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2)))
    lo, hi = data_range
    if (lo, hi) != (0.0, 1.0):
        x = lo + (hi - lo) * x
    return Dataset(x, None, folder.name)


def load_dataset(spec: str, seed: int = 0, shape: tuple[int, ...] | None = None,
                 fit: str = "crop") -> Dataset:
    """Load a dataset from a spec string (see the module docstring). ``shape`` (the model's
    (C, H, W)) and ``fit`` apply to a folder of images: see :func:`load_image_folder`."""
    kind, sep, rest = spec.partition(":")
    if spec == "digits":
        return load_digits()
    if sep and kind in ("mnist", "colormnist"):
        d = load_mnist(rest)
        if kind == "colormnist":
            d = Dataset(colorize(d.x, seed), d.y, "colormnist")
        return d
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"{spec}: no such file or folder (built-in specs: digits, mnist:PATH, colormnist:PATH)"
        )
    if path.is_dir():
        if any("idx3" in p.name for p in path.iterdir()):
            return load_mnist(path)
        return load_image_folder(path, shape, fit)
    if path.suffix in (".npy", ".npz"):
        return load_array(path)
    if "idx" in path.name:
        return load_mnist(path)
    raise DataError(f"{path}: unknown data format (use .npy, .npz, IDX, or a folder of images)")


def check_matches(data: Dataset, data_shape: tuple[int, ...]) -> None:
    """Raise a clear error when a dataset doesn't fit a model."""
    if tuple(data.x.shape[1:]) != tuple(data_shape):
        raise DataError(
            f"data {data.name!r} has images of shape {tuple(data.x.shape[1:])}, "
            f"the model expects {tuple(data_shape)}"
        )
