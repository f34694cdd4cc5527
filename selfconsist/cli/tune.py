"""``selfconsist tune [MODEL]``: post-hoc, data-free self-consistency tuning of the encoder."""

from __future__ import annotations

from pathlib import Path

import typer

from ..loading import LoadOptions, load_model
from ..settings import Resolved
from ..tune import TuneConfig, resolve_config
from ._app import app, command_line
from .common import AdapterOpt, TrustOpt, with_load_options
from .options import with_config_options

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_mlp_vae.safetensors"
_RUN, _LOAD = "Run and output", "Loading"


def _family(key: str) -> str:
    """Help text naming the families, and the bundled example, whose defaults differ from the
    generic one (the layers of :func:`selfconsist.tune.resolve_config`)."""
    from ..adapters import available_adapters, get_adapter_class
    from ..tune import EXAMPLE_SETTINGS

    notes = []
    for name in available_adapters():
        cls = get_adapter_class(name)
        for attr, when in (("tune_defaults", ""), ("tune_defaults_images", " with --images")):
            if key in getattr(cls, attr, {}):
                notes.append(f"{cls.name}{when}: {getattr(cls, attr)[key]}")
    if key in EXAMPLE_SETTINGS:
        notes.append(f"the bundled example (no MODEL): {EXAMPLE_SETTINGS[key]}")
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


def print_settings(settings: Resolved) -> None:
    """Every resolved setting and where it came from, on stdout (``--print-config``, ``info``)."""
    rows = settings.rows()
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        typer.echo(f"{name:<{width}}  {value!s:<12}  ({source})")


@app.command()
@with_load_options
@with_config_options(TuneConfig, "cfg", _family)
def tune(
    model: str | None = typer.Argument(
        None, help="Checkpoint (.safetensors, a diffusers/pythae folder, or a Hub repo id). "
        "Omit to tune the bundled example."),
    out: Path | None = typer.Option(None, "--out", "-o", rich_help_panel=_RUN,
                                    help="Where to write the tuned model (default: MODEL.selfconsist.EXT here)."),
    adapter: str | None = AdapterOpt,
    trust_remote_code: bool = TrustOpt,
    resume: bool = typer.Option(False, "--resume", rich_help_panel=_RUN,
                                help="Continue an interrupted run from OUT.state.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=_RUN, help="Replace an existing OUT."),
    print_config: bool = typer.Option(False, "--print-config", rich_help_panel=_RUN,
                                      help="Print the resolved settings and where each came from; do not run."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", rich_help_panel=_RUN, help="Then evaluate base vs tuned and push "
        "model, eval and card to this Hub repo (owner/name); see `selfconsist push --help`."),
    private: bool = typer.Option(False, "--private", rich_help_panel=_RUN,
                                 help="With --push-to-hub: create the repo private."),
    cfg: TuneConfig | None = None,
    load: LoadOptions | None = None,
) -> None:
    """Fine-tune only the encoder on the model's own samples; the decoder stays byte-identical."""
    from ..distributed import is_main_process, teardown
    from ..errors import SelfconsistError
    from ..io import META_PREFIX
    from ..tune import tune as run

    example = model is None
    if example:
        if not EXAMPLE.exists():
            raise SelfconsistError(f"no MODEL given and the bundled example {EXAMPLE} is missing; "
                                   "pass a checkpoint path")
        model = str(EXAMPLE)
    out = out or default_out(model)
    if push_to_hub is not None:  # a bad repo id fails now, not after the tuning
        from ..hub import check_repo_id

        check_repo_id(push_to_hub, "--push-to-hub")
    if out.exists() and not overwrite and not print_config:  # fail before loading anything big
        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    options = (load or LoadOptions()).given()
    vae = load_model(model, adapter, trust_remote_code, **options)
    if print_config:
        print_settings(resolve_config(vae, cfg, example=example))
        return
    command = command_line()
    try:
        result = run(vae, cfg, out, resume=resume, overwrite=overwrite, progress=True,
                     metadata={META_PREFIX + "command": command}, example=example, advise=False)
    except BaseException:
        teardown()  # leave a torchrun process group (a no-op in a single process)
        raise
    teardown(wait_for_peers=True)
    if not is_main_process():  # torchrun: rank 0 prints and pushes
        return
    _print_table(result.before, result.after, result.latent_shift, result.advice)
    typer.echo(str(out))
    if push_to_hub is not None:
        from ..hub import push_after_tune

        c = result.settings.config
        pushed = push_after_tune(out, model, push_to_hub, private=private, command=command,
                                 load_options=options, adapter=adapter,
                                 trust_remote_code=trust_remote_code,
                                 eval_options={"device": c.device, "seed": c.seed, "prior": c.prior})
        typer.echo(pushed.pr_url or pushed.commit_url or f"https://huggingface.co/{push_to_hub}")


# The table's order: the headline figures first (the correlation over all elements includes
# elements the decoder ignores, so it comes last and says so).
TABLE_ORDER = ("sample_roundtrip_mse", "latent_roundtrip_corr_responsive", "consistency_kl",
               "latent_roundtrip_corr")


def _print_table(before: dict, after: dict, shift: dict | None = None, advice: str | None = None) -> None:
    """The before/after figures on stderr, fitting 80 columns: a summary (what improved, what
    got worse, the decoder-responsive elements), then two lines per metric (name and better
    direction; before → after, change, verdict); last, the advice line of a run whose round
    trip did not clearly improve."""
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
    if advice:
        console.print(Text(advice, style="yellow"))
