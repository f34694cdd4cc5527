"""CLI options generated from a config dataclass's :func:`~selfconsist.settings.setting` fields.

Every option defaults to ``None`` ("not given"), so the library's resolution decides what a
missing option means and the help text shows the declared default once, from the field.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from ..settings import PANELS


def _base_type(annotation: Any) -> Any:
    """``float | None`` → ``float``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def _help(f: Any, family_note: Callable[[str], str]) -> str:
    meta = f.metadata
    text = meta["help"]
    if meta["choices"]:
        text += f" One of: {', '.join(meta['choices'])}."
    if meta["default"] is not None:
        text += f" (default: {meta['default']}{family_note(f.name)})"
    elif family_note(f.name):
        text += f" ({family_note(f.name).lstrip('; ')})"
    return text


def config_options(cls: type, family_note: Callable[[str], str] = lambda name: "") -> list[inspect.Parameter]:
    """One keyword parameter per setting of ``cls``, as typer reads them."""
    params = []
    hints = typing.get_type_hints(cls)  # the fields' annotations are strings (PEP 563)
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        base = _base_type(hints[f.name])
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if base is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        opt = typer.Option(None, flag, help=_help(f, family_note), rich_help_panel=f.metadata["panel"],
                           show_default=False, metavar=f.metadata["metavar"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=base | None))
    return params


def _by_panel(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters in the order of :data:`~selfconsist.settings.PANELS` (typer draws a panel
    where its first option appears); arguments and unpanelled options first."""
    def rank(p: inspect.Parameter) -> int:
        panel = getattr(p.default, "rich_help_panel", None)
        return PANELS.index(panel) + 1 if panel in PANELS else 0

    # typer passes everything by keyword, so the kinds can all be keyword-only
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sorted(params, key=rank)]


def with_config_options(cls: type, into: str, family_note: Callable[[str], str] = lambda name: "") -> Callable:
    """Add ``cls``'s settings as options to a command, whose parameter ``into`` then receives
    them as one ``cls`` instance (only the options given are set)."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func, eval_str=True)
        extra = config_options(cls, family_note)
        names = [p.name for p in extra]
        params = _by_panel([p for name, p in sig.parameters.items() if name != into] + extra)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in names}
            # None is "not given": the config's own default (or its resolution) decides
            kwargs[into] = cls(**{k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()
                                  if v is not None})
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typing.get_type_hints would otherwise read the original's
        return wrapper

    return decorate
