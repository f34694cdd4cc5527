"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..adapters import VAEAdapter

AdapterOpt = typer.Option(
    None, "--adapter",
    help="Force an adapter: a registry name (e.g. builtin) or path/to/file.py:ClassName. "
    "Default: detect from the checkpoint.",
)
TrustOpt = typer.Option(
    False, "--trust-remote-code",
    help="Allow unpickling/executing code stored in the model files (pickled modules). "
    "Only for files you trust.",
)


def load_model(model: str, adapter: str | None, trust_remote_code: bool = False,
               **options: Any) -> VAEAdapter:
    """Load a checkpoint path through the registry (hub ids are resolved by selfconsist.hub)."""
    from .. import adapters, hub

    path = Path(model)
    from_hub = hub.is_repo_ref(model)
    if from_hub:
        path = hub.resolve_model(model, revision=options.get("revision"),
                                 trust_remote_code=trust_remote_code)
    opts = {k: v for k, v in options.items() if k != "revision"}
    vae = adapters.load(path, adapter=adapter, trust_remote_code=trust_remote_code, **opts)
    if from_hub:  # record repo id, commit and license for metadata and model cards
        hub.attach_source(vae, path)
    return vae


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
