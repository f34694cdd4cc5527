"""The README's cycle figure: one held-out crop (chosen before any result, ``wallpapers.FIGURE_CROP``)
through 10 encode → decode cycles, with the base encoder, a tuned one and the idempotent bound.

    python examples/ldm/figure.py --tuned runs/ldm/cycles/NAME --out examples/ldm/cycles.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import wallpapers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(HERE / "sdclass-vae"))
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--label", default="tuned")
    ap.add_argument("--test", default="runs/ldm/test")
    ap.add_argument("--out", default=str(HERE / "cycles.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import selfconsist
    from selfconsist.data import load_image_folder
    from selfconsist.realimage import CYCLE_MODES, _cycles, psnr_per_image

    torch.set_num_threads(1)
    base, tuned = selfconsist.load(args.base), selfconsist.load(args.tuned)
    path = Path(args.test) / f"{wallpapers.FIGURE_CROP}.png"
    x0 = load_image_folder(path.parent, tuple(base.data_shape), fit="crop", data_range=base.data_range)
    names = sorted(p.stem for p in path.parent.glob("*.png"))
    x0 = x0.x[names.index(wallpapers.FIGURE_CROP)][None]
    steps = (1, 2, 5, 10)
    rows = [("base encoder", base, "mean"), (args.label, tuned, "mean"),
            ("idempotent bound", base, "bound")]
    fig, axes = plt.subplots(len(rows), len(steps) + 1, figsize=(2.1 * (len(steps) + 1), 2.35 * len(rows)))
    for r, (label, vae, mode) in enumerate(rows):
        chain = {k: xk for k, xk in enumerate(_cycles(vae, x0, max(steps), CYCLE_MODES[mode]), start=1)}
        for c, k in enumerate((0, *steps)):
            img = x0 if k == 0 else chain[k]
            ax = axes[r, c]
            ax.imshow(((img[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if k == 0:
                ax.set_title("original", fontsize=9)
                ax.set_ylabel(label, fontsize=8)
            else:
                db = psnr_per_image(img, x0, base.data_range).item()
                ax.set_title(f"cycle {k}: {db:.1f} dB", fontsize=9)
    fig.suptitle(f"held-out crop {wallpapers.FIGURE_CROP} (64 px, chosen before any result), SD-class "
                 "testbed; bound = base encoder, then exact decoder inversion", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
