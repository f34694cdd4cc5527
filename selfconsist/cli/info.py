"""``selfconsist info MODEL``: what selfconsist sees in a checkpoint."""

from __future__ import annotations

import json
import math
from typing import Any

import typer

from ..loading import LoadOptions, load_model
from ._app import app
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
    from ..tune import resolve_config

    # What a plain `selfconsist tune MODEL` (or selfconsist.tune(model)) would run, and why.
    info["tune_settings"] = {name: {"value": value, "source": source}
                             for name, value, source in resolve_config(vae).rows()}
    meta = getattr(vae, "metadata", {}) or {}
    for key in ("selfconsist.tune_config", "selfconsist.metrics", "selfconsist.input_sha256",
                "selfconsist.command", "selfconsist.version", "selfconsist.precision",
                "selfconsist.world_size", "selfconsist.train_precision"):
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
    vae = load_model(model, adapter, trust_remote_code, **(load or LoadOptions()).given())
    d = describe(vae)
    if as_json:
        echo_json(d)
        return
    typer.echo(render_info(str(model), d))


def readable(v: Any) -> str:
    """A value as a person reads it: short floats as written, long ones to 4 significant
    digits, ``v ± se`` for an estimate, lists
    as ``[a, b]``, small dicts as ``k: v, …``, no JSON quoting or escapes."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "–"}[v]
    if isinstance(v, float):
        short = repr(v)  # a config value such as 0.18215 stays exact; measurements get 4 digits
        return short if len(short.lstrip("-")) <= 8 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(readable(x) for x in v) + "]"
    if isinstance(v, dict):
        if set(v) == {"value", "stderr"}:
            se = v["stderr"]
            if isinstance(se, float) and math.isfinite(se) and se > 0:
                return f"{readable(v['value'])} ± {se:.2g}"
            return readable(v["value"])
        return ", ".join(f"{k}: {readable(x)}" for k, x in v.items())
    return str(v)


def render_info(title: str, d: dict[str, Any]) -> str:
    """The plain-text report of ``info``: one ``name  value`` line per field, the tune record
    (before → after per metric) under its own heading."""
    record_keys = ("tune_config", "metrics", "input_sha256", "command", "version", "precision",
                   "world_size", "tune_settings")
    head = {k: v for k, v in d.items() if k not in record_keys}
    width = max(len(k) for k in [*head, "input sha256"]) + 2
    lines = [title]
    for k, v in head.items():
        if k == "priors" and isinstance(v, dict):
            default = d.get("default_prior")
            v = "; ".join(f"{n}: {desc}" + (" (default)" if n == default else "")
                          for n, desc in v.items())
        elif k == "default_prior":
            continue
        lines.append(f"  {k.replace('_', ' '):<{width}}{readable(v)}")
    settings = d.get("tune_settings")
    if isinstance(settings, dict):
        lines += ["", "tune settings (what `selfconsist tune MODEL` runs; options override them)"]
        for source in ("family", "default"):
            names = [f"{k} {readable(v['value'])}" for k, v in settings.items() if v["source"] == source]
            if names:
                lines.append(f"  {source + ':':<{width}}" + ", ".join(names))
    if any(k in d for k in record_keys if k != "tune_settings"):
        lines += ["", "tune record"]
        for k, label in (("command", "command"), ("version", "selfconsist"),
                         ("input_sha256", "input sha256"), ("precision", "precision ran"),
                         ("world_size", "processes")):
            if k in d:
                lines.append(f"  {label:<{width}}{readable(d[k])}")
        cfg = d.get("tune_config")
        if isinstance(cfg, dict):
            lines.append(f"  {'config':<{width}}" + ", ".join(
                f"{k} {readable(v)}" for k, v in cfg.items()))
        metrics = d.get("metrics")
        if isinstance(metrics, dict) and {"before", "after"} <= set(metrics):
            before, after = metrics["before"], metrics["after"]
            lines.append("  before → after (data-free, prior samples)")
            mw = max(len(k) for k in before) + 2
            for k in before:
                if k in after:
                    lines.append(f"    {k:<{mw}}{readable(before[k])} → {readable(after[k])}")
    return "\n".join(lines)
