"""Figures of ``selfconsist eval`` (PNG, matplotlib's Agg renderer, imported lazily).

Without matplotlib the figures are skipped with a warning on stderr; evaluation never
fails for want of them. Only :class:`matplotlib.figure.Figure` is used, never pyplot, so
nothing touches a global backend or opens a window.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

FIGURES = ("roundtrip", "drift", "adversarial", "metrics", "cycles")


def _matplotlib() -> Any | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("warning: matplotlib is not installed; skipping the figures "
              "(pip install 'selfconsist[plots]')", file=sys.stderr, flush=True)
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


def _grid(Figure: Any, rows: list[tuple[str, list[np.ndarray]]], path: Path,
          title: str, col_titles: list[str] | None = None) -> None:
    n_rows = len(rows)
    n_cols = max(len(r[1]) for r in rows)
    width, height = 1.1 * n_cols + 1.4, 1.15 * n_rows + 0.7
    fig = Figure(figsize=(width, height), dpi=100)
    fig.suptitle(title, fontsize=10)
    for i, (label, images) in enumerate(rows):
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                img = images[j]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect="auto" if img.shape[0] == 1 else "equal")
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
    fig.subplots_adjust(left=1.3 / width, right=1 - 0.1 / width, bottom=0.1 / height,
                        top=1 - 0.55 / height, wspace=0.05, hspace=0.1)
    fig.savefig(path)


def roundtrip_figure(Figure: Any, artifacts: dict[str, dict[str, Any]], path: Path) -> bool:
    rows = []
    for name, art in artifacts.items():
        ch = art.get("sample_chains")
        if ch is None or ch.numel() == 0:
            continue
        rng = art["data_range"]
        rows.append((f"{name}\nx = g(z₀)", [to_image(c, rng) for c in ch[:, 0]]))
        rows.append((f"{name}\ng(μ(x))", [to_image(c, rng) for c in ch[:, 1]]))
    if not rows:
        return False
    _grid(Figure, rows, path, "Model samples and their re-encodings")
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
    rows, title = [], ""
    for name, art in artifacts.items():
        adv = art.get("adv")
        if not adv or "rec" not in adv:
            continue
        rng = art["data_range"]
        title = f"PGD at ε = {adv['eps']:g} on {adv['source']}"
        rows += [(f"{name}\nx", [to_image(c, rng) for c in adv["x"]]),
                 (f"{name}\ng(μ(x))", [to_image(c, rng) for c in adv["rec"]]),
                 (f"{name}\nx + δ", [to_image(c, rng) for c in adv["x_adv"]]),
                 (f"{name}\ng(μ(x + δ))", [to_image(c, rng) for c in adv["rec_adv"]])]
    if not rows:
        return False
    _grid(Figure, rows, path, title)
    return True


def metrics_figure(Figure: Any, metrics: dict[str, Any], path: Path) -> bool:
    """Bar charts, one panel per metric, one bar per model, ±1 standard error."""
    models = metrics["models"]
    names = list(models)
    keys: list[str] = []
    for n in names:
        keys += [k for k in models[n] if k not in keys]
    if not keys:
        return False
    cols = 4
    n_rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * n_rows), dpi=100)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i, k in enumerate(keys):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        vals = [(models[n].get(k) or {}).get("value") for n in names]
        errs = [(models[n].get(k) or {}).get("stderr") for n in names]
        ax.bar(range(len(names)), [v if v is not None else 0.0 for v in vals],
               yerr=[e if e is not None else 0.0 for e in errs], capsize=3,
               color=[colours[j % len(colours)] for j in range(len(names))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(k, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
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
