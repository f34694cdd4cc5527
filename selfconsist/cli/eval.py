"""``selfconsist eval MODEL [--compare TUNED] [--data SPEC [--labels PATH]] --out DIR``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import SelfconsistError
from ..loading import LoadOptions
from . import app
from .common import AdapterOpt, TrustOpt, with_load_options


def parse_eps(text: str | None) -> tuple[float, ...] | None:
    """``"0.1,0.2"`` → (0.1, 0.2); empty → None (the default: 10% and 20% of the data range)."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SelfconsistError(f"--eps {text!r}: give numbers separated by commas, "
                               "e.g. --eps 0.1,0.2") from None


def parse_cycles(text: str) -> tuple[int, ...]:
    """``"1,2,5,10"`` → (1, 2, 5, 10): the K of cycle_psnr@K (positive integers)."""
    try:
        ks = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise SelfconsistError(f"--cycles {text!r}: give positive integers separated by commas, "
                               "e.g. --cycles 1,2,5,10")
    return ks


@app.command("eval")
@with_load_options
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint to evaluate: a file, a folder or a Hub id."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Folder for metrics.json, report.md and the figures."),
    compare: str | None = typer.Option(None, "--compare",
                                       help="A second checkpoint (e.g. the tuned model)."),
    data: str | None = typer.Option(
        None, "--data", help="Held-out data: digits, mnist:PATH, colormnist:PATH, a .npy/.npz "
        "file or an image folder (PNG/JPEG of any size, fitted by --fit), in [0, 1] (mapped to "
        "the model's data range). Image data adds the real-image cycle metrics."),
    fit: str = typer.Option("crop", "--fit", help="How an image folder meets the model's size: "
                            "crop (scale the shorter side to it, centre crop) or tile (every "
                            "non-overlapping tile, scaled up only if smaller)."),
    cycles: str = typer.Option("1,2,5,10", "--cycles", help="K of cycle_psnr@K: encode → decode "
                               "cycles of real images, comma-separated; cycle_db_lost is "
                               "PSNR@1 − PSNR@(largest K)."),
    real_images: int | None = typer.Option(
        None, "--real-images", help="At most N held-out images for the real-image cycles and "
        "latent compatibility (default: all; --fast: 16)."),
    labels: Path | None = typer.Option(None, "--labels",
                                       help="Integer labels (.npy), one per item of --data."),
    name: str = typer.Option("model", "--name", help="Name of MODEL in the report."),
    compare_name: str = typer.Option("tuned", "--compare-name",
                                     help="Name of the --compare model in the report."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (same seed, same "
                             "numbers)."),
    samples: int = typer.Option(1000, "--samples",
                                help="Prior samples for the data-free metrics (time vs "
                                "precision)."),
    eps: str | None = typer.Option(
        None, "--eps", help="PGD radii in data units, comma-separated. Default: 0.1,0.2 of the "
        "data range's width (0.1,0.2 for [0, 1] data)."),
    pgd_steps: int = typer.Option(20, "--pgd-steps", help="PGD steps (step size ε/8)."),
    drift_k: int = typer.Option(10, "--drift-k", help="K of drift@K."),
    rho: float = typer.Option(0.975, "--rho", help="ρ of the consistency KL."),
    n_train: int | None = typer.Option(
        None, "--n-train", help="The first N items train the linear probe (e.g. 8000)."),
    probe_train_fraction: float = typer.Option(
        0.8, "--probe-train-fraction",
        help="Share of items that train the probe when --n-train is not given (with labels)."),
    n_test: int | None = typer.Option(
        None, "--n-test", help="Measure on the last N items (default: all after the train "
        "split)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size of every pass."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    prior: str | None = typer.Option(None, "--prior", help="Prior by name (see info)."),
    adapter: str | None = AdapterOpt,
    compare_adapter: str | None = typer.Option(
        None, "--compare-adapter", help="Adapter for --compare (default: as --adapter)."),
    trust_remote_code: bool = TrustOpt,
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip the PNG figures."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    fast: bool = typer.Option(False, "--fast", help="Quick check: 256 samples, 5 PGD steps, "
                              "16 probe samples, 50 bootstrap resamples, 16 real images (where "
                              "left at the defaults)."),
    load: LoadOptions | None = None,
) -> None:
    """Measure self-consistency, robustness and usefulness of MODEL (and --compare).

    Prints the table on stdout and writes OUT/metrics.json, OUT/report.md and figures.
    """
    from ..evaluate import EvalConfig, evaluate, fast_config, render_table

    if labels is not None and data is None:
        raise SelfconsistError("--labels needs --data")
    cfg = EvalConfig(seed=seed, samples=samples, eps=parse_eps(eps), pgd_steps=pgd_steps,
                     drift_k=drift_k, rho=rho, n_train=n_train,
                     probe_train_fraction=probe_train_fraction, n_test=n_test,
                     batch_size=batch_size, device=device, prior=prior,
                     figures=not no_figures, fit=fit, cycles=parse_cycles(cycles),
                     real_images=real_images)
    if fast:
        cfg = fast_config(cfg)
    result = evaluate(model, compare, data=data, labels=labels, out=out, config=cfg, name=name,
                      compare_name=compare_name, overwrite=overwrite, progress=True,
                      adapter=adapter, compare_adapter=compare_adapter,
                      trust_remote_code=trust_remote_code,
                      load_options=(load or LoadOptions()).given())
    typer.echo(render_table(result.metrics))
    typer.echo(str(out / "report.md"))
