"""``selfconsist train``: train a built-in VAE from scratch (VAE or AVAE objective)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..train import TrainConfig
from ._app import app
from .options import with_config_options


@app.command()
@with_config_options(TrainConfig, "cfg")
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .safetensors checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.state.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    cfg: TrainConfig | None = None,
) -> None:
    """Train a built-in VAE from scratch and write one .safetensors with its config in the header."""
    from ..train import train as run

    assert cfg is not None  # filled by with_config_options from the options given
    run(cfg, out, resume=resume, overwrite=overwrite, progress=True)
    typer.echo(str(out))
