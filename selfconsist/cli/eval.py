"""``selfconsist eval MODEL [--compare TUNED] [--data SPEC [--labels PATH]] --out DIR``."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from ..errors import SelfconsistError
from ..evaluate import FAST_PRESET, EvalConfig, evaluate
from ..loading import LoadOptions
from ..report import render_table
from ..runtime import DEVICES
from ._app import app
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


D = EvalConfig()  # the defaults, read (never retyped) for the help texts
F = FAST_PRESET
_EVAL_DEFAULTS = inspect.signature(evaluate).parameters


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
    fit: str | None = typer.Option(None, "--fit", help="How an image folder meets the model's "
                                   "size: crop (scale the shorter side to it, centre crop) or "
                                   "tile (every non-overlapping tile, scaled up only if "
                                   f"smaller). Default {D.fit}."),
    cycles: str | None = typer.Option(
        None, "--cycles", help="K of cycle_psnr@K: encode → decode cycles of real images, "
        "comma-separated; cycle_db_lost is PSNR@1 − PSNR@(largest K). Default "
        f"{','.join(map(str, D.cycles))}."),
    real_images: int | None = typer.Option(
        None, "--real-images", help="At most N held-out images for the real-image cycles and "
        f"latent compatibility (default: all; --fast: {F['real_images']})."),
    bound_images: int | None = typer.Option(
        None, "--bound-images", help="Real images for the idempotent bound (the first encode by "
        "the encoder, every later one by exact decoder inversion: the best an encoder-only fix "
        f"can give); 0 skips it. Default {D.bound_images}."),
    labels: Path | None = typer.Option(None, "--labels",
                                       help="Integer labels (.npy), one per item of --data."),
    name: str | None = typer.Option(
        None, "--name", help=f"Name of MODEL in the report (default {_EVAL_DEFAULTS['name'].default})."),
    compare_name: str | None = typer.Option(
        None, "--compare-name", help="Name of the --compare model in the report (default "
        f"{_EVAL_DEFAULTS['compare_name'].default})."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of every random draw (same seed, "
                                    f"same numbers; default {D.seed})."),
    samples: int | None = typer.Option(
        None, "--samples", help="Prior samples for the data-free metrics (time vs precision; "
        f"default {D.samples}, --fast {F['samples']})."),
    eps: str | None = typer.Option(
        None, "--eps", help="PGD radii in data units, comma-separated. Default: 0.1,0.2 of the "
        "data range's width (0.1,0.2 for [0, 1] data)."),
    pgd_steps: int | None = typer.Option(
        None, "--pgd-steps", help=f"PGD steps (step size ε/8; default {D.pgd_steps}, --fast "
        f"{F['pgd_steps']})."),
    drift_k: int | None = typer.Option(None, "--drift-k",
                                       help=f"K of drift@K (default {D.drift_k})."),
    rho: float | None = typer.Option(None, "--rho",
                                     help=f"ρ of the consistency KL (default {D.rho})."),
    n_train: int | None = typer.Option(
        None, "--n-train", help="The first N items train the linear probe (e.g. 8000)."),
    probe_train_fraction: float | None = typer.Option(
        None, "--probe-train-fraction",
        help="Share of items that train the probe when --n-train is not given (with labels; "
        f"default {D.probe_train_fraction})."),
    n_test: int | None = typer.Option(
        None, "--n-test", help="Measure on the last N items (default: all after the train "
        "split)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=f"Batch size of every pass (default {D.batch_size})."),
    device: str | None = typer.Option(None, "--device",
                                      help=f"{DEVICES} (default {D.device})."),
    prior: str | None = typer.Option(None, "--prior", help="Prior by name (see info)."),
    adapter: str | None = AdapterOpt,
    compare_adapter: str | None = typer.Option(
        None, "--compare-adapter", help="Adapter for --compare (default: as --adapter)."),
    trust_remote_code: bool = TrustOpt,
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip the PNG figures."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    fast: bool = typer.Option(
        False, "--fast", help=f"Quick check: {F['samples']} samples, {F['pgd_steps']} PGD steps, "
        f"{F['responsive_samples']} probe samples, {F['bootstrap']} bootstrap resamples, "
        f"{F['real_images']} real images (each where not given)."),
    load: LoadOptions | None = None,
) -> None:
    """Measure self-consistency, robustness and usefulness of MODEL (and --compare).

    Prints the table on stdout and writes OUT/metrics.json, OUT/report.md and figures.
    """
    if labels is not None and data is None:
        raise SelfconsistError("--labels needs --data")
    cfg = EvalConfig.resolve(
        fast, seed=seed, samples=samples, eps=parse_eps(eps), pgd_steps=pgd_steps,
        drift_k=drift_k, rho=rho, n_train=n_train, probe_train_fraction=probe_train_fraction,
        n_test=n_test, batch_size=batch_size, device=device, prior=prior,
        figures=False if no_figures else None, fit=fit,
        cycles=None if cycles is None else parse_cycles(cycles), real_images=real_images,
        bound_images=bound_images)
    names = {k: v for k, v in (("name", name), ("compare_name", compare_name)) if v is not None}
    result = evaluate(model, compare, data=data, labels=labels, out=out, config=cfg,
                      overwrite=overwrite, progress=True, adapter=adapter,
                      compare_adapter=compare_adapter, trust_remote_code=trust_remote_code,
                      load_options=(load or LoadOptions()).given(), **names)
    typer.echo(render_table(result.metrics))
    typer.echo(str(out / "report.md"))
