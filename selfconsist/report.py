"""What a change in a metric means: its better direction, a verdict, and a short summary.

A change from ``before`` (value a ± sₐ) to ``after`` (b ± s_b) counts when

    |b − a| > 2·√(sₐ² + s_b²)

(about 95% two-sided for independent, roughly normal estimates); a missing standard error
counts as 0. A counted change is *better* or *worse* by the metric's direction (lower or
higher is better, :data:`selfconsist.evaluate.METRIC_INFO`); a metric without a direction
(a count that describes the model) is only *changed*. This is what ``report.md`` and
``tune``'s console table print beside every metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BETTER, WORSE, SAME, CHANGED = "better", "worse", "no significant change", "changed"
DIRECTION_TEXT = {"down": "lower is better", "up": "higher is better", "": ""}


def direction(key: str) -> str:
    """``"down"`` (lower is better), ``"up"`` (higher is better) or ``""`` for ``key``."""
    from .evaluate import METRIC_INFO, _lookup

    info = _lookup(METRIC_INFO, key)
    return info[1] if info else ""


def _se(e: Mapping[str, Any]) -> float:
    se = e.get("stderr")
    return float(se) if se is not None and math.isfinite(float(se)) else 0.0


@dataclass
class Verdict:
    """The change of one metric from ``before`` to ``after``."""

    key: str
    before: float
    after: float
    threshold: float  # 2·√(sₐ² + s_b²)
    direction: str  # "up", "down" or ""
    verdict: str  # better, worse, no significant change, changed

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def significant(self) -> bool:
        return self.verdict != SAME

    def change_text(self) -> str:
        """``−30%`` (relative) or ``+0.0017`` (absolute, when the base is ~0 or a correlation/
        accuracy whose scale is already [0, 1])."""
        absolute = (self.key.startswith(("latent_roundtrip_corr", "probe_acc"))
                    or abs(self.before) < 1e-12)
        if absolute:
            return f"{self.delta:+.3g}"
        return f"{self.delta / abs(self.before) * 100:+.0f}%"


def verdict(key: str, before: Mapping[str, Any], after: Mapping[str, Any],
            way: str | None = None) -> Verdict:
    """The verdict for one metric (``{"value", "stderr"}`` dicts); ``way`` overrides the
    metric's direction (``"up"``, ``"down"`` or ``""``)."""
    a, b = float(before["value"]), float(after["value"])
    way = direction(key) if way is None else way
    threshold = 2.0 * math.sqrt(_se(before) ** 2 + _se(after) ** 2)
    delta = b - a
    if not (math.isfinite(a) and math.isfinite(b)):
        v = SAME if a == b else CHANGED
    elif abs(delta) <= threshold:
        v = SAME
    elif not way:
        v = CHANGED
    else:
        v = BETTER if (delta < 0) == (way == "down") else WORSE
    return Verdict(key, a, b, threshold, way, v)


def verdicts(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
             ) -> list[Verdict]:
    """Verdicts for every metric present in both (in ``before``'s order)."""
    return [verdict(k, before[k], after[k]) for k in before
            if k in after and before[k].get("value") is not None
            and after[k].get("value") is not None]


def _listing(vs: list[Verdict], limit: int = 5) -> str:
    # Largest relative changes first: what a reader should see before the rest.
    def size(v: Verdict) -> float:
        return abs(v.delta) / max(abs(v.before), 1e-12)

    vs = sorted(vs, key=size, reverse=True)
    text = ", ".join(f"{v.key} {v.change_text()}" for v in vs[:limit])
    return text + (f" and {len(vs) - limit} more" if len(vs) > limit else "")


def responsive_kept(before: Mapping[str, Mapping[str, Any]],
                    after: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One sentence on whether the decoder-responsive latent elements were kept: from
    ``responsive_active`` (with data) or else the round-trip correlation on them."""
    n = (after.get("responsive_elements") or {}).get("value")
    if "responsive_active" in before and "responsive_active" in after:
        a, b = before["responsive_active"]["value"], after["responsive_active"]["value"]
        total = f" of {n:g}" if n is not None else ""
        if b >= a:
            return (f"Decoder-responsive elements kept: {b:g}{total} active after "
                    f"({a:g} before).")
        return f"Decoder-responsive elements LOST: {b:g}{total} active after ({a:g} before)."
    key = "latent_roundtrip_corr_responsive"
    if key in before and key in after:
        v = verdict(key, before[key], after[key])
        state = "LOST (their round-trip correlation fell)" if v.verdict == WORSE else "kept"
        return (f"Decoder-responsive elements {state}: round-trip correlation on them "
                f"{v.before:.3f} → {v.after:.3f}.")
    return None


def summary_lines(before: Mapping[str, Mapping[str, Any]],
                  after: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Three or four lines: what improved, what got worse, what did not change
    significantly, and whether the decoder-responsive elements were kept."""
    vs = verdicts(before, after)
    better = [v for v in vs if v.verdict == BETTER]
    worse = [v for v in vs if v.verdict == WORSE]
    same = [v for v in vs if v.verdict == SAME]
    lines = [f"Improved ({len(better)}): {_listing(better)}." if better
             else "Improved: nothing, beyond the standard errors.",
             f"Got worse ({len(worse)}): {_listing(worse)}." if worse
             else "Got worse: nothing, beyond the standard errors."]
    if same:
        lines.append(f"No significant change ({len(same)}): "
                     + ", ".join(v.key for v in same) + ".")
    kept = responsive_kept(before, after)
    if kept:
        lines.append(kept)
    return lines
