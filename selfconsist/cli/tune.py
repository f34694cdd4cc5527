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
# The demo: 1500 steps (~10 s on a laptop CPU) with observation noise on the model samples.
# Without the noise, on this small digits VAE, every robustness figure got worse (500 steps:
# adv_shift@0.1 +18%, probe_acc_ce@0.1 0.26 → 0.18; 1500 steps: +15%, −0.10); with it and
# 1500 steps they improve, for seeds 0, 1 and 2 (README, "The main job on the bundled example").
EXAMPLE_STEPS = 1500
EXAMPLE_SAMPLE_NOISE = True


def _family(key: str) -> str:
    """Help text naming the families whose defaults differ from the generic one."""
    from ..adapters import available_adapters, get_adapter_class

    classes = [get_adapter_class(name) for name in available_adapters()]
    notes = [f"{cls.name} models: {cls.tune_defaults[key]}" for cls in classes
             if key in getattr(cls, "tune_defaults", {})]
    return f"; {', '.join(notes)}" if notes else ""


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
    rho: float | None = typer.Option(None, "--rho", help="Coupling strength ρ in (0, 1) "
                                     f"(default {D.rho}{_family('rho')})."),
    lambda_rec: float | None = typer.Option(
        None, "--lambda-rec", help="Weight of log p(x|z) on model samples: 1 is the AVAE bound, 0 is "
        f"cheaper (default {D.lambda_rec}{_family('lambda_rec')}: a sharper likelihood for "
        "noise-free model samples keeps round trips and robustness, see README)."),
    steps: int | None = typer.Option(None, "--steps",
                                     help=f"Optimiser steps (default {D.steps}{_family('steps')}; "
                                     f"{EXAMPLE_STEPS} for the bundled example)."),
    batch_size: int | None = typer.Option(None, "--batch-size",
                                          help=f"Samples per step (default {D.batch_size}{_family('batch_size')})."),
    lr: float | None = typer.Option(None, "--lr", help=f"Adam learning rate (default {D.lr}{_family('lr')})."),
    schedule: str = typer.Option(D.schedule, "--schedule", help="constant, cosine or linear (after warmup)."),
    warmup_steps: int = typer.Option(D.warmup_steps, "--warmup-steps", help="Linear learning-rate warmup steps."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed for prior samples and noise."),
    device: str = typer.Option(D.device, "--device", help="cpu, cuda or auto."),
    precision: str = typer.Option(D.precision, "--precision",
                                  help="fp32, bf16 autocast (CUDA or bf16 CPUs), or auto: bf16 where "
                                  "the hardware has bf16 units, else fp32 (OUT records which ran)."),
    obs_var: float | None = typer.Option(None, "--obs-var",
                                         help="Observation variance v of the likelihood (default: the model's)."),
    sample_noise: bool | None = typer.Option(
        None, "--sample-noise/--no-sample-noise",
        help="Add N(0, v) observation noise to decoded prior samples (default: off; on for the "
        "bundled example)."),
    prior: str | None = typer.Option(None, "--prior",
                                     help="Prior to sample, where the model offers several (see info)."),
    latents: Path | None = typer.Option(None, "--latents",
                                        help="Sample z₀ from this file (.npy/.pt/.safetensors, N × latent shape) "
                                        "instead of the prior."),
    images: Path | None = typer.Option(
        None, "--images", help="Draw z₀ from the base encoder's posteriors of this folder of "
        "images (PNG/JPEG, any size; your own generations will do), encoded once. With --anchor "
        "the anchor is taken on these images."),
    fit: str = typer.Option(D.fit, "--fit", help="How --images of another size fit the model: crop "
                            "(shorter side resized, centre crop) or tile."),
    prior_refine: int | None = typer.Option(
        None, "--prior-refine", help="Refine each prior draw by z ← μ_base(g(z)) this many times "
        f"(data-free; default {D.prior_refine}{_family('prior_refine')})."),
    anchor: float | None = typer.Option(
        None, "--anchor", help="Weight of KL(q_tuned(z|x) ‖ q_base(z|x)), which keeps the latents "
        f"where they were (default {D.anchor}{_family('anchor')}; see README)."),
    save_every: int = typer.Option(D.save_every, "--save-every", help="Write a resumable state every N steps."),
    eval_samples: int | None = typer.Option(D.eval_samples, "--eval-samples",
                                            help="Prior samples for the before/after table "
                                            "(default: sized so the measurement costs ≤10% of the run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.state.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
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
        sample_noise = EXAMPLE_SAMPLE_NOISE if sample_noise is None else sample_noise
    sample_noise = D.sample_noise if sample_noise is None else sample_noise
    out = out or default_out(model)
    if push_to_hub is not None:  # a bad repo id fails now, not after the tuning
        from ..hub import check_repo_id

        check_repo_id(push_to_hub, "--push-to-hub")
    settings = dict(rho=rho, lambda_rec=lambda_rec, steps=steps, batch_size=batch_size, lr=lr,
                    schedule=schedule, warmup_steps=warmup_steps, seed=seed, device=device,
                    precision=precision, obs_var=obs_var, sample_noise=sample_noise, prior=prior,
                    latents=str(latents) if latents else None, images=str(images) if images else None,
                    fit=fit, prior_refine=prior_refine, anchor=anchor, save_every=save_every,
                    eval_samples=eval_samples)
    TuneConfig.for_model(None, **settings)  # a bad option fails now, before loading anything big
    if out.exists() and not overwrite:  # fail before loading anything big
        from ..errors import SelfconsistError

        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    options = (load or LoadOptions()).given()
    vae = load_model(model, adapter, trust_remote_code, **options)
    cfg = TuneConfig.for_model(vae, **settings)  # the model family's defaults, then the options
    args = [a for a in sys.argv[1:] if a != "--debug"]
    command = "selfconsist tune " + shlex.join(args[1:] if args[:1] == ["tune"] else args)
    try:
        result = run(vae, cfg, out, resume=resume, overwrite=overwrite, progress=True,
                     metadata={META_PREFIX + "command": command})
    finally:
        teardown()  # leave a torchrun process group (a no-op in a single process)
    if not is_main_process():  # torchrun: rank 0 prints and pushes
        return
    _print_table(result.before, result.after, result.latent_shift)
    typer.echo(str(out))
    if push_to_hub is not None:
        from ..hub import push_after_tune

        pushed = push_after_tune(out, model, push_to_hub, private=private, command=command,
                                 load_options=options, adapter=adapter,
                                 trust_remote_code=trust_remote_code,
                                 eval_options={"device": device, "seed": seed, "prior": prior})
        typer.echo(pushed.pr_url or pushed.commit_url or f"https://huggingface.co/{push_to_hub}")


# The table's order: the headline figures first (the correlation over all elements includes
# elements the decoder ignores, so it comes last and says so).
TABLE_ORDER = ("sample_roundtrip_mse", "latent_roundtrip_corr_responsive", "consistency_kl",
               "latent_roundtrip_corr")


def _print_table(before: dict, after: dict, shift: dict | None = None) -> None:
    """The before/after figures on stderr, fitting 80 columns: a summary (what improved, what
    got worse, the decoder-responsive elements), then two lines per metric (name and better
    direction; before → after, change, verdict)."""
    from rich.console import Console
    from rich.text import Text

    from ..report import DIRECTION_TEXT, summary_lines, verdict

    console = Console(stderr=True, soft_wrap=True, highlight=False)
    colour = {"better": "green", "worse": "red"}
    console.print(Text("self-consistency, before → after (data-free, prior samples)",
                       style="bold"))
    for line in summary_lines(before, after):
        console.print(Text(f"  {line}"))
    keys = [k for k in TABLE_ORDER if k in before] + [k for k in before if k not in TABLE_ORDER]
    for key in keys:
        if key not in after:
            continue
        v = verdict(key, before[key], after[key])
        way = DIRECTION_TEXT[v.direction]
        line = Text(f"  {key}" + (f" ({way})" if way else ""), style="bold")
        console.print(line)
        row = Text(f"      {v.before:.4g} ± {before[key]['stderr']:.2g} → "
                   f"{v.after:.4g} ± {after[key]['stderr']:.2g}   {v.change_text()}   ")
        row.append(v.verdict, style=colour.get(v.verdict, ""))
        console.print(row)
    console.print(Text("  (a change counts when |Δ| > 2·√(se_before² + se_after²))"))
    if shift is not None:
        console.print(Text(f"  latent shift on {shift['on']} (lower is better)", style="bold"))
        console.print(Text(f"      {shift['value']:.3f} ± {shift['stderr']:.2g} of the base "
                           "latents' standard deviation"))
    console.print(Text("  Real images: selfconsist eval MODEL --compare OUT --data IMAGES"))
