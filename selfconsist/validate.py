"""Input validation shared by the config dataclasses and the CLI: numbers must be finite."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import SelfconsistError


def require_finite(config: Any) -> None:
    """Refuse a NaN or ±Inf in any float field (or tuple of floats) of a dataclass ``config``.

    Range checks such as ``lr <= 0`` are silently true or false for NaN, so a NaN would get
    past them and fail much later (an optimiser traceback, or a NaN loss after a long run).
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise SelfconsistError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")

