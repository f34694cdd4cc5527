"""Options and printing helpers shared by several commands (loading itself is
:mod:`selfconsist.loading`; this layer only parses arguments and prints)."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..adapters.options import option_label as flag
from ..adapters.options import parse_gradient_checkpointing
from ..loading import LoadOptions

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

# The loading options of tune, eval and info: LoadOptions field → (type, typer option). One
# table, so the three commands cannot drift apart; each flag is the one LoadOptions declares.
LOAD_OPTIONS: dict[str, tuple[Any, Any]] = {
    "image_size": (str | None, typer.Option(
        None, flag("image_size"), help="Image size N or HxW for convolutional-latent models "
        "(diffusers; default: recorded in a tuned file, else the config's, capped to 256).")),
    "revision": (str | None, typer.Option(
        None, flag("revision"), help="Hub branch, tag or commit, for a repo id.")),
    "variant": (str | None, typer.Option(
        None, flag("variant"), help="Weights variant of a diffusers folder, e.g. fp16.")),
    "model_type": (str | None, typer.Option(
        None, flag("model_type"), help="Latent statistics of a single file: sd, sdxl, sd3 or flux.")),
    "scaling_factor": (float | None, typer.Option(
        None, flag("scaling_factor"), help="Latent scaling factor (overrides config and guesses).")),
    "shift_factor": (float | None, typer.Option(
        None, flag("shift_factor"), help="Latent shift factor (overrides config and guesses).")),
    "config": (Path | None, typer.Option(
        None, flag("config"), help="A diffusers config.json for a single-file VAE.")),
    "tiling": (bool, typer.Option(
        False, flag("tiling"), help="Encode/decode large images in tiles (diffusers).")),
    # on/off rather than a --x/--no-x pair: the pair would take half of a 100-column help
    "gradient_checkpointing": (str | None, typer.Option(
        None, flag("gradient_checkpointing"), metavar="on|encoder|off",
        help="Recompute activations in the backward pass: on (encoder and decoder), encoder "
        "only, or off (default: on with CUDA; diffusers).")),
}
for _ann, _opt in LOAD_OPTIONS.values():
    _opt.rich_help_panel = "Loading"
AdapterOpt.rich_help_panel = TrustOpt.rich_help_panel = "Loading"


def with_load_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the :data:`LOAD_OPTIONS` flags to a command whose ``load`` parameter then receives
    them as one :class:`~selfconsist.loading.LoadOptions`."""
    sig = inspect.signature(func, eval_str=True)
    params = [p for name, p in sig.parameters.items() if name != "load"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
               for name, (ann, opt) in LOAD_OPTIONS.items()]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in LOAD_OPTIONS}
        given["gradient_checkpointing"] = parse_gradient_checkpointing(given["gradient_checkpointing"])
        kwargs["load"] = LoadOptions(**given)
        return func(*args, **kwargs)

    # typer reads the signature and the annotations; both describe the flags, not ``load``.
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typing.get_type_hints would otherwise read the original's
    return wrapper


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
