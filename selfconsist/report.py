"""What a change in a metric means, and the tables that show it: a verdict per metric, a short
summary, and report.md (:func:`render_report`, whose table :func:`render_table` is also the
Hub model card's).

A change from ``before`` (value a ± sₐ) to ``after`` (b ± s_b) counts when

    |b − a| > 2·√(sₐ² + s_b²)

(about 95% two-sided for independent, roughly normal estimates); a missing standard error
counts as 0. A counted change is *better* or *worse* by the metric's direction (lower or
higher is better, :data:`selfconsist.metricdefs.METRICS`); a metric without a direction
(a count that describes the model) is only *changed*. This is what ``report.md`` and
``tune``'s console table print beside every metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .metricdefs import direction, lookup

BETTER, WORSE, SAME, CHANGED = "better", "worse", "no significant change", "changed"
DIRECTION_TEXT = {"down": "lower is better", "up": "higher is better", "": ""}


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


# --- rendering ---------------------------------------------------------------------------------

def _fmt(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "–"
    text = f"{v:.4g}"
    if se is not None and math.isfinite(se) and se > 0:
        text += f" ± {se:.2g}"
    return text


def render_table(metrics: dict[str, Any], names: list[str] | None = None) -> str:
    """The metrics of metrics.json as a markdown table: one row per metric, one column per
    model, and (for two models) the change from the first to the second and its verdict
    (:func:`verdict`: better, worse or no significant change given the standard
    errors).

    ``metrics`` is the metrics.json dict (``{"models": {NAME: {metric: {"value", "stderr"}}}}``)
    or just its ``"models"`` part. Values read ``value ± stderr``; the last column says which
    way is better. This is the table of report.md and of the Hub model card.
    """
    models = metrics.get("models", metrics)
    names = list(models) if names is None else names
    keys: list[str] = []
    for n in names:
        keys += [k for k in models[n] if k not in keys]
    head = ["metric", *names]
    if len(names) == 2:
        head += ["change", "verdict"]
    head.append("better")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    arrows = {"up": "↑ higher", "down": "↓ lower", "": ""}
    marks = {"better": "**better**", "worse": "**worse**"}
    for k in keys:
        cells = [f"`{k}`"]
        vals = []
        for n in names:
            e = models[n].get(k)
            vals.append(None if e is None else e.get("value"))
            cells.append(_fmt(vals[-1], None if e is None else e.get("stderr")))
        if len(names) == 2:
            a, b = vals
            if a is None or b is None:
                cells += ["–", "–"]
            else:
                rel = f" ({(b - a) / abs(a) * 100:+.0f}%)" if abs(a) > 1e-12 else ""
                cells.append(f"{b - a:+.4g}{rel}")
                v = verdict(k, models[names[0]][k], models[names[1]][k]).verdict
                cells.append(marks.get(v, v))
        info = lookup(k)
        cells.append(arrows[info.direction] if info else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_report(metrics: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """report.md: the table, what each metric means, how errors were computed, the figures."""
    cfg = metrics.get("config", {})
    names = list(metrics["models"])
    lines = ["# selfconsist evaluation", ""]
    for n in names:
        src = cfg.get("sources", {}).get(n)
        lines.append(f"- **{n}**: `{src}`" if src else f"- **{n}**")
    data = metrics.get("data")
    if data:
        lines.append(f"- data: `{data['spec']}`, {data['n_test']} held-out items (the last of "
                     f"{data['n']})" + (f", probe trained on the first {data['n_train_probe']}"
                                        if data.get("n_train_probe") else ""))
        if data.get("probe_chance_acc") is not None:
            lines.append(f"- probe chance accuracy (majority class): "
                         f"{data['probe_chance_acc']:.3f}")
    else:
        lines.append("- data: none (data-free metrics only)")
    lines.append(f"- seed {cfg.get('seed')}, {cfg.get('samples')} prior samples, "
                 f"ε = {', '.join(f'{e:g}' for e in cfg.get('eps_used', []))} (data units), "
                 f"PGD {cfg.get('pgd_steps')} steps of ε/8, ρ = {cfg.get('rho')}")
    if any("cycle_psnr@" in k for r in metrics["models"].values() for k in r):
        n_img = (data or {}).get("n_test") if cfg.get("real_images") is None else min(
            cfg["real_images"], (data or {}).get("n_test") or cfg["real_images"])
        lines.append(f"- real-image cycles: {n_img} held-out images "
                     f"(image folders fitted by `{cfg.get('fit', 'crop')}`), K = "
                     f"{', '.join(str(k) for k in cfg.get('cycles', []))}; x_k = clip(g(μ(x_(k−1)))), "
                     "PSNR/SSIM per image, then averaged")
        lines.append("- pipeline cycles (`pipe_`): the same images, z ~ q(z|x) sampled and every "
                     "decoded image quantised to 8 bits, as diffusers pipelines and editing tools run")
        if cfg.get("bound_images"):
            lines.append(f"- idempotent bound (`bound_`): the first {cfg['bound_images']} images, first "
                         "encode by the encoder, every later one by exact decoder inversion "
                         "(50 Adam steps from μ(x)): the best an encoder-only fix could give")
    modes = cfg.get("responsive_mode", {})
    if "channel" in modes.values():
        lines.append("- decoder-responsive elements were probed per latent channel (the "
                     "latent is large): every element of a channel shares its verdict")
    if metrics.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"> {w}" for w in metrics["warnings"]]
    if len(names) == 2:
        a, b = (metrics["models"][n] for n in names)
        lines += ["", f"## Summary: {names[1]} against {names[0]}", "",
                  *[f"- {line}" for line in summary_lines(a, b)]]
    lines += ["", "## Metrics", "", render_table(metrics, names)]
    lines += ["Values are `value ± standard error`. ↑ higher / ↓ lower: which way is better; "
              "counts without an arrow describe the model rather than rank it. A change counts "
              "(better or worse) when |Δ| > 2·√(se₁² + se₂²); otherwise it is within the noise. "
              "A robustness number counts only "
              "beside reconstruction, active units and probe accuracy (a constant encoder is "
              "perfectly robust and useless).", "", "| metric | meaning | standard error |",
              "|---|---|---|"]
    keys: list[str] = []
    for n in names:
        keys += [k for k in metrics["models"][n] if k not in keys]
    for k in keys:
        info = lookup(k)
        meaning = (info.description if info else "").replace("|", "\\|")  # a bare | splits the cell
        lines.append(f"| `{k}` | {meaning} | {info.stderr if info else ''} |")
    if figures:
        lines += ["", "## Figures", ""]
        captions = {
            "roundtrip": "Model samples x = g(z₀), their re-encodings g(μ(x)), the difference "
                         "|x − g(μ(x))| and the per-image error",
            "drift": "Drift chains x₀, x₁ = g(μ(x₀)), …, x_K",
            "adversarial": "Clean and PGD-attacked inputs with their decodings, at every ε "
                           "(label and probe prediction above each input)",
            "metrics": "Each metric as the ratio of the second model to the first "
                       "(error bars: ±1 standard error; green better, red worse, grey within "
                       "the noise)",
            "cycles": "Real images through K encode → decode cycles: PSNR against the original",
        }
        for key, fname in figures.items():
            lines += [f"### {captions.get(key, key)}", "", f"![{key}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"
