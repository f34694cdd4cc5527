"""Sizing the fixed costs of a run (the before/after measurement) to the run itself.

The before/after table of ``tune`` costs decoder and encoder passes that do not depend on the
number of steps: a round trip g → μ̂ on n prior samples (before and after), and the
decoder-response probe, n_p base samples times (G + 1) decodes for G probed groups (latent
elements, or whole channels of a spatial latent). On a big model and a short run these fixed
costs used to dominate (an SD-1.x VAE at 64² spent 16k decoder calls probing 256 elements for a
2-step run). :func:`plan_measurement` keeps them to a share of the run, in a deterministic cost
model (no timing), so the same command measures the same way on every machine.

Cost unit: one sample through a decoder-sized network, forward. The encoder is counted as the
same size as the decoder (true to within ~2× for the VAEs we support), backward as twice the
forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A tune step per sample: decode z₀ (1), encode x (1 forward + 2 backward), decode ẑ with the
# gradient flowing through it (1 + 2), encode x̃ (1 forward + 2 backward) → 10 units.
TUNE_STEP_UNITS = 10
ROUNDTRIP_UNITS = 2  # decode + encode per round-trip sample
FIXED_SHARE = 0.10  # fixed costs at most this share of the run's step cost …
FLOOR_UNITS = 128  # … but never below this, so a 2-step run still gets a (coarse) measurement
MIN_ROUNDTRIP = 16
MIN_PROBE = 8
MAX_PROBE = 64  # the probe's default sample count when the budget allows
MAX_ROUNDTRIP = 1024
ELEMENT_LIMIT = 512  # spatial latents above this many elements are never probed per element


@dataclass(frozen=True)
class MeasurementPlan:
    """How ``tune`` measures before and after: round-trip samples and the probe's shape."""

    roundtrip_samples: int
    probe_samples: int
    probe_mode: str  # "element" or "channel"
    cost_units: float  # the plan's cost, in decoder-sample passes (both before and after)
    run_units: float  # the run's step cost, same units

    def describe(self) -> str:
        share = self.cost_units / max(self.run_units, 1.0)
        return (f"round trip n={self.roundtrip_samples}, probe per {self.probe_mode} "
                f"n={self.probe_samples} ({self.cost_units:.0f} sample passes, "
                f"{100 * share:.0f}% of the run's steps)")


def probe_units(n: int, groups: int) -> int:
    """Cost of the decoder-response probe: n base decodes plus n·G perturbed ones = n(G + 1)."""
    return n * (groups + 1)


def plan_measurement(steps: int, batch_size: int, latent_shape: tuple[int, ...],
                     roundtrip_samples: int | None = None, *, share: float = FIXED_SHARE,
                     floor_units: int = FLOOR_UNITS) -> MeasurementPlan:
    """Pick round-trip and probe sample counts whose cost fits the budget.

    Budget B = max(share · R, floor) with R = steps · batch · TUNE_STEP_UNITS. The round trip
    (cost 2 · 2n, before and after) gets half of B, n ∈ [16, 1024], unless ``roundtrip_samples``
    is given (then it is honoured exactly). The probe gets the rest: per element (exact,
    G = d) with n_p ∈ [16, 64] when that fits and the latent is flat or has ≤ 512 elements,
    else per channel (G = C) for spatial latents, n_p ∈ [8, 64]; a flat latent too big for the
    budget keeps per-element probing at n_p = 8 (flat latents are small in practice).
    """
    d = math.prod(latent_shape)
    run = float(steps) * batch_size * TUNE_STEP_UNITS
    budget = max(share * run, float(floor_units))
    if roundtrip_samples is None:
        n_rt = int(budget / 2 / (2 * ROUNDTRIP_UNITS))
        n_rt = max(MIN_ROUNDTRIP, min(MAX_ROUNDTRIP, n_rt))
    else:
        n_rt = roundtrip_samples
    rest = max(budget - 2 * ROUNDTRIP_UNITS * n_rt, budget / 2)
    spatial = len(latent_shape) >= 2
    n_el = min(MAX_PROBE, int(rest // (d + 1)))
    if (not spatial or d <= ELEMENT_LIMIT) and n_el >= 2 * MIN_PROBE:
        mode, n_p, groups = "element", n_el, d
    elif spatial:
        c = latent_shape[0]
        mode, groups = "channel", c
        n_p = max(MIN_PROBE, min(MAX_PROBE, int(rest // (c + 1))))
    else:
        mode, n_p, groups = "element", MIN_PROBE, d
    cost = 2 * ROUNDTRIP_UNITS * n_rt + probe_units(n_p, groups)
    return MeasurementPlan(n_rt, n_p, mode, float(cost), run)
