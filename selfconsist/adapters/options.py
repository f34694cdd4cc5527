"""Load options: the knobs a checkpoint is loaded with, declared once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class LoadOptions:
    """Options of :meth:`DiffusersVAE.load` (see its module docstring)."""

    image_size: int | str | tuple[int, int] | list[int] | None = None
    obs_var: float | None = None
    variant: str | None = None
    gradient_checkpointing: bool | str | None = None
    tiling: bool = False
    slicing: bool = False
    model_type: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    config: str | Path | dict[str, Any] | None = None
    norm_num_groups: int = 32
    repo_id: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> LoadOptions:
        # Options meant for other adapters or commands are ignored, not refused.
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})
