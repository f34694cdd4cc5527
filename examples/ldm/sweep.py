"""The latent-diffusion sweep: which tuning recipe helps real images without moving their latents.

Two phases, so that the expensive one can run in parallel processes:

    # 1. tune the testbed once per setting (each writes runs/ldm/sweep/NAME/, a diffusers folder)
    python examples/ldm/sweep.py tune --only "prior (generic defaults);refine 2"
    # 2. measure every tuned model on the held-out photos and write the table
    python examples/ldm/photos.py heldout runs/ldm/heldout
    python examples/ldm/sweep.py table --heldout runs/ldm/heldout --out examples/ldm/results.md

The table's figures are those of ``selfconsist eval --data`` on the held-out crops (per-image
means): single-pass PSNR, PSNR after 10 encode → decode cycles, the dB lost between cycles 1 and
10, the latent shift in base-latent standard deviations, and the data-free sample round-trip
error that ``tune`` reports (before → after).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTBED = HERE / "testbed-vae"
USER = "runs/ldm/user"  # python examples/ldm/photos.py user runs/ldm/user

#: name → TuneConfig settings. Every run: the same steps, batch, seed; bf16 on this CPU for time.
COMMON = {"steps": 300, "batch_size": 8, "seed": 0, "save_every": 10_000}
SETTINGS: dict[str, dict] = {
    # The generic defaults (ColorMNIST-tuned) on the i.i.d. `diffusion` prior.
    "prior, ρ .975 (generic defaults)": {"rho": 0.975, "lambda_rec": 5.0, "lr": 1e-4},
    # Data-free: prior draws refined twice by z ← μ_base(g(z)); a tighter coupling.
    "refine 2, ρ .999": {"prior_refine": 2, "rho": 0.999, "lambda_rec": 5.0, "lr": 1e-4},
    "refine 2, ρ .999, v .001": {"prior_refine": 2, "rho": 0.999, "lambda_rec": 5.0, "lr": 1e-4,
                                 "obs_var": 0.001},
    "refine 2, ρ .999, anchor .01": {"prior_refine": 2, "rho": 0.999, "lambda_rec": 5.0,
                                     "lr": 1e-4, "anchor": 0.01},
    "refine 2, ρ .999, λ_rec 0": {"prior_refine": 2, "rho": 0.999, "lambda_rec": 0.0, "lr": 1e-4},
    # With a folder of the user's own images (crops of the training photos, never held out).
    "images, ρ .999": {"images": USER, "rho": 0.999, "lambda_rec": 5.0, "lr": 1e-4},
    "images, ρ .999, anchor .01": {"images": USER, "rho": 0.999, "lambda_rec": 5.0, "lr": 1e-4,
                                   "anchor": 0.01},
    "images, ρ .999, anchor .1": {"images": USER, "rho": 0.999, "lambda_rec": 5.0, "lr": 1e-4,
                                  "anchor": 0.1},
    "images, ρ .999, v .001, anchor .1": {"images": USER, "rho": 0.999, "lambda_rec": 5.0,
                                          "lr": 1e-4, "obs_var": 0.001, "anchor": 0.1},
    # Second wave: the generic ρ with the anchor (ρ .999 moved real latents far, above).
    "prior, ρ .975, anchor .1": {"rho": 0.975, "lambda_rec": 5.0, "lr": 1e-4, "anchor": 0.1},
    "refine 2, ρ .975, anchor .1": {"prior_refine": 2, "rho": 0.975, "lambda_rec": 5.0,
                                    "lr": 1e-4, "anchor": 0.1},
    "refine 2, ρ .975, v .001, anchor .1": {"prior_refine": 2, "rho": 0.975, "lambda_rec": 5.0,
                                            "lr": 1e-4, "obs_var": 0.001, "anchor": 0.1},
    # Third wave: a stronger anchor data-free; a longer, faster run with --images.
    "refine 2, ρ .975, anchor 1": {"prior_refine": 2, "rho": 0.975, "lambda_rec": 5.0,
                                   "lr": 1e-4, "anchor": 1.0},
    "prior, ρ .975, anchor 1": {"rho": 0.975, "lambda_rec": 5.0, "lr": 1e-4, "anchor": 1.0},
    "images, ρ .999, anchor .1, lr 3e-4, 600 steps": {"images": USER, "rho": 0.999,
                                                      "lambda_rec": 5.0, "lr": 3e-4,
                                                      "anchor": 0.1, "steps": 600},
    "images, ρ .975, anchor .1": {"images": USER, "rho": 0.975, "lambda_rec": 5.0, "lr": 1e-4,
                                  "anchor": 0.1},
    "images, ρ .975, v .001, anchor .1": {"images": USER, "rho": 0.975, "lambda_rec": 5.0,
                                          "lr": 1e-4, "obs_var": 0.001, "anchor": 0.1},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def tune_one(name: str, root: Path, precision: str, testbed: Path = TESTBED,
             steps: int | None = None) -> None:
    import selfconsist
    from selfconsist.tune import TuneConfig, tune

    out = root / slug(name)
    if out.exists():
        print(f"skip {name}: {out} exists", file=sys.stderr)
        return
    vae = selfconsist.load(str(testbed))
    common = {**COMMON, **({"steps": steps} if steps else {})}
    cfg = TuneConfig(**{**common, **SETTINGS[name], "precision": precision})
    t0 = time.time()
    result = tune(vae, cfg, out, progress=False)
    rec = {"name": name, "settings": SETTINGS[name], "common": common, "precision": precision,
           "seconds": round(time.time() - t0, 1), "before": result.before, "after": result.after,
           "latent_shift_tune": result.latent_shift}
    (root / f"{slug(name)}.json").write_text(json.dumps(rec, indent=1))
    print(f"{name}: {rec['seconds']} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("tune", "table"))
    ap.add_argument("--only", default=None, help="settings separated by ';' (default: all)")
    ap.add_argument("--root", default="runs/ldm/sweep")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--heldout", default="runs/ldm/heldout")
    ap.add_argument("--out", default=None, help="markdown table to write (table phase)")
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--steps", type=int, default=None, help="override the steps (smoke tests)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    names = args.only.split(";") if args.only else list(SETTINGS)
    if args.phase == "tune":
        for name in names:
            tune_one(name, root, args.precision, Path(args.testbed), args.steps)
    else:
        from table import write_table

        write_table(root, names, Path(args.heldout), args.out, Path(args.testbed))


if __name__ == "__main__":
    main()
