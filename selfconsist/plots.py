"""Figures of ``selfconsist eval`` (PNG, matplotlib's Agg renderer, imported lazily).

Without matplotlib the figures are skipped with a logged warning; evaluation never
fails for want of them. Only :class:`matplotlib.figure.Figure` is used, never pyplot, so
nothing touches a global backend or opens a window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .report import verdict
from .runtime import log

FIGURES = ("roundtrip", "drift", "adversarial", "metrics", "cycles")


def _matplotlib() -> Any | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("warning: matplotlib is not installed; skipping the figures "
                    "(pip install 'selfconsist[plots]')")
        return None
    return Figure


def to_image(x: Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """One item → an array imshow can show, in [0, 1]: (H, W) grey or (H, W, 3) colour.

    Values map from the model's range by (x − lo)/(hi − lo); an unbounded range is rescaled
    from the item's own min and max, for display only. (C, H, W) with C = 1 is grey, C = 3
    colour, C ≥ 4 shows the first three channels, C = 2 their mean; a flat item is drawn as a
    one-row strip.
    """
    lo, hi = data_range
    a = x.detach().float().cpu().numpy()
    if math.isfinite(hi - lo):
        a = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    else:
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    if a.ndim == 3:
        c = a.shape[0]
        if c == 1:
            return a[0]
        if c >= 3:
            return np.transpose(a[:3], (1, 2, 0))
        return a.mean(0)
    if a.ndim == 2:
        return a
    return a.reshape(1, -1)


def _grid(Figure: Any, rows: list[tuple], path: Path, title: str,
          col_titles: list[str] | None = None) -> None:
    """A grid of images: one row per ``(label, images[, captions[, style]])``; ``captions``
    (one string per image) go under the images, ``style`` may set ``cmap`` and ``vmax`` (a
    heat map, e.g. a difference)."""
    n_rows = len(rows)
    n_cols = max(len(r[1]) for r in rows)
    captioned = any(len(r) > 2 and r[2] for r in rows)
    row_h = 1.35 if captioned else 1.15
    width, height = 1.1 * n_cols + 1.6, row_h * n_rows + 0.8
    fig = Figure(figsize=(width, height), dpi=100)
    fig.suptitle(title, fontsize=9)
    for i, row in enumerate(rows):
        label, images = row[0], row[1]
        captions = row[2] if len(row) > 2 and row[2] else []
        style = row[3] if len(row) > 3 else {}
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                img = images[j]
                cmap = style.get("cmap") or ("gray" if img.ndim == 2 else None)
                ax.imshow(img, cmap=cmap, vmin=0.0, vmax=style.get("vmax", 1.0),
                          interpolation="nearest", aspect="auto" if img.shape[0] == 1 else "equal")
                if j < len(captions):
                    ax.set_xlabel(captions[j], fontsize=6, labelpad=1)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
    fig.subplots_adjust(left=1.5 / width, right=1 - 0.1 / width, bottom=0.25 / height,
                        top=1 - 0.6 / height, wspace=0.05, hspace=0.45 if captioned else 0.1)
    fig.savefig(path)


def _diff_map(x: Tensor, y: Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """|x − y| as one grey-level map (mean over channels), in units of the data range."""
    lo, hi = data_range
    span = (hi - lo) if math.isfinite(hi - lo) else 1.0
    d = (x.detach().float().cpu() - y.detach().float().cpu()).abs().numpy() / span
    if d.ndim == 3:
        return d.mean(0)
    return d if d.ndim == 2 else d.reshape(1, -1)


def roundtrip_figure(Figure: Any, artifacts: dict[str, dict[str, Any]], path: Path) -> bool:
    """Model samples x = g(z₀) (once when every model draws the same ones: same decoder, same
    z₀), then per model the re-encodings g(μ(x)) with their error ‖x − g(μ(x))‖²/D and a
    difference map |x − g(μ(x))| on one colour scale for all models."""
    chains = {n: a["sample_chains"] for n, a in artifacts.items()
              if a.get("sample_chains") is not None and a["sample_chains"].numel()}
    if not chains:
        return False
    first = next(iter(chains.values()))
    same = all(c.shape == first.shape and bool((c[:, 0] == first[:, 0]).all())
               for c in chains.values())
    diffs = {n: [_diff_map(c[k, 0], c[k, 1], artifacts[n]["data_range"])
                 for k in range(c.shape[0])] for n, c in chains.items()}
    vmax = max(float(max(d.max() for d in ds)) for ds in diffs.values()) or 1e-6
    rows: list[tuple] = []
    if same:
        rng = next(iter(artifacts.values()))["data_range"]
        rows.append(("x = g(z₀)", [to_image(c, rng) for c in first[:, 0]]))
    for name, ch in chains.items():
        rng = artifacts[name]["data_range"]
        if not same:
            rows.append((f"{name}\nx = g(z₀)", [to_image(c, rng) for c in ch[:, 0]]))
        err = (ch[:, 0] - ch[:, 1]).float().pow(2).reshape(ch.shape[0], -1).mean(1)
        rows.append((f"{name}\ng(μ(x))", [to_image(c, rng) for c in ch[:, 1]],
                     [f"MSE {float(e):.2g}" for e in err]))
        rows.append((f"{name}\n|x − g(μ(x))|", diffs[name], None,
                     {"cmap": "magma", "vmax": vmax}))
    _grid(Figure, rows, path, "Model samples and their re-encodings (difference maps: black 0, "
          f"white {vmax:.2g} of the data range)")
    return True


def drift_figure(Figure: Any, artifacts: dict[str, dict[str, Any]], path: Path,
                 n_inputs: int = 3) -> bool:
    rows, k = [], 0
    source = "held-out inputs"
    for name, art in artifacts.items():
        ch = art.get("data_chains")
        if ch is None or ch.numel() == 0:
            ch, source = art.get("sample_chains"), "model samples"
        if ch is None or ch.numel() == 0:
            continue
        rng = art["data_range"]
        k = ch.shape[1] - 1
        for i in range(min(n_inputs, ch.shape[0])):
            rows.append((f"{name} #{i}", [to_image(c, rng) for c in ch[i]]))
    if not rows:
        return False
    _grid(Figure, rows, path, f"Drift chains from {source}: x_(k+1) = g(μ(x_k))",
          [f"x{j}" for j in range(k + 1)])
    return True


def adversarial_figure(Figure: Any, artifacts: dict[str, dict[str, Any]], path: Path) -> bool:
    """Per model: the clean inputs (label and the probe's prediction under each, when there
    are labels) and their decodings, then for every measured ε the attacked inputs (with the
    probe's prediction on them) and their decodings."""
    rows: list[tuple] = []
    title = ""
    for name, art in artifacts.items():
        adv = art.get("adv")
        if not adv or "rec" not in adv:
            continue
        rng = art["data_range"]
        eps_list = list(adv["x_adv"])
        title = (f"{adv.get('attack', 'PGD')} on {adv['source']}, "
                 f"ε = {', '.join(f'{e:g}' for e in eps_list)}")
        labels, pred, pred_adv = adv.get("labels"), adv.get("pred"), adv.get("pred_adv", {})
        caps = ([f"label {int(y)} · probe {int(p)}" for y, p in zip(labels, pred, strict=True)]
                if labels is not None and pred is not None else None)
        rows += [(f"{name}\nx", [to_image(c, rng) for c in adv["x"]], caps),
                 (f"{name}\ng(μ(x))", [to_image(c, rng) for c in adv["rec"]])]
        for eps in eps_list:
            p = pred_adv.get(eps)
            caps = None
            if p is not None and labels is not None:
                caps = [f"probe {int(q)}" + ("" if int(q) == int(y) else " ✗")
                        for q, y in zip(p, labels, strict=True)]
            rows += [(f"{name}\nx + δ, ε={eps:g}", [to_image(c, rng) for c in adv["x_adv"][eps]],
                      caps),
                     (f"{name}\ng(μ(x + δ)), ε={eps:g}",
                      [to_image(c, rng) for c in adv["rec_adv"][eps]])]
    if not rows:
        return False
    _grid(Figure, rows, path, title)
    return True


def ratio_with_error(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """r = b/a and its standard error by the delta method, r·√((sₐ/a)² + (s_b/b)²) (a
    missing standard error counts as 0); None when a is 0 or either value is not finite."""
    va, vb = a.get("value"), b.get("value")
    if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)) or va == 0:
        return None
    sa = a.get("stderr") or 0.0
    sb = b.get("stderr") or 0.0
    sa = sa if math.isfinite(sa) else 0.0
    sb = sb if math.isfinite(sb) else 0.0
    r = vb / va
    rel = (sa / va) ** 2 + ((sb / vb) ** 2 if vb != 0 else 0.0)
    se = abs(r) * math.sqrt(rel) if vb != 0 else abs(sb / va)
    return r, se


def metrics_figure(Figure: Any, metrics: dict[str, Any], path: Path) -> bool:
    """One row per metric: the ratio second model / first with ±1 standard error, a line at 1
    (no change), the better direction in the label, coloured by the verdict (green better, red
    worse, grey within 2·√(se₁² + se₂²)). Needs two models; metrics whose first value is 0
    have no ratio and are named under the plot instead."""
    models = metrics["models"]
    names = list(models)
    if len(names) != 2:
        return False
    a, b = (models[n] for n in names)
    rows, skipped = [], []
    for k in a:
        if k not in b:
            continue
        rr = ratio_with_error(a[k], b[k])
        if rr is None:
            skipped.append(k)
            continue
        rows.append((k, *rr, verdict(k, a[k], b[k])))
    if not rows:
        return False
    colours = {"better": "#2a9d3a", "worse": "#c0392b"}
    arrows = {"down": "↓ better", "up": "↑ better", "": "count"}
    height = 0.32 * len(rows) + 1.4
    fig = Figure(figsize=(7.5, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(rows)))[::-1]
    for y, (_k, r, se, v) in zip(ys, rows, strict=True):
        c = colours.get(v.verdict, "#7f7f7f")
        ax.errorbar([r], [y], xerr=[se], fmt="o", color=c, ecolor=c, capsize=3, ms=4)
        ax.annotate(f"×{r:.3g}", (r, y), xytext=(6, 3), textcoords="offset points",
                    fontsize=6, color=c)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{k}  ({arrows[v.direction]})" for k, _, _, v in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"{names[1]} / {names[0]}  (1 = no change)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{names[1]} relative to {names[0]}: green better, red worse, grey within the "
                 "noise (±1 se bars)", fontsize=8)
    if skipped:
        fig.text(0.01, 0.01, "no ratio (first value 0): " + ", ".join(skipped), fontsize=6)
    fig.tight_layout(rect=(0, 0.03 if skipped else 0, 1, 1))
    fig.savefig(path)
    return True


def _cycle_ks(metrics: dict[str, Any], name: str) -> list[tuple[int, float, float]]:
    """(K, PSNR, stderr) of the ``cycle_psnr@K`` entries of one model, sorted by K."""
    out = []
    for key, e in (metrics["models"].get(name) or {}).items():
        if key.startswith("cycle_psnr@") and isinstance(e, dict) and e.get("value") is not None:
            out.append((int(key.split("@", 1)[1]), float(e["value"]), float(e.get("stderr") or 0.0)))
    return sorted(out)


def cycles_figure(Figure: Any, artifacts: dict[str, dict[str, Any]], metrics: dict[str, Any],
                  path: Path) -> bool:
    """cycles.png: per-image mean PSNR of x_K against the original x₀ vs the number of
    encode → decode cycles K (±1 standard error), one line per model; below it, one row per
    model with the chain x₀, x₁, x₂, x₅, x₁₀ of the first held-out image (each with its own
    PSNR against x₀)."""
    names = [n for n in metrics["models"] if _cycle_ks(metrics, n)]
    if not names:
        return False
    rows = [(n, artifacts.get(n, {}).get("cycles") or {}) for n in names]
    rows = [(n, c) for n, c in rows if c.get("chains") is not None and c["chains"].numel()]
    n_cols = max([len(c["steps"]) for _, c in rows], default=1)
    width = max(6.0, 1.45 * n_cols + 1.4)
    height = 3.0 + 1.5 * len(rows)
    fig = Figure(figsize=(width, height), dpi=100)
    gs = fig.add_gridspec(1 + len(rows), n_cols, height_ratios=[2.6] + [1.4] * len(rows),
                          left=1.2 / width, right=1 - 0.15 / width, top=1 - 0.45 / height,
                          bottom=0.15 / height, hspace=0.45, wspace=0.08)
    ax = fig.add_subplot(gs[0, :])
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i, n in enumerate(names):
        ks, v, se = zip(*_cycle_ks(metrics, n), strict=True)
        dodge = 0.06 * (i - (len(names) - 1) / 2)  # side by side, so equal error bars both show
        ax.errorbar([k + dodge for k in ks], v, yerr=se, marker="o", capsize=3,
                    color=colours[i % len(colours)], label=n)
    ax.set_xlabel("encode → decode cycles K", fontsize=8)
    ax.set_ylabel("PSNR(x_K, x₀) dB", fontsize=8)
    ax.set_xticks(sorted({k for n in names for k, _, _ in _cycle_ks(metrics, n)}))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Real images through repeated encode → decode cycles "
                 "(per-image mean, ±1 s.e.)", fontsize=10)
    for r, (n, c) in enumerate(rows, start=1):
        rng = artifacts[n]["data_range"]
        images = [to_image(t, rng) for t in c["chains"][0]]
        for j, (k, img) in enumerate(zip(c["steps"], images, strict=True)):
            a = fig.add_subplot(gs[r, j])
            a.set_xticks([])
            a.set_yticks([])
            a.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0,
                     interpolation="nearest")
            if k == 0:
                a.set_title("x0 (original)", fontsize=7)
                a.set_ylabel(n, fontsize=8, rotation=0, ha="right", va="center")
            else:
                mse = float(np.mean((img - images[0]) ** 2))
                db = 10 * math.log10(1.0 / max(mse, 1e-12))
                a.set_title(f"x{k}  {db:.1f} dB", fontsize=7)
    fig.savefig(path)
    return True


def make_figures(out_dir: str | Path, artifacts: dict[str, dict[str, Any]],
                 metrics: dict[str, Any]) -> dict[str, str]:
    """Write the PNGs into ``out_dir``; returns {figure: file name} for those written
    (empty when matplotlib is missing)."""
    Figure = _matplotlib()
    if Figure is None:
        return {}
    out_dir = Path(out_dir)
    written: dict[str, str] = {}
    makers = {
        "roundtrip": lambda p: roundtrip_figure(Figure, artifacts, p),
        "drift": lambda p: drift_figure(Figure, artifacts, p),
        "adversarial": lambda p: adversarial_figure(Figure, artifacts, p),
        "metrics": lambda p: metrics_figure(Figure, metrics, p),
        "cycles": lambda p: cycles_figure(Figure, artifacts, metrics, p),
    }
    for key in FIGURES:
        fname = f"{key}.png"
        if makers[key](out_dir / fname):
            written[key] = fname
    return written
