"""Load options: every knob a checkpoint can be loaded with, declared once, with its CLI flag.

One :class:`LoadOptions` travels from the command line (or ``selfconsist.load(path, **kw)``)
to the adapter's ``load``. Each adapter class names the fields it takes in its
``load_options``; the registry refuses any other that is set (see
:func:`selfconsist.adapters.check_options`), so ``--scaling-factor`` on a pythae model says
so instead of doing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import SelfconsistError

#: Options every adapter takes: what may be unpickled is decided for the whole load (the Hub
#: download included), whichever adapter reads the files.
COMMON = frozenset({"trust_remote_code"})


def _flag(name: str) -> dict[str, str]:
    return {"flag": name}


#: ``--gradient-checkpointing``'s words → :attr:`LoadOptions.gradient_checkpointing` (the
#: values the Python API takes: True or "all" for encoder and decoder, "encoder", False).
GRADIENT_CHECKPOINTING: dict[str, bool | str] = {
    "on": True, "all": "all", "encoder": "encoder", "off": False,
    "true": True, "yes": True, "1": True, "false": False, "no": False, "0": False,
}


def parse_gradient_checkpointing(word: str | None) -> bool | str | None:
    """The value of ``--gradient-checkpointing WORD`` (None: not given, the adapter's default)."""
    if word is None:
        return None
    try:
        return GRADIENT_CHECKPOINTING[word.lower()]
    except KeyError:
        raise SelfconsistError(f"--gradient-checkpointing must be on, encoder or off (all: the same "
                               f"as on), got {word!r}") from None


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint. Unset fields (None / False) leave the adapter's defaults.

    ``image_size`` is N or "HxW"; ``config`` a diffusers config.json for a single file;
    ``model_type`` one of sd, sdxl, sd3, flux (picks the latent statistics of a single file);
    ``revision`` a Hub branch, tag or commit (for a local diffusers folder: recorded only).
    Which adapter takes which is each adapter class's ``load_options``.
    """

    image_size: int | str | tuple[int, int] | list[int] | None = field(
        default=None, metadata=_flag("--image-size"))
    revision: str | None = field(default=None, metadata=_flag("--revision"))
    variant: str | None = field(default=None, metadata=_flag("--variant"))
    model_type: str | None = field(default=None, metadata=_flag("--model-type"))
    scaling_factor: float | None = field(default=None, metadata=_flag("--scaling-factor"))
    shift_factor: float | None = field(default=None, metadata=_flag("--shift-factor"))
    config: str | Path | dict[str, Any] | None = field(default=None, metadata=_flag("--config"))
    tiling: bool = field(default=False, metadata=_flag("--enable-tiling"))
    #: None: on when the model runs on CUDA; True / "all", "encoder", or False.
    gradient_checkpointing: bool | str | None = field(
        default=None, metadata=_flag("--gradient-checkpointing"))
    trust_remote_code: bool = field(default=False, metadata=_flag("--trust-remote-code"))
    # Python only (no CLI flag).
    slicing: bool = False
    obs_var: float | None = None
    norm_num_groups: int = 32  # GroupNorm groups of a single file (32 in every published VAE)
    repo_id: str | None = None  # recorded in ``source``
    data_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # e.g. --scaling-factor nan: refused before anything is read
        for name, value in asdict(self).items():
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise SelfconsistError(f"{option_label(name)} must be a finite number, got {value}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], base: LoadOptions | None = None) -> LoadOptions:
        """``base`` (or the defaults) with ``kwargs`` set; None values leave a field as it is.
        A name that is no load option is refused (a typo would otherwise do nothing)."""
        known = {f.name for f in fields(cls)}
        for name in kwargs:
            if name not in known:
                raise SelfconsistError(f"unknown load option {name!r}; the load options are: "
                                       f"{', '.join(sorted(known))}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None})

    def given(self) -> dict[str, Any]:
        """The fields set to something other than their default, by name (as keywords for
        :func:`selfconsist.load`, and what an adapter is checked against)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default}


def option_label(name: str) -> str:
    """How a message names an option: its CLI flag (``--enable-tiling``), else its keyword."""
    for f in fields(LoadOptions):
        if f.name == name:
            return f.metadata.get("flag", name)
    return name
