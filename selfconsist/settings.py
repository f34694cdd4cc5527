"""One declaration per setting: default, help text and help panel live on the config field.

A config dataclass (``TuneConfig``) declares each field with :func:`setting`. Its value is
``None`` until resolved ("not given"), so Python and the CLI agree on what the user set: the
CLI passes only the options typed on the command line, Python only the arguments written.
:func:`resolve` then fills every unset field in layers and records where each value came from:

    default   the field's declared default
    family    the model family's ``tune_defaults`` (chosen by evidence, see docs/)
    example   the bundled example's own settings (``selfconsist tune`` with no model)
    option    given by the caller (a CLI option or a Python argument)

The CLI builds its options from the same fields (:mod:`selfconsist.cli.options`), so a
setting's default and help are written once. A config used as given, without layers
(``TrainConfig``), declares its fields with :func:`option` instead: the field's default is the
real one, and the CLI passes only the options typed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .errors import SelfconsistError

T = TypeVar("T")

#: The order in which ``tune --help`` shows its panels.
PANELS = ("Loading", "Where z₀ comes from", "Objective", "Optimisation", "Run and output")


def setting(default: Any, help: str, panel: str, *, flag: str | None = None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """A config field that is ``None`` until resolved, with its real default in metadata.

    ``flag`` overrides the CLI flag (default ``--field-name``); ``choices`` are shown in the
    help and checked by the config itself.
    """
    if panel not in PANELS:
        raise ValueError(f"unknown panel {panel!r}")
    return field(default=None, metadata={"default": default, "help": help, "panel": panel,
                                         "flag": flag, "choices": choices, "metavar": metavar})


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           metavar: str | None = None) -> Any:
    """A config field with its real default (no layers to resolve), and the help text and flag
    the CLI builds its option from, as for :func:`setting` (no help panel)."""
    return field(default=default, metadata={"default": default, "help": help, "panel": None,
                                            "flag": flag, "choices": choices, "metavar": metavar})


def default_of(cls: type, name: str) -> Any:
    """The declared default of ``cls``'s setting ``name``."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata["default"]
    raise KeyError(name)


def defaults(cls: type) -> dict[str, Any]:
    """Every setting's declared default."""
    return {f.name: f.metadata["default"] for f in fields(cls) if "default" in f.metadata}


def given(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` that were set (not None)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) is not None}


@dataclass(frozen=True)
class Resolved:
    """A config with every setting filled, and where each value came from."""

    config: Any
    sources: Mapping[str, str]

    def rows(self) -> list[tuple[str, Any, str]]:
        """(name, value, source) for every setting, in declaration order."""
        return [(f.name, getattr(self.config, f.name), self.sources[f.name])
                for f in fields(self.config) if f.name in self.sources]


def resolve(cfg: T, *layers: tuple[str, Mapping[str, Any]]) -> Resolved:
    """Fill ``cfg``'s unset settings from ``layers`` (later layers win), then the defaults.

    ``layers`` are (source name, settings) pairs such as ``("family", vae.tune_defaults)``;
    a layer that names an unknown setting is a programming error and raises. What ``cfg``
    sets always wins.
    """
    names = {f.name for f in fields(cfg) if "default" in f.metadata}
    values = defaults(type(cfg))
    sources = dict.fromkeys(values, "default")
    for source, layer in layers:
        unknown = set(layer) - names
        if unknown:
            raise SelfconsistError(f"{source} settings name unknown settings: {sorted(unknown)}")
        for k, v in layer.items():
            values[k], sources[k] = v, source
    for k, v in given(cfg).items():
        values[k], sources[k] = v, "option"
    return Resolved(dataclasses.replace(cfg, **values), sources)
