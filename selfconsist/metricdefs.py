"""What each metric is: which way is better, its unit, a one-line meaning and how its standard
error is computed. One entry per metric, read by everything that measures (evaluate, tune)
and everything that renders (report, plots, the model card, the CLI tables).

A leaf module: it imports nothing from the package, so any module can read what a metric
means without loading the code that measures it (and without an import cycle).

A key ending in ``@`` names a family: ``drift@`` covers ``drift@10``, ``adv_shift@`` covers
``adv_shift@0.1`` and so on (the suffix is K or ε). The formulas are in
:mod:`selfconsist.evaluate`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Which way is better: "up" (higher), "down" (lower) or "" (a count that describes the model).
UP, DOWN, NEITHER = "up", "down", ""


@dataclass(frozen=True)
class MetricDef:
    """One metric: ``description`` (the one line of report.md), ``direction`` (:data:`UP`,
    :data:`DOWN` or :data:`NEITHER`), ``unit`` ("" for a plain number) and ``stderr`` (how its
    standard error is computed)."""

    description: str
    direction: str
    unit: str
    stderr: str


_SQ = "model units² per data element"
_SHIFT_SE = "analytic std/√n of the shift over inputs, divided by the pair distance"
_BINOMIAL = "binomial: √(p(1−p)/n)"

#: Every metric ``selfconsist eval`` and ``tune`` report, by name (or ``prefix@``).
METRICS: dict[str, MetricDef] = {
    "sample_roundtrip_mse": MetricDef(
        "sample round-trip error ‖g(z₀) − g(μ(g(z₀)))‖²/D", DOWN, _SQ,
        "analytic: std/√n over prior samples"),
    "latent_roundtrip_corr": MetricDef(
        "latent round-trip correlation, all elements (includes elements the decoder ignores)",
        UP, "", "bootstrap over prior samples"),
    "latent_roundtrip_corr_responsive": MetricDef(
        "latent round-trip correlation, responsive elements", UP, "",
        "bootstrap over prior samples (mask fixed)"),
    "consistency_kl": MetricDef(
        "KL(q(u|g(z₀)) ‖ N(ρu₀, 1−ρ²)) per element", DOWN, "nats per latent element",
        "analytic: std/√n over prior samples"),
    "drift@": MetricDef(
        "drift ‖x_K − x₁‖²/D from model samples", DOWN, _SQ,
        "analytic: std/√n over start points"),
    "adv_shift@": MetricDef(
        "PGD latent shift / pair distance, model samples", DOWN, "ratio", _SHIFT_SE),
    "responsive_elements": MetricDef(
        "decoder-responsive latent elements", NEITHER, "latent elements",
        "bootstrap over the prior samples of the response test"),
    "recon_mse": MetricDef(
        "reconstruction MSE, held out", DOWN, _SQ, "analytic: std/√n over held-out inputs"),
    "recon_psnr": MetricDef(
        "reconstruction PSNR (dB), held out", UP, "dB", "delta method from recon_mse"),
    "active_units": MetricDef(
        "active units (Var μ̂ > 0.01)", NEITHER, "latent elements",
        "bootstrap over held-out inputs"),
    "responsive_active": MetricDef(
        "responsive elements that are active", UP, "latent elements",
        "bootstrap over held-out inputs and response samples"),
    "drift_data@": MetricDef(
        "drift ‖x_K − x₁‖²/D from held-out inputs", DOWN, _SQ,
        "analytic: std/√n over held-out inputs"),
    "adv_shift_data@": MetricDef(
        "PGD latent shift / pair distance, held out", DOWN, "ratio", _SHIFT_SE),
    "probe_acc": MetricDef("linear probe accuracy, clean", UP, "fraction", _BINOMIAL),
    "probe_acc_adv@": MetricDef(
        "linear probe accuracy under the latent-shift PGD (encoder attack)", UP, "fraction",
        _BINOMIAL),
    "probe_acc_ce@": MetricDef(
        "linear probe accuracy under PGD on the probe's cross-entropy", UP, "fraction",
        _BINOMIAL),
    "image_psnr": MetricDef(
        "single-pass PSNR (dB) of g(μ(x)) vs x, per-image mean, real images", UP, "dB",
        "analytic: std/√n over images (per-image PSNR)"),
    "image_ssim": MetricDef(
        "single-pass SSIM of g(μ(x)) vs x (Gaussian 11×11, σ 1.5), per-image mean", UP, "",
        "analytic: std/√n over images (per-image SSIM)"),
    "cycle_psnr@": MetricDef(
        "PSNR (dB) of x_K vs the original x₀ after K encode → decode cycles, per-image mean",
        UP, "dB", "analytic: std/√n over images (per-image PSNR)"),
    "cycle_db_lost": MetricDef(
        "dB lost from cycle 1 to the last of the cycles (PSNR@1 − PSNR@K)", DOWN, "dB",
        "analytic: std/√n over images (per-image difference)"),
    "pipe_image_psnr": MetricDef(
        "single-pass PSNR (dB) as pipelines run it: z ~ q(z|x) sampled, g(z) clipped and "
        "quantised to 8 bits, per-image mean", UP, "dB", "analytic: std/√n over images (per-image PSNR)"),
    "pipe_cycle_psnr@": MetricDef(
        "PSNR (dB) of x_K vs x₀ after K pipeline cycles (sampled posterior, uint8 between cycles)",
        UP, "dB", "analytic: std/√n over images (per-image PSNR)"),
    "pipe_cycle_db_lost": MetricDef(
        "dB lost from cycle 1 to the last, pipeline cycles (PSNR@1 − PSNR@K)", DOWN, "dB",
        "analytic: std/√n over images (per-image difference)"),
    "bound_cycle_psnr@": MetricDef(
        "idempotent bound: PSNR (dB) of x_K vs x₀ when the first encode is the encoder's and every "
        "later one is exact decoder inversion (the best an encoder-only fix can give)", UP, "dB",
        "analytic: std/√n over images (per-image PSNR)"),
    "bound_cycle_db_lost": MetricDef(
        "idempotent bound: dB lost from cycle 1 to the last (PSNR@1 − PSNR@K), on the first "
        "--bound-images images", DOWN, "dB", "analytic: std/√n over images (per-image difference)"),
    "bound_encoder_db_lost": MetricDef(
        "the encoder's own dB lost (cycle_db_lost) on the same images as the bound, to compare "
        "like with like", DOWN, "dB", "analytic: std/√n over images (per-image difference)"),
    "latent_shift": MetricDef(
        "mean |μ_tuned(x) − μ_base(x)| in base-latent std units, real images", DOWN,
        "base-latent standard deviations",
        "analytic: std/√n over images (per-image mean shift)"),
    "latent_decode_psnr": MetricDef(
        "PSNR (dB) of g(μ_tuned(x)) vs g(μ_base(x)), per-image mean", UP, "dB",
        "analytic: std/√n over images (per-image PSNR)"),
}

#: The one definition of each correlation figure, shared by ``tune`` and ``eval`` and written
#: into metrics.json.
DEFINITIONS: dict[str, str] = {
    "latent_roundtrip_corr": (
        "mean over latent elements i of the Pearson correlation, over prior samples, of u₀ᵢ "
        "and μ̂ᵢ(g(z₀)) (whitened); stderr: bootstrap over prior samples "
        "(metrics.roundtrip_corr). _responsive: the same over the decoder-responsive elements "
        "only (the headline figure; the all-elements mean includes elements the decoder "
        "ignores, whose re-encodings carry no information)"),
}


def lookup(key: str) -> MetricDef | None:
    """The entry of metric ``key``: its own, else that of its ``prefix@`` family; None for a
    metric this version does not know (e.g. from another version's metrics.json)."""
    if key in METRICS:
        return METRICS[key]
    for prefix, info in METRICS.items():
        if prefix.endswith("@") and key.startswith(prefix):
            return info
    return None


def direction(key: str) -> str:
    """``"down"`` (lower is better), ``"up"`` (higher is better) or ``""`` for ``key``."""
    info = lookup(key)
    return info.direction if info else NEITHER
