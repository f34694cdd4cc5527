"""Why the normalised latent shift under PGD rises after tuning (issue 21, part 3).

    python examples/colormnist/shift_analysis.py --mnist ../shared/data/mnist \\
        --base runs/colormnist/vae.safetensors --tuned runs/colormnist/vae.posthoc.safetensors

``adv_shift_data@ε`` is E‖μ̂(x + δ*) − μ̂(x)‖² / (2 Σᵢ Var μ̂ᵢ): the squared latent move PGD
finds, over the spread of the codes. This script takes it apart on the first N held-out
images, for the base and the tuned encoder, with the same attack as ``eval`` (20 signed steps
of ε/8 from a random start):

* numerator and denominator separately, and per group of latent elements (decoder-responsive
  ones, the other active ones, inactive ones), from the attack on all elements;
* the attack restricted to the decoder-responsive elements, normalised by their own spread;
* a per-element normalisation, E Σᵢ (Δμ̂ᵢ)² / Var μ̂ᵢ over the active elements;
* the same move seen through the decoder: ‖g(μ(x + δ*)) − g(μ(x))‖² over the mean
  ‖g(μ(xᵢ)) − g(μ(xⱼ))‖² of random pairs (what the attacked code *means*);
* a random (not adversarial) perturbation of the same ε, for scale.

Writes a markdown table on stdout and ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

import selfconsist  # noqa: E402
from selfconsist import metrics as M  # noqa: E402
from selfconsist.data import load_dataset  # noqa: E402


def whitened(vae, x: torch.Tensor) -> torch.Tensor:
    p = vae.prior
    return ((vae.encode(x).mean.float() - p.mean) / p.std).reshape(x.shape[0], -1)


def attack(vae, x, eps, mask=None, steps=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(whitened(vae, x[:1]).shape[1], dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        mu0 = whitened(vae, x)

    def objective(xa):
        return (whitened(vae, xa) - mu0)[:, m].pow(2).sum(1)

    return M.pgd_linf(objective, x, eps, vae.data_range, steps, generator=g)


@torch.no_grad()
def pair_distance(v: torch.Tensor) -> float:
    """E_{i≠j} ‖vᵢ − vⱼ‖² = 2 Σ Var (exact)."""
    return float(2 * v.reshape(v.shape[0], -1).double().var(0).sum())


def analyse(vae, x, eps, responsive):
    with torch.no_grad():
        mu = whitened(vae, x)
    var = mu.double().var(0)
    active = var > 0.01
    groups = {"responsive": responsive, "other active": active & ~responsive,
              "inactive": ~active & ~responsive}
    xa = attack(vae, x, eps)
    with torch.no_grad():
        d = (whitened(vae, xa) - mu).double().pow(2)  # (n, k)
        dec0 = vae.decode(vae.encode(x).mean)
        deca = vae.decode(vae.encode(xa).mean)
        xr = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1)
              ).clamp(*vae.data_range)
        dr = (whitened(vae, xr) - mu).double().pow(2)
    num, den = float(d.sum(1).mean()), float(2 * var.sum())
    out = {"active units (Var μ̂ > 0.01 on these images)": int(active.sum()), "shift (numerator) E‖Δμ̂‖²": num,
           "spread (denominator) 2ΣVar μ̂": den, "normalised shift (eval's figure)": num / den}
    for name, m in groups.items():
        out[f"{name} elements (responsive: of the base decoder; active: Var μ̂ > 0.01)"] = int(m.sum())
        out[f"share of the shift in {name} elements"] = float(d[:, m].sum(1).mean()) / num
        out[f"share of the spread in {name} elements"] = float(2 * var[m].sum()) / den
        out[f"shift in {name} elements, E Σ Δμ̂ᵢ² over them"] = float(d[:, m].sum(1).mean())
    out["per-element normalised shift, active elements, E Σ Δμ̂ᵢ²/(2 Var μ̂ᵢ)"] = float(
        (d[:, active] / (2 * var[active])).sum(1).mean())
    xr_resp = attack(vae, x, eps, mask=responsive)
    with torch.no_grad():
        dr_resp = (whitened(vae, xr_resp) - mu)[:, responsive].double().pow(2).sum(1).mean()
    out["attack on responsive elements only, normalised by their spread"] = float(dr_resp) / float(
        2 * var[responsive].sum())
    out["decoded shift ‖g(μ(x+δ)) − g(μ(x))‖² / pair distance of g(μ(x))"] = float(
        (deca - dec0).pow(2).flatten(1).sum(1).mean()) / pair_distance(dec0)
    out["random ±ε noise, normalised shift"] = float(dr.sum(1).mean()) / den
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--tuned", type=Path, nargs="+", required=True)
    ap.add_argument("--n", type=int, default=500, help="held-out images attacked")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--names", nargs="*", help="column names of the tuned models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = load_dataset(common.data_spec(args.mnist)).x[common.N_TRAIN:][: args.n]
    base = selfconsist.load(args.base)
    responsive = M.responsive_elements(base, torch.Generator().manual_seed(0))
    cols = {"VAE": analyse(base, x, args.eps, responsive)}
    for i, t in enumerate(args.tuned):
        name = args.names[i] if args.names and i < len(args.names) else t.name
        cols[name] = analyse(selfconsist.load(t), x, args.eps, responsive)
    names = list(cols)
    print(f"| figure (ε = {args.eps:g}, {args.n} held-out images) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k in cols["VAE"]:
        print(f"| {k} | " + " | ".join(f"{cols[n][k]:.3g}" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps(cols, indent=2) + "\n")


if __name__ == "__main__":
    main()
