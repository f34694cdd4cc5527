"""``selfconsist eval``: every metric of the design note for one model, or a model and its tuned copy.

    result = evaluate("vae.safetensors", compare="tuned.safetensors", data="digits", out="eval/")

Data-free (from the model alone, ``samples`` prior draws):

* ``sample_roundtrip_mse``: x = g(z₀), x̂ = g(μ(x)); mean over data elements of (x − x̂)²;
* ``latent_roundtrip_corr`` / ``latent_roundtrip_corr_responsive``: Pearson correlation of u₀
  and μ̂(g(z₀)) per latent element, averaged over all elements / the decoder-responsive ones;
* ``consistency_kl``: KL(q(u|g(z₀)) ‖ N(ρu₀, 1 − ρ²)) per latent element;
* ``drift@K``: ‖x_K − x₁‖² per data element along x_{k+1} = g(μ(x_k)), from x₀ = g(z₀);
* ``adv_shift@ε``: mean over x = g(z₀) of max_{‖δ‖∞≤ε} ‖μ̂(x+δ) − μ̂(x)‖² (ℓ∞ PGD, random
  start, 20 steps of ε/8, clipped to the data range), divided by E‖μ̂(xᵢ) − μ̂(xⱼ)‖² over pairs;
* ``responsive_elements``: latent elements i with E‖g(z + δeᵢ) − g(z)‖² ≥ 1% of the largest.

With data (the held-out split; images in [0, 1] are mapped to the model's range
x_model = lo + (hi − lo)·x):

* ``recon_mse`` (model units) and ``recon_psnr`` = 10 log₁₀((hi − lo)²/MSE);
* ``active_units`` (Var_x μ̂ > 0.01) and ``responsive_active`` (responsive elements that are
  active; responsive ones that are not are collapse);
* ``drift_data@K`` and ``adv_shift_data@ε``: as above, from real inputs;
* on image data (C, H, W) with a bounded range, per image then mean ± std/√n
  (:mod:`selfconsist.realimage`): ``image_psnr`` and ``image_ssim`` of the single pass,
  ``cycle_psnr@K`` = PSNR(x_K, x₀) along x_k = clip(g(μ(x_{k−1}))) for K in ``cycles``, and
  ``cycle_db_lost`` = PSNR@1 − PSNR@K_max; with ``compare``, in the compared model's column,
  ``latent_shift`` (|μ_t − μ_b| in base-latent standard deviations) and
  ``latent_decode_psnr`` = PSNR(g(μ_t(x)), g(μ_b(x))). A shift above
  :data:`~selfconsist.realimage.SHIFT_WARN` adds a line to ``warnings`` (and the log);
* with labels, a linear probe (multinomial logistic regression on μ̂(x), fitted on the train
  split) scored on held-out inputs: ``probe_acc`` clean; ``probe_acc_adv@ε`` on the inputs of
  the latent-shift PGD above (the paper's threat model: the attacker moves the code and does
  not know the probe); ``probe_acc_ce@ε`` under a stronger, probe-aware PGD that maximises the
  probe's cross-entropy through the encoder mean and the probe.

Every metric carries a standard error; :data:`selfconsist.metricdefs.METRICS` says how each is
computed.
Every random draw comes from a generator seeded from ``seed`` and the stage, so a run is
deterministic and both models see the same prior draws and attack starts.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import metrics as M
from . import realimage as R
from ._version import __version__
from .adapters.base import VAEAdapter
from .data import FITS, Dataset, check_matches, load_dataset
from .errors import DataError, SelfconsistError
from .io import atomic_output
from .metricdefs import DEFINITIONS, lookup
from .plots import make_figures
from .report import render_report
from .runtime import Stages, log, resolve_device
from .validate import require_finite


@dataclass
class EvalConfig:
    """Settings of one evaluation (stored in metrics.json).

    ``eps`` is in the model's data units; ``None`` means 0.1 and 0.2 of the data range's width
    (0.1, 0.2 for [0, 1] data; 0.2, 0.4 for a [−1, 1] diffusers model). The probe trains on
    the first ``n_train`` items (default ``probe_train_fraction`` of them, only when there are
    labels); everything else is measured on the last ``n_test`` items (default: all the rest).
    """

    seed: int = 0
    samples: int = 1000  # prior draws for the data-free metrics: time against precision
    eps: tuple[float, ...] | None = None
    pgd_steps: int = 20
    drift_k: int = 10
    rho: float = 0.975
    responsive_samples: int = 64
    responsive_delta: float = 1.0
    responsive_share: float = 0.01
    max_responsive_elements: int = 256  # larger spatial latents are probed per channel
    active_threshold: float = 0.01
    n_train: int | None = None
    probe_train_fraction: float = 0.8
    n_test: int | None = None
    probe_l2: float = 1e-4  # on the whitened codes μ̂
    bootstrap: int = 200
    batch_size: int = 256
    device: str = "auto"
    prior: str | None = None
    figures: bool = True
    n_figure: int = 8
    data_seed: int = 0  # ColorMNIST colours
    fit: str = "crop"  # image folders of other sizes: "crop" (centre crop) or "tile"
    cycles: tuple[int, ...] = (1, 2, 5, 10)  # K of cycle_psnr@K; the largest sets cycle_db_lost
    real_images: int | None = None  # at most this many held-out images for the cycle stages
    # The idempotent bound inverts the decoder (50 Adam steps) at every cycle after the first:
    # about 100× a plain cycle, so it runs on the first few real images only (0: not at all).
    bound_images: int = 8

    def __post_init__(self) -> None:
        require_finite(self)
        if self.eps is not None:
            self.eps = tuple(float(e) for e in self.eps)
            if not self.eps or any(not (e > 0 and math.isfinite(e)) for e in self.eps):
                raise SelfconsistError("--eps must be positive numbers, e.g. --eps 0.1,0.2")
        if self.samples < 2:
            raise SelfconsistError("--samples must be at least 2")
        for name in ("pgd_steps", "drift_k", "responsive_samples", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise SelfconsistError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 < self.rho < 1.0:
            raise SelfconsistError(f"--rho must lie in (0, 1), got {self.rho}")
        if not 0.0 < self.probe_train_fraction < 1.0:
            raise SelfconsistError("--probe-train-fraction must lie in (0, 1)")
        if self.n_train is not None and self.n_train < 0:
            raise SelfconsistError("--n-train must not be negative")
        if self.n_test is not None and self.n_test < 2:
            raise SelfconsistError("--n-test must be at least 2")
        if self.fit not in FITS:
            raise SelfconsistError(f"--fit must be {' or '.join(FITS)}, got {self.fit!r}")
        try:
            cycles = tuple(sorted({int(k) for k in self.cycles}))
        except (TypeError, ValueError):
            cycles = ()
        if not cycles or cycles[0] < 1 or any(float(k) != int(k) for k in self.cycles):
            raise SelfconsistError("--cycles must be positive integers, e.g. --cycles 1,2,5,10")
        self.cycles = cycles
        if self.bound_images < 0:
            raise SelfconsistError("--bound-images must be ≥ 0")
        if self.real_images is not None and self.real_images < 2:
            raise SelfconsistError("--real-images must be at least 2")

    @classmethod
    def resolve(cls, fast: bool = False, **given: Any) -> EvalConfig:
        """The config of the settings a caller gave, where None means "not given" (the CLI's
        options all default to None): a setting not given takes its field's default, declared
        once above, or with ``fast`` the :data:`FAST_PRESET` value; one given wins over both,
        even when it equals the default."""
        chosen = {k: v for k, v in given.items() if v is not None}
        cfg = cls(**chosen)
        return fast_config(cfg, chosen) if fast else cfg

    def eps_for(self, data_range: tuple[float, float]) -> tuple[float, ...]:
        if self.eps is not None:
            return self.eps
        span = data_range[1] - data_range[0]
        if not math.isfinite(span):
            raise SelfconsistError("the model's data range is unbounded, so ε has no default; "
                                   "pass --eps in the model's data units")
        return (round(0.1 * span, 6), round(0.2 * span, 6))


# ``eval --fast``: fewer samples, PGD steps and bootstrap resamples, for a quick check (the
# standard errors grow by about √4); the metric set and names stay the same. Real-image cycles
# keep their K (so cycle_psnr@10 and cycle_db_lost mean the same) on at most 16 images.
FAST_PRESET = {"samples": 256, "pgd_steps": 5, "responsive_samples": 16, "bootstrap": 50,
               "real_images": 16}


def fast_config(cfg: EvalConfig, given: Collection[str] | None = None) -> EvalConfig:
    """``cfg`` with the fast preset on every setting the user did not give. ``given`` names
    the ones they did (:meth:`EvalConfig.resolve` passes them), so an explicit ``--samples
    1000`` stays 1000 although it is the default; None (a config built by hand) counts the
    fields whose value differs from their declared default as given."""
    if given is None:
        given = {f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    return replace(cfg, **{k: v for k, v in FAST_PRESET.items() if k not in given})


def probe_max_elements(cfg: EvalConfig, d: int) -> int:
    """Largest latent probed per element: per element only while its cost n_p·(d + 1) decodes
    stays within that of the prior round trip and drift stages, 2·samples·(1 + K); above it a
    spatial latent is probed per channel."""
    if cfg.responsive_samples * (d + 1) <= 2 * cfg.samples * (1 + cfg.drift_k):
        return cfg.max_responsive_elements
    return min(cfg.max_responsive_elements, d - 1)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: the metrics.json content, the report, where it went."""

    metrics: dict[str, Any]
    report: str
    out: Path | None = None
    figures: dict[str, str] = field(default_factory=dict)


#: The attack of ``adv_shift``/``probe_acc_adv`` and of adversarial.png, in words.
ATTACK = "ℓ∞ PGD on the latent shift ‖μ̂(x+δ) − μ̂(x)‖²"

# --- stages and their seeds --------------------------------------------------------------------

_STAGE_SEEDS = {"responsive": 1, "roundtrip": 2, "drift": 3, "shift": 4, "bootstrap": 5,
                "drift_data": 6, "shift_data": 7, "probe_adv": 8}


def _gen(seed: int, stage: str) -> torch.Generator:
    """An independent CPU generator per stage, so adding a stage never shifts another's draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + _STAGE_SEEDS[stage])


def _Stages(total: int, enabled: bool) -> Stages:
    """Progress over the evaluation stages (see :class:`selfconsist.runtime.Stages`)."""
    return Stages(total, "eval", enabled)


# --- data --------------------------------------------------------------------------------------

@dataclass
class _Split:
    spec: str
    n: int
    test_x: Tensor  # [0, 1]
    test_y: Tensor | None
    train_x: Tensor | None
    train_y: Tensor | None
    n_classes: int = 0
    chance_acc: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "n": self.n, "n_test": int(self.test_x.shape[0]),
                "n_train_probe": 0 if self.train_x is None else int(self.train_x.shape[0]),
                "labels": self.test_y is not None, "n_classes": self.n_classes,
                "probe_chance_acc": self.chance_acc,
                "test_items": f"last {int(self.test_x.shape[0])}"}


def _load_labels(labels: Any, n: int) -> Tensor:
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise DataError(f"--labels {path}: no such file")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"--labels {path}: cannot read .npy file ({e})") from None
    else:
        arr = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    arr = np.asarray(arr).reshape(-1)
    if arr.shape[0] != n:
        raise DataError(f"--labels has {arr.shape[0]} labels for {n} images; give one per image")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError("--labels must hold integer class indices")
    if arr.min() < 0:
        raise DataError("--labels must be non-negative class indices")
    return torch.from_numpy(arr.astype(np.int64))


def _prepare_data(data: Any, labels: Any, cfg: EvalConfig, data_shape: tuple[int, ...]
                  ) -> _Split:
    if isinstance(data, Dataset):
        ds = data
    elif isinstance(data, Tensor):
        ds = Dataset(data.float(), None, "tensor")
    else:
        # An image folder of any size is fitted to the model's (C, H, W) (cfg.fit).
        shape = data_shape if len(data_shape) == 3 else None
        ds = load_dataset(str(data), seed=cfg.data_seed, shape=shape, fit=cfg.fit)
    check_matches(ds, data_shape)
    n = len(ds)
    y = _load_labels(labels, n) if labels is not None else ds.y
    n_train = cfg.n_train
    if n_train is None:
        n_train = int(round(cfg.probe_train_fraction * n)) if y is not None else 0
    if n_train >= n:
        raise DataError(f"--n-train {n_train} leaves no held-out items of the {n}; lower it")
    rest = n - n_train
    n_test = rest if cfg.n_test is None else cfg.n_test
    if n_test > rest:
        raise DataError(f"--n-test {n_test} is more than the {rest} items after the probe's "
                        f"{n_train} train items; lower --n-test or --n-train")
    test_x = ds.x[n - n_test:]
    test_y = None if y is None else y[n - n_test:]
    train_x = ds.x[:n_train] if (y is not None and n_train > 0) else None
    train_y = None if (y is None or train_x is None) else y[:n_train]
    split = _Split(str(data) if not isinstance(data, (Dataset, Tensor)) else ds.name, n,
                   test_x, test_y, train_x, train_y)
    if y is not None:
        if train_x is None or n_train < 2:
            raise DataError("the linear probe needs a train split: pass --n-train N "
                            "(the first N items train the probe)")
        split.n_classes = int(y.max()) + 1
        majority = int(torch.bincount(train_y, minlength=split.n_classes).argmax())
        split.chance_acc = float((test_y == majority).double().mean())
    return split


def _to_model_range(x: Tensor, data_range: tuple[float, float]) -> Tensor:
    """Data in [0, 1] → the adapter's range: x_model = lo + (hi − lo)·x (as given when the
    range is unbounded)."""
    lo, hi = data_range
    if not math.isfinite(hi - lo):
        return x
    return lo + (hi - lo) * x


# --- one model ---------------------------------------------------------------------------------

def _has_images(vae: VAEAdapter, split: _Split | None) -> bool:
    """Real-image stages run on image data (C, H, W) in a bounded range (PSNR needs one)."""
    lo, hi = vae.data_range
    return split is not None and len(vae.data_shape) == 3 and math.isfinite(hi - lo)


def _real_images(split: _Split, cfg: EvalConfig, data_range: tuple[float, float]) -> Tensor:
    """The held-out images of the real-image stages, in the model's range (the first
    ``cfg.real_images`` of them)."""
    x = split.test_x if cfg.real_images is None else split.test_x[: cfg.real_images]
    return _to_model_range(x, data_range)


def _stage_names(has_data: bool, has_labels: bool, has_images: bool = False,
                 bound: bool = False) -> list[str]:
    names = ["decoder responses", "sample round trip", "drift (samples)", "PGD shift (samples)"]
    if has_data:
        names += ["reconstruction, active units", "drift (data)"]
    if has_images:
        names += ["real-image cycles", "real-image cycles (pipeline)"]
        if bound:
            names += ["idempotent bound"]
    if has_labels:
        names += ["linear probe"]
    if has_data:
        names += ["PGD shift (data)"]
    if has_labels:
        names += ["PGD on the probe"]
    return names


def _evaluate_model(vae: VAEAdapter, cfg: EvalConfig, split: _Split | None, stages: Stages,
                    label: str) -> tuple[dict[str, M.Estimate], dict[str, Any]]:
    s, bs = cfg.seed, cfg.batch_size
    rng = vae.data_range
    eps_list = cfg.eps_for(rng)
    out: dict[str, M.Estimate] = {}
    art: dict[str, Any] = {"data_range": rng}
    keep = max(cfg.n_figure, 0)

    with stages.stage(f"{label}: decoder responses"):
        resp = M.decoder_responses(vae, _gen(s, "responsive"), n=cfg.responsive_samples,
                                   delta=cfg.responsive_delta, batch_size=bs,
                                   max_elements=probe_max_elements(
                                       cfg, math.prod(vae.latent_shape)))
        mask = resp.mask(cfg.responsive_share)
        out["responsive_elements"] = M.bootstrap(
            lambda rows: float(resp.mask(cfg.responsive_share, rows).sum()),
            (resp.per_sample.shape[0],), _gen(s, "bootstrap"), cfg.bootstrap)
        art["responsive_mode"] = resp.mode

    with stages.stage(f"{label}: sample round trip"):
        r = M.sample_roundtrip(vae, cfg.samples, _gen(s, "roundtrip"), cfg.rho, bs)
        out["sample_roundtrip_mse"] = M.Estimate.of(r["mse"])
        # One definition (metrics.roundtrip_corr, as in tune); the responsive one leads.
        if mask.any():
            out["latent_roundtrip_corr_responsive"] = M.roundtrip_corr(
                r["u0"], r["mu_hat"], mask, _gen(s, "bootstrap"), cfg.bootstrap)
        out["latent_roundtrip_corr"] = M.roundtrip_corr(r["u0"], r["mu_hat"], None,
                                                        _gen(s, "bootstrap"), cfg.bootstrap)
        out["consistency_kl"] = M.Estimate.of(r["consistency_kl"])

    with stages.stage(f"{label}: drift (samples)"):
        z0 = vae.sample_prior(cfg.samples, _gen(s, "drift"))
        x0 = M.decode_batched(vae, z0, bs).cpu()
        drift, chains = M.drift_chain(vae, x0, cfg.drift_k, bs, keep=keep)
        out[f"drift@{cfg.drift_k}"] = M.Estimate.of(drift)
        art["sample_chains"] = chains

    with stages.stage(f"{label}: PGD shift (samples)") as tick:
        g = _gen(s, "shift")
        z0 = vae.sample_prior(cfg.samples, g)
        xs = M.decode_batched(vae, z0, bs).cpu()
        mu, _ = M.encode_mean(vae, xs, bs)
        den = M.code_pair_distance(mu)
        kept: dict[float, Tensor] = {}
        n_b = math.ceil(xs.shape[0] / bs)  # progress in attacked batches, over every ε
        for k, eps in enumerate(eps_list):
            shift, kept[eps] = M.adversarial_shift(
                vae, xs, eps, cfg.pgd_steps, g, bs, keep=keep,
                on_batch=lambda i, _xa, k=k: tick(k * n_b + i // bs + 1, len(eps_list) * n_b))
            out[f"adv_shift@{eps:g}"] = M.ratio_estimate(M.Estimate.of(shift), den)
        art["adv"] = {"source": "model samples", "attack": f"{ATTACK}, {cfg.pgd_steps} steps of ε/8",
                      "eps": list(eps_list), "x": xs[:keep], "x_adv": kept}

    if split is not None:
        test_x = _to_model_range(split.test_x, rng)
        with stages.stage(f"{label}: reconstruction, active units"):
            mse = M.Estimate.of(M.reconstruction_mse(vae, test_x, bs))
            out["recon_mse"] = mse
            if math.isfinite(rng[1] - rng[0]):  # PSNR needs a bounded range
                out["recon_psnr"] = M.psnr(mse, rng)
            mu, _ = M.encode_mean(vae, test_x, bs)
            mu = mu.reshape(mu.shape[0], -1).cpu()
            thr = cfg.active_threshold
            out["active_units"] = M.bootstrap(lambda rows: float((mu[rows].var(0) > thr).sum()),
                                              (mu.shape[0],), _gen(s, "bootstrap"),
                                              cfg.bootstrap)
            out["responsive_active"] = M.bootstrap(
                lambda rows, zrows: float((resp.mask(cfg.responsive_share, zrows)
                                           & (mu[rows].var(0) > thr)).sum()),
                (mu.shape[0], resp.per_sample.shape[0]), _gen(s, "bootstrap"), cfg.bootstrap)

        with stages.stage(f"{label}: drift (data)"):
            drift, chains = M.drift_chain(vae, test_x, cfg.drift_k, bs, keep=keep)
            out[f"drift_data@{cfg.drift_k}"] = M.Estimate.of(drift)
            art["data_chains"] = chains

        if _has_images(vae, split):
            with stages.stage(f"{label}: real-image cycles"):
                real = _real_images(split, cfg, rng)
                cyc = R.cycle_metrics(vae, real, cfg.cycles, bs, keep=1)
                out.update(cyc.estimates)
                art["cycles"] = {"chains": cyc.chains, "steps": cyc.steps, "n": int(
                    cyc.per_image["image_psnr"].numel())}
            # As diffusers pipelines and editing tools run it: posterior samples, 8-bit images.
            with stages.stage(f"{label}: real-image cycles (pipeline)"):
                out.update(R.cycle_metrics(vae, real, cfg.cycles, bs, mode="pipeline", seed=s).estimates)
            if cfg.bound_images and max(cfg.cycles) > 1:
                with stages.stage(f"{label}: idempotent bound"):
                    n = min(cfg.bound_images, real.shape[0])
                    out.update(R.cycle_metrics(vae, real[:n], cfg.cycles, bs, mode="bound").estimates)
                    out["bound_encoder_db_lost"] = M.Estimate.of(cyc.per_image["cycle_db_lost"][:n])

        probe = None
        if split.test_y is not None and split.train_x is not None:
            with stages.stage(f"{label}: linear probe"):
                feats, _ = M.encode_mean(vae, _to_model_range(split.train_x, rng), bs)
                probe = M.fit_probe(feats.cpu(), split.train_y, split.n_classes, cfg.probe_l2)
                out["probe_acc"] = M.binomial_estimate(
                    M.probe_correct(vae, probe, test_x, split.test_y, bs))

        with stages.stage(f"{label}: PGD shift (data)") as tick:
            den = M.code_pair_distance(mu)
            g = _gen(s, "shift_data")
            kept = {}
            n_b = math.ceil(test_x.shape[0] / bs)
            for k, eps in enumerate(eps_list):
                correct: list[Tensor] = []

                def score(start: int, xa: Tensor, correct: list[Tensor] = correct,
                          k: int = k) -> None:
                    # The paper's threat model: the attacker moves the code as far as it can
                    # and does not know the downstream probe; score the probe on those inputs.
                    if probe is not None:
                        y = split.test_y[start : start + xa.shape[0]]
                        correct.append(M.probe_correct(vae, probe, xa, y, bs))
                    tick(k * n_b + start // bs + 1, len(eps_list) * n_b)

                shift, kept[eps] = M.adversarial_shift(
                    vae, test_x, eps, cfg.pgd_steps, g, bs, keep=keep, on_batch=score)
                out[f"adv_shift_data@{eps:g}"] = M.ratio_estimate(M.Estimate.of(shift), den)
                if probe is not None:
                    out[f"probe_acc_adv@{eps:g}"] = M.binomial_estimate(torch.cat(correct))
            art["adv"] = {"source": "held-out data",
                          "attack": f"{ATTACK}, {cfg.pgd_steps} steps of ε/8",
                          "eps": list(eps_list), "x": test_x[:keep], "x_adv": kept}
            if probe is not None:  # what the probe reads before and after each attack
                art["adv"]["labels"] = split.test_y[:keep].clone()
                art["adv"]["pred"] = M.probe_predict(vae, probe, test_x[:keep], bs)
                art["adv"]["pred_adv"] = {e: M.probe_predict(vae, probe, xa, bs)
                                          for e, xa in kept.items()}

        if probe is not None:
            with stages.stage(f"{label}: PGD on the probe"):
                # A stronger, probe-aware attack: PGD on the probe's cross-entropy.
                g = _gen(s, "probe_adv")
                for eps in eps_list:
                    ok = M.probe_correct_adversarial(vae, probe, test_x, split.test_y, eps,
                                                     cfg.pgd_steps, g, bs)
                    out[f"probe_acc_ce@{eps:g}"] = M.binomial_estimate(ok)

    if art["adv"]["x"].numel():
        art["adv"]["rec"] = M.reconstruct(vae, art["adv"]["x"], bs)
        art["adv"]["rec_adv"] = {e: M.reconstruct(vae, xa, bs)
                                 for e, xa in art["adv"]["x_adv"].items()}
    return out, art


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _versions() -> dict[str, str]:
    v = {"selfconsist": __version__, "torch": torch.__version__, "numpy": np.__version__,
         "python": platform.python_version()}
    try:
        import matplotlib

        v["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return v


# --- the entry point ---------------------------------------------------------------------------

def _load(model: Any, adapter: str | None, trust_remote_code: bool,
          options: Mapping[str, Any] | None = None) -> VAEAdapter:
    from .loading import load_model

    return load_model(model, adapter, trust_remote_code, **dict(options or {}))


def _check_out(out: Path, overwrite: bool) -> bool:
    """Refuse a non-empty output folder unless ``overwrite``; True when it may be replaced."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SelfconsistError(f"{out} exists and is not a folder; choose another --out")
    if any(out.iterdir()) and not overwrite:
        raise SelfconsistError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return True


def evaluate(model: Any, compare: Any = None, *, data: Any = None, labels: Any = None,
             out: str | Path | None = None, config: EvalConfig | None = None,
             name: str = "model", compare_name: str = "tuned", overwrite: bool = False,
             progress: bool = False, adapter: str | None = None,
             compare_adapter: str | None = None, trust_remote_code: bool = False,
             load_options: Mapping[str, Any] | None = None) -> EvalResult:
    """Evaluate ``model`` (and ``compare``, e.g. its tuned copy) on every metric.

    ``model``/``compare`` are adapters or checkpoint paths; ``data`` a spec of
    :func:`selfconsist.data.load_dataset`, a :class:`~selfconsist.data.Dataset` or a tensor
    (N, C, H, W) in [0, 1]; ``labels`` a .npy path or array overriding the data's labels.
    With ``out``, writes metrics.json, report.md and PNG figures to that folder (atomically).
    The models are moved to ``config.device`` and put in eval mode; nothing else changes.
    """
    cfg = config or EvalConfig()
    if compare is not None and name == compare_name:
        raise SelfconsistError("the two models need different names (--name / --compare-name)")
    out_path = Path(out) if out is not None else None
    replace = _check_out(out_path, overwrite) if out_path is not None else False

    device = resolve_device(cfg.device)
    # load_options (selfconsist.loading.LoadOptions fields) apply to both models; the Hub
    # revision only to MODEL (--compare is usually the local tuned file).
    opts = dict(load_options or {})
    vaes = {name: _load(model, adapter, trust_remote_code, opts)}
    if compare is not None:
        vaes[compare_name] = _load(compare, compare_adapter or adapter, trust_remote_code,
                                   {k: v for k, v in opts.items() if k != "revision"})
    shapes = {tuple(v.data_shape) for v in vaes.values()}
    if len(shapes) > 1:
        raise SelfconsistError(f"the models take different data shapes {sorted(shapes)}; "
                               "compare models of the same family")
    for v in vaes.values():
        v.set_prior(cfg.prior)
        v.to(device)
        for m in v.encoder_modules() + v.decoder_modules():
            m.eval()

    first = next(iter(vaes.values()))
    eps_used = cfg.eps_for(first.data_range)  # an unbounded range without --eps fails here
    split = _prepare_data(data, labels, cfg, tuple(first.data_shape)) if data is not None else None
    has_labels = split is not None and split.test_y is not None
    has_images = _has_images(first, split)
    # latent compatibility: base vs compared encoder on the same real images (a flat latent's
    # spread is across images, so it needs two)
    with_compat = (has_images and compare is not None
                   and (len(first.latent_shape) > 1 or split.test_x.shape[0] > 1))
    n_stages = (len(_stage_names(split is not None, has_labels, has_images,
                                   bool(cfg.bound_images) and max(cfg.cycles) > 1)) * len(vaes) + 1
                + int(with_compat))

    results: dict[str, dict[str, Any]] = {}
    artifacts: dict[str, dict[str, Any]] = {}
    timing: dict[str, float] = {}
    with _Stages(n_stages, progress) as stages:
        for n, vae in vaes.items():
            t0 = time.perf_counter()
            res, art = _evaluate_model(vae, cfg, split, stages, n)
            timing[n] = round(time.perf_counter() - t0, 2)
            results[n] = {k: e.as_dict() for k, e in res.items()}
            artifacts[n] = art
        warnings: list[str] = []
        if with_compat:
            with stages.stage("latent compatibility"):
                # In the compared model's column: how far its encoder moved the base model's
                # latents of the same real images (the base column would read 0).
                base, tuned = vaes[name], vaes[compare_name]
                compat = R.latent_compatibility(base, tuned, _real_images(
                    split, cfg, base.data_range), cfg.batch_size)
                results[compare_name].update({k: e.as_dict() for k, e in compat.items()})
                line = R.shift_warning(compat["latent_shift"].value)
                if line is not None:
                    warnings.append(f"{compare_name}: {line}")
        for line in warnings:
            log.warning(line)
        with stages.stage("report"):
            metrics: dict[str, Any] = {
                "models": results,
                "config": {**asdict(cfg), "eps_used": list(eps_used),
                           "sources": {n: str(v.source.path) if v.source.path else
                                       (v.source.repo_id or type(v).__name__)
                                       for n, v in vaes.items()},
                           "adapters": {n: v.name or type(v).__name__ for n, v in vaes.items()},
                           "priors": {n: v.prior.name for n, v in vaes.items()},
                           "responsive_mode": {n: a["responsive_mode"]
                                               for n, a in artifacts.items()},
                           "data_range": {n: list(v.data_range) for n, v in vaes.items()},
                           "device": str(device),
                           "seeds": {stage: cfg.seed * 1_000_003 + k
                                     for stage, k in _STAGE_SEEDS.items()}},
                "data": split.describe() if split is not None else None,
                "warnings": warnings,
                "stderr_methods": {k: getattr(lookup(k), "stderr", None)
                                   for r in results.values() for k in r},
                "definitions": dict(DEFINITIONS),
                "versions": _versions(),
                "timing_s": timing,
            }
            metrics = _jsonable(metrics)
            figures: dict[str, str] = {}
            report = render_report(metrics)
            if out_path is not None:
                with atomic_output(out_path, overwrite=replace) as tmp:
                    tmp.mkdir()
                    if cfg.figures:
                        figures = make_figures(tmp, artifacts, metrics)
                    report = render_report(metrics, figures)
                    (tmp / "metrics.json").write_text(
                        json.dumps(metrics, indent=2, allow_nan=False) + "\n")
                    (tmp / "report.md").write_text(report)
    return EvalResult(metrics, report, out_path, figures)

