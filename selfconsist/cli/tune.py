"""``selfconsist tune [MODEL]``: post-hoc, data-free self-consistency tuning of the encoder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ..loading import LoadOptions, load_model
from ..tune import TuneConfig
from . import app
from .common import AdapterOpt, TrustOpt, with_load_options

D = TuneConfig()  # the CLI's defaults are the Python API's

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_mlp_vae.safetensors"
EXAMPLE_STEPS = 500  # keeps the offline demo well under a minute on a laptop CPU


def default_out(model: str) -> Path:
    """``model.safetensors`` → ``model.selfconsist.safetensors``; a folder ``m`` → ``m-selfconsist``.

    For a Hub reference ``owner/name:file.safetensors`` the file part names the output.
    """
    repo, _, sub = model.partition(":")
    p = Path((sub if Path(sub).suffix else repo).rstrip("/"))
    if p.suffix:
        return Path(p.stem + ".selfconsist" + p.suffix)
    return Path(p.name + "-selfconsist")


@app.command()
@with_load_options
def tune(
    model: str | None = typer.Argument(
        None, help="Checkpoint (.safetensors, a diffusers/pythae folder, or a Hub repo id). "
        "Omit to tune the bundled example."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Where to write the tuned model (default: MODEL.selfconsist.EXT here)."),
    adapter: str | None = AdapterOpt,
    trust_remote_code: bool = TrustOpt,
    rho: float = typer.Option(D.rho, "--rho", help="Coupling strength ρ in (0, 1)."),
    lambda_rec: float = typer.Option(D.lambda_rec, "--lambda-rec",
                                     help="Weight of log p(x|z) on model samples: 1 is the AVAE bound, "
                                     "0 is cheaper; the default 5 (a sharper likelihood for noise-free "
                                     "model samples) keeps round trips and robustness, see README."),
    steps: int | None = typer.Option(None, "--steps",
                                     help=f"Optimiser steps (default {D.steps}; {EXAMPLE_STEPS} for the "
                                     "bundled example)."),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Prior samples per step."),
    lr: float = typer.Option(D.lr, "--lr", help="Adam learning rate."),
    schedule: str = typer.Option(D.schedule, "--schedule", help="constant, cosine or linear (after warmup)."),
    warmup_steps: int = typer.Option(D.warmup_steps, "--warmup-steps", help="Linear learning-rate warmup steps."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed for prior samples and noise."),
    device: str = typer.Option(D.device, "--device", help="cpu, cuda or auto."),
    precision: str = typer.Option(D.precision, "--precision",
                                  help="fp32, bf16 autocast (CUDA or bf16 CPUs), or auto: bf16 where "
                                  "the hardware has bf16 units, else fp32 (OUT records which ran)."),
    obs_var: float | None = typer.Option(None, "--obs-var",
                                         help="Observation variance v of the likelihood (default: the model's)."),
    sample_noise: bool = typer.Option(False, "--sample-noise",
                                      help="Add N(0, v) observation noise to decoded prior samples."),
    prior: str | None = typer.Option(None, "--prior",
                                     help="Prior to sample, where the model offers several (see info)."),
    latents: Path | None = typer.Option(None, "--latents",
                                        help="Sample z₀ from this file (.npy/.pt/.safetensors, N × latent shape) "
                                        "instead of the prior."),
    save_every: int = typer.Option(D.save_every, "--save-every", help="Write a resumable state every N steps."),
    eval_samples: int | None = typer.Option(D.eval_samples, "--eval-samples",
                                            help="Prior samples for the before/after table "
                                            "(default: sized so the measurement costs ≤10% of the run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.state.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Then evaluate base vs tuned and push model, eval and card "
        "to this Hub repo (owner/name); see `selfconsist push --help`."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    load: LoadOptions | None = None,
) -> None:
    """Fine-tune only the encoder on the model's own samples; the decoder stays byte-identical."""
    from ..distributed import is_main_process, teardown
    from ..io import META_PREFIX
    from ..tune import tune as run

    if model is None:
        if not EXAMPLE.exists():
            from ..errors import SelfconsistError

            raise SelfconsistError(f"no MODEL given and the bundled example {EXAMPLE} is missing; "
                                   "pass a checkpoint path")
        model = str(EXAMPLE)
        steps = EXAMPLE_STEPS if steps is None else steps
    steps = D.steps if steps is None else steps
    out = out or default_out(model)
    if push_to_hub is not None:  # a bad repo id fails now, not after the tuning
        from ..hub import check_repo_id

        check_repo_id(push_to_hub, "--push-to-hub")
    cfg = TuneConfig(rho=rho, lambda_rec=lambda_rec, steps=steps, batch_size=batch_size, lr=lr,
                     schedule=schedule, warmup_steps=warmup_steps, seed=seed, device=device,
                     precision=precision, obs_var=obs_var, sample_noise=sample_noise, prior=prior,
                     latents=str(latents) if latents else None, save_every=save_every,
                     eval_samples=eval_samples)
    if out.exists() and not overwrite:  # fail before loading anything big
        from ..errors import SelfconsistError

        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    options = (load or LoadOptions()).adapter_options()
    vae = load_model(model, adapter, trust_remote_code, **options)
    args = [a for a in sys.argv[1:] if a != "--debug"]
    command = "selfconsist tune " + shlex.join(args[1:] if args[:1] == ["tune"] else args)
    try:
        result = run(vae, cfg, out, resume=resume, overwrite=overwrite, progress=not quiet,
                     metadata={META_PREFIX + "command": command})
    finally:
        teardown()  # leave a torchrun process group (a no-op in a single process)
    if not is_main_process():  # torchrun: rank 0 prints and pushes
        return
    _print_table(result.before, result.after)
    typer.echo(str(out))
    if push_to_hub is not None:
        from ..hub import push_after_tune

        pushed = push_after_tune(out, model, push_to_hub, private=private, command=command,
                                 load_options=options, adapter=adapter,
                                 trust_remote_code=trust_remote_code,
                                 eval_options={"device": device, "seed": seed, "prior": prior})
        typer.echo(pushed.pr_url or pushed.commit_url or f"https://huggingface.co/{push_to_hub}")


def _print_table(before: dict, after: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="self-consistency, before → after (data-free, prior samples)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key in before:
        b, a = before[key]["value"], after[key]["value"]
        change = f"{a - b:+.3f}" if key.startswith("latent_roundtrip_corr") else f"×{a / b:.3g}"
        table.add_row(key, f"{b:.4g} ± {before[key]['stderr']:.2g}",
                      f"{a:.4g} ± {after[key]['stderr']:.2g}", change)
    Console(stderr=True).print(table)
