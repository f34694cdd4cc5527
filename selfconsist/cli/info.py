"""``selfconsist info MODEL``: what selfconsist sees in a checkpoint."""

from __future__ import annotations

import json

import typer

from ..loading import LoadOptions, load_model
from . import app
from .common import AdapterOpt, TrustOpt, echo_json, with_load_options


def describe(vae) -> dict:
    enc, dec = vae.num_parameters()
    info = {
        "adapter": vae.name,
        **vae.describe(),
        "latent_shape": list(vae.latent_shape),
        "data_shape": list(vae.data_shape),
        "data_range": list(vae.data_range),
        "priors": {name: p.description for name, p in vae.priors().items()},
        "default_prior": next(iter(vae.priors())),
        "encoder_parameters": enc,
        "decoder_parameters": dec,
    }
    meta = getattr(vae, "metadata", {}) or {}
    for key in ("selfconsist.tune_config", "selfconsist.metrics", "selfconsist.input_sha256",
                "selfconsist.command", "selfconsist.version"):
        if key in meta:
            try:
                info[key.split(".", 1)[1]] = json.loads(meta[key])
            except json.JSONDecodeError:
                info[key.split(".", 1)[1]] = meta[key]
    return info


@app.command()
@with_load_options
def info(
    model: str = typer.Argument(..., help="Checkpoint: a .safetensors file, a model folder or a Hub repo id."),
    adapter: str | None = AdapterOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    load: LoadOptions | None = None,
) -> None:
    """Print the adapter, architecture, latent and data shapes, prior and parameter counts."""
    vae = load_model(model, adapter, trust_remote_code, **(load or LoadOptions()).adapter_options())
    d = describe(vae)
    if as_json:
        echo_json(d)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(model), show_header=False)
    for k, v in d.items():
        if isinstance(v, int) and k.endswith("parameters"):
            v = f"{v:,}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        table.add_row(k, str(v))
    Console().print(table)
