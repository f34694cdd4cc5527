"""Shared pieces of the ColorMNIST experiments: data split, base models, evaluation, tables.

Setup of ``docs/results-colormnist.md``: ColorMNIST from the 10k MNIST test images, the first
8000 for training (and for the linear probe), the last 2000 held out; the paper's MLP
(4×200 ReLU, sigmoid output, latent 64), v = 0.05, Adam 1e-3, 40 epochs at batch 64.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import selfconsist
from selfconsist.evaluate import EvalConfig, evaluate
from selfconsist.train import TrainConfig

N_TRAIN = 8000
EPOCH_STEPS = N_TRAIN // 64

# The figures the README table shows, in order: (metric key, label, scale, format).
ROWS = [
    ("sample_roundtrip_mse", "sample round-trip error, summed over pixels", "pixels", "{:.3g}"),
    ("latent_roundtrip_corr_responsive", "latent round-trip corr., responsive elements", 1, "{:.3f}"),
    ("drift@10", "drift@10 from samples, summed over pixels", "pixels", "{:.3g}"),
    ("recon_mse", "reconstruction error, held out, summed over pixels", "pixels", "{:.4g}"),
    ("active_units", "active units (of 64)", 1, "{:.0f}"),
    ("responsive_elements", "decoder-responsive elements", 1, "{:.0f}"),
    ("responsive_active", "responsive elements that are active", 1, "{:.0f}"),
    ("adv_shift_data@0.1", "normalised latent shift, PGD ε=0.1", 1, "{:.3g}"),
    ("probe_acc", "probe accuracy, clean", 1, "{:.3f}"),
    ("probe_acc_adv@0.1", "probe accuracy, latent-shift PGD ε=0.1", 1, "{:.3f}"),
    ("probe_acc_adv@0.2", "probe accuracy, latent-shift PGD ε=0.2", 1, "{:.3f}"),
    ("probe_acc_ce@0.1", "probe accuracy, probe-aware PGD ε=0.1", 1, "{:.3f}"),
]
PIXELS = 3 * 28 * 28


def data_spec(mnist: Path) -> str:
    return f"colormnist:{mnist}"


def train_base(mnist: Path, out: Path, objective: str = "vae", epochs: int = 40, seed: int = 0,
               rho: float = 0.975, latent_dim: int = 64, hidden: int = 200, init: str = "haiku") -> Path:
    """Train the paper's MLP on the 8k split (skipped when ``out`` exists: reruns are cheap)."""
    if out.exists():
        return out
    cfg = TrainConfig(model="mlp", data=data_spec(mnist), objective=objective, rho=rho,
                      steps=epochs * EPOCH_STEPS, batch_size=64, lr=1e-3, seed=seed, device="cpu",
                      latent_dim=latent_dim, hidden=hidden, obs_var=0.05, n_train=N_TRAIN, init=init)
    t = time.time()
    selfconsist.train(cfg, out, progress=False)
    log(f"trained {out.name} ({objective}, {epochs} epochs) in {time.time() - t:.0f}s")
    return out


def eval_config(seed: int = 0, figures: bool = True) -> EvalConfig:
    return EvalConfig(seed=seed, n_train=N_TRAIN, device="cpu", figures=figures, eps=(0.1, 0.2))


def run_eval(model: Path, out: Path, mnist: Path, compare: Path | None = None, name: str = "model",
             compare_name: str = "tuned", figures: bool = True) -> dict[str, Any]:
    """``selfconsist eval`` on the 2k held-out split; returns metrics["models"]."""
    t = time.time()
    res = evaluate(str(model), compare=str(compare) if compare else None, data=data_spec(mnist),
                   out=out, config=eval_config(figures=figures), name=name,
                   compare_name=compare_name, overwrite=True)
    log(f"evaluated {model.name}{' vs ' + compare.name if compare else ''} in {time.time() - t:.0f}s")
    return res.metrics["models"]


def cell(metrics: dict[str, Any], key: str, scale: Any, fmt: str) -> str:
    if key not in metrics:
        return "–"
    k = PIXELS if scale == "pixels" else scale
    v, se = metrics[key]["value"] * k, metrics[key]["stderr"] * k
    return fmt.format(v) + (f" ± {se:.1g}" if se == se and se > 0 else "")


def table(models: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one column per model."""
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, scale, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(models[n], key, scale, fmt) for n in names) + " |")
    return "\n".join(lines)


# The acceptance targets of the tune issue, for a post-hoc tuned copy of the base VAE.
def check_targets(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    v = lambda m, k: m[k]["value"]  # noqa: E731
    rt = v(base, "sample_roundtrip_mse") / v(tuned, "sample_roundtrip_mse")
    rec = v(tuned, "recon_mse") / v(base, "recon_mse") - 1
    probe = v(tuned, "probe_acc") - v(base, "probe_acc")
    resp = v(tuned, "responsive_active") / max(v(tuned, "responsive_elements"), 1)
    adv = v(tuned, "probe_acc_adv@0.1") - v(base, "probe_acc_adv@0.1")
    return {
        "sample round-trip error falls ≥5×": (rt >= 5, f"{rt:.1f}×"),
        "held-out reconstruction within 5%": (rec <= 0.05, f"{100 * rec:+.1f}%"),
        "clean probe within 2 points": (probe >= -0.02, f"{100 * probe:+.1f} pts"),
        "≥95% of responsive elements active": (resp >= 0.95, f"{100 * resp:.0f}%"),
        "PGD ε=0.1 probe accuracy does not fall": (adv >= 0, f"{100 * adv:+.1f} pts"),
        "(aim) PGD ε=0.1 probe accuracy +10 points": (adv >= 0.10, f"{100 * adv:+.1f} pts"),
    }


# The comparison issue's target, for any model against the nominal VAE.
def check_claim(base: dict[str, Any], model: dict[str, Any]) -> tuple[bool, str]:
    v = lambda m, k: m[k]["value"]  # noqa: E731
    adv = v(model, "probe_acc_adv@0.1") - v(base, "probe_acc_adv@0.1")
    clean = v(model, "probe_acc") - v(base, "probe_acc")
    return adv >= 0.10 and clean >= -0.02, f"PGD ε=0.1 probe {100 * adv:+.1f} pts, clean {100 * clean:+.1f} pts"


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


torch.set_num_threads(max(1, torch.get_num_threads()))
