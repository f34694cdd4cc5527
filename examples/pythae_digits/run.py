"""pythae models at selfconsist's defaults: does tuning improve them, and does the advice work?

    python examples/pythae_digits/run.py --out runs/pythae_digits

Trains pythae models with pythae's own ``TrainingPipeline`` on scikit-learn digits (8×8,
1500 to train, the rest to evaluate; default MLP networks, ``mse`` loss, latent 6, 20 epochs,
Adam 1e-3, batch 64, trainer seeds 1–3), tunes each with ``selfconsist.tune`` at the shipped
defaults (no data), and measures the sample round trip independently with pythae's own
modules (``AutoModel.load_from_folder``): z ~ N(0, I), x = decoder(z), x̂ = decoder(encoder(x)
.embedding), per-pixel MSE over 2000 draws. When the run ends with advice (a change within
noise), the advised setting is run too. ``--obs-var`` adds runs at fixed observation
variances. Writes ``results.md`` and ``results.json``. About 30 s per model on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

import selfconsist
from selfconsist.report import responsive_kept
from selfconsist.tune import TuneConfig

logging.getLogger("pythae").setLevel(logging.WARNING)
INPUT_DIM = (1, 8, 8)


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]


def make_model(kind: str, seed: int):
    from pythae.models import IWAE, VAE, BetaVAE, BetaVAEConfig, IWAEConfig, VAEConfig

    torch.manual_seed(seed)
    common = dict(input_dim=INPUT_DIM, latent_dim=6, reconstruction_loss="mse")
    if kind == "VAE":
        return VAE(VAEConfig(**common))
    if kind.startswith("BetaVAE"):
        return BetaVAE(BetaVAEConfig(beta=float(kind.split("β=")[1]), **common))
    if kind == "IWAE":
        return IWAE(IWAEConfig(number_samples=5, **common))
    raise ValueError(kind)


def train(kind: str, seed: int, out: Path, epochs: int) -> Path:
    """Train with pythae's pipeline (skipped when the folder exists); its ``final_model``."""
    found = list(out.glob("*/final_model"))
    if found:
        return found[0]
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    x = digits()
    cfg = BaseTrainerConfig(output_dir=str(out), num_epochs=epochs, learning_rate=1e-3,
                            per_device_train_batch_size=64, no_cuda=True, seed=seed)
    TrainingPipeline(model=make_model(kind, seed), training_config=cfg)(
        train_data=x[:1500], eval_data=x[1500:])
    (final,) = out.glob("*/final_model")
    return final


@torch.no_grad()
def pythae_roundtrip(folder: Path, n: int = 2000, seed: int = 123) -> tuple[float, float]:
    """Per-pixel sample round-trip MSE and its standard error, with pythae's own modules."""
    from pythae.models import AutoModel

    model = AutoModel.load_from_folder(str(folder)).eval()
    z = torch.randn(n, model.model_config.latent_dim, generator=torch.Generator().manual_seed(seed))
    x = model.decoder(z)["reconstruction"].reshape(n, -1)
    mu = model.encoder(x.reshape(n, *INPUT_DIM))["embedding"]
    xh = model.decoder(mu)["reconstruction"].reshape(n, -1)
    per = (x - xh).pow(2).mean(1).double()
    return float(per.mean()), float(per.std() / math.sqrt(n))


@torch.no_grad()
def data_kl(folder: Path) -> float:
    """Mean KL(q(z|x) ‖ N(0, I)) in nats over the 297 held-out digits (how collapsed it is)."""
    from pythae.models import AutoModel

    model = AutoModel.load_from_folder(str(folder)).eval()
    e = model.encoder(digits()[1500:])
    mu, lv = e["embedding"], e["log_covariance"]
    return float(0.5 * (mu.pow(2) + lv.exp() - 1 - lv).sum(1).mean())


def tune_and_measure(base: Path, out: Path, cfg: TuneConfig, base_rt: tuple[float, float]) -> dict:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t = time.time()
    res = selfconsist.tune(selfconsist.load(base), cfg, out=out, progress=False)
    rt = pythae_roundtrip(out)
    sw = {k: v for k, v in selfconsist.settings.given(cfg).items() if k != "device"}
    return {"settings": sw or "defaults", "obs_var_used": res.obs_var, "obs_var_source":
            res.settings.sources.get("obs_var"), "roundtrip": rt, "ratio": rt[0] / base_rt[0],
            "significant": abs(rt[0] - base_rt[0]) > 2 * math.hypot(rt[1], base_rt[1]),
            "advice": res.advice, "seconds": round(time.time() - t, 1),
            "responsive": responsive_kept(res.before, res.after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/pythae_digits"))
    ap.add_argument("--kinds", nargs="*", default=["VAE", "BetaVAE β=0.05", "BetaVAE β=4", "IWAE"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="tune steps (default: the shipped one)")
    ap.add_argument("--obs-var", nargs="*", type=float, default=[], help="also tune at these v")
    ap.add_argument("--old-defaults", action="store_true",
                    help="also tune with v = the model's (--obs-var-ratio 0), and follow its advice")
    ap.add_argument("--results", default="results", help="stem of the results files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds:
        for seed in args.seeds:
            slug = kind.replace(" ", "").replace("β=", "b") + f"-s{seed}"
            base = train(kind, seed, args.out / "models" / slug, args.epochs)
            base_rt = pythae_roundtrip(base)
            row = {"model": kind, "seed": seed, "kl": data_kl(base), "base_roundtrip": base_rt, "runs": []}
            extra = {"steps": args.steps} if args.steps else {}
            runs = [("defaults", TuneConfig(device="cpu", **extra))]
            if args.old_defaults:  # v = the model's (before issue 21): the advice line's case
                runs.append(("v=model's", TuneConfig(device="cpu", obs_var_ratio=0, **extra)))
            runs += [(f"v={v:g}", TuneConfig(device="cpu", obs_var=v, **extra)) for v in args.obs_var]
            for name, cfg in runs:
                r = tune_and_measure(base, args.out / "tuned" / f"{slug}-{name}", cfg, base_rt)
                row["runs"].append(r)
                print(f"{kind} seed {seed} {name}: ×{r['ratio']:.3f} (v {r['obs_var_used']:.3g}, "
                      f"{r['obs_var_source']}) advice={r['advice']!r} {r['seconds']}s", flush=True)
                if r["advice"]:
                    opts = advised_options(r["advice"])
                    r2 = tune_and_measure(base, args.out / "tuned" / f"{slug}-{name}-advised",
                                          TuneConfig(**{**cfg_overrides(cfg), **opts}),
                                          base_rt)
                    r2["settings"] = f"{name} + advised {opts}"
                    row["runs"].append(r2)
                    print(f"  advised {opts}: ×{r2['ratio']:.3f}", flush=True)
            rows.append(row)
            (args.out / f"{args.results}.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    write_md(args.out / f"{args.results}.md", rows)


def cfg_overrides(cfg: TuneConfig) -> dict:
    """What ``cfg`` sets (so the advised run keeps the rest of the run it follows)."""
    return selfconsist.settings.given(cfg)


def advised_options(advice: str) -> dict:
    """The option the advice line names (``--obs-var 0.01`` → ``{"obs_var": 0.01}``)."""
    words = advice.replace(",", " ").replace(";", " ").split()
    i = next(i for i, w in enumerate(words) if w.startswith("--"))
    return {words[i][2:].replace("-", "_"): float(words[i + 1])}


def write_md(path: Path, rows: list[dict]) -> None:
    lines = ["| model | seed | KL (nats) | base round trip | run | v used | round trip | × | significant |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["base_roundtrip"]
        for run in r["runs"]:
            rt = run["roundtrip"]
            lines.append(f"| {r['model']} | {r['seed']} | {r['kl']:.2f} | {b[0]:.5f} ± {b[1]:.1g} | "
                         f"{run['settings']} | {run['obs_var_used']:.3g} ({run['obs_var_source']}) | "
                         f"{rt[0]:.5f} ± {rt[1]:.1g} | ×{run['ratio']:.3f} | "
                         f"{'yes' if run['significant'] else 'no'} |")
            if run["advice"]:
                lines.append(f"|  |  |  |  | advice: {run['advice']} |  |  |  |  |")
            if run.get("responsive") and "LOST" in run["responsive"]:
                lines.append(f"|  |  |  |  | {run['responsive']} |  |  |  |  |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
