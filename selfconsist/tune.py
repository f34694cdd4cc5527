"""Post-hoc self-consistency tuning of a pretrained VAE's encoder: the recipe.

Read top to bottom (notation and derivations: docs/design.md):

    z₀     from :class:`~selfconsist.sources.Z0Source`: the prior, refined prior draws, a
           latents file, or the base posteriors of the user's images
    loss   the chosen objective on the batch (:mod:`selfconsist.posthoc`): the AVAE bound on
           model samples, or the cycle (idempotence) loss, each with an optional anchor to
           the frozen base encoder
    step   Adam on the encoder only; the decoder is frozen (eval mode, ``requires_grad=False``,
           not in the optimiser) and checked bit for bit before anything is written

:class:`TuneConfig` declares every setting once (default, help, CLI panel); :func:`resolve_config`
fills what the caller left unset from the model family's evidence-based defaults, so the
Python API and the CLI run the same settings. :class:`TuneRecipe` holds the run's state:
``setup()``, ``begin()`` (resume, or measure before and save the resumable state at once),
``train()``, ``measure_after()``, ``save_checkpoint()``. A resumable state (encoder,
optimiser, scheduler, RNG streams, step) is written atomically every ``save_every`` steps
beside OUT; ``resume=True`` ends at exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed, mlp_step, posthoc
from ._version import __version__
from .adapters.base import VAEAdapter
from .budget import MeasurementPlan, plan_measurement
from .data import FITS
from .errors import NonFiniteLossError, SelfconsistError
from .io import (
    META_PREFIX,
    atomic_output,
    atomic_torch_save,
    json_meta,
    load_state,
    locks_output,
    rng_state,
    set_rng_state,
    sha256_file,
    state_path_for,
)
from .metrics import encode_batched, responsive_elements, roundtrip_summary
from .realimage import channel_std, latent_shift_per_image, shift_warning
from .runtime import (
    CPU_BF16_MIN_ENCODER_PARAMS,
    DEVICES,
    PRECISIONS,
    Progress,
    adam,
    autocast,
    check_finite,
    cpu_fast_path,
    current_stop,
    keep_freed_memory,
    log,
    nonfinite_stop,
    resolve_device,
    resolve_precision,
    set_channels_last,
    stage,
    stoppable,
)
from .settings import Resolved, resolve, setting
from .sources import Z0Source, frozen_copy, load_images, load_latents  # noqa: F401
from .validate import require_finite

SCHEDULES = ("constant", "cosine", "linear")
SHIFT_SAMPLES = 64  # --images on which tune measures the latent shift (two encoder passes)
_Z0, _OBJ, _OPT, _RUN = "Where z₀ comes from", "Objective", "Optimisation", "Run and output"


@dataclass
class TuneConfig:
    """Settings of a post-hoc tuning run. A field left ``None`` is resolved by
    :func:`resolve_config`: the model family's default if it has one, else the default shown."""

    objective: str | None = setting(
        "avae", "avae: the AVAE bound on model samples; cycle: idempotence of encode → decode, "
        "what img2img/inpainting loops need (docs/design.md).", _OBJ, choices=tuple(posthoc.OBJECTIVES))
    rho: float | None = setting(0.975, "avae: coupling strength ρ in (0, 1); re-encodings must land "
                                "within √(1−ρ²) of ρu.", _OBJ)
    # Model samples are noise-free decoder means, so a sharper likelihood (5 ≙ v/5) is
    # justified; on the ColorMNIST VAE it keeps both the round-trip and the robustness gain.
    lambda_rec: float | None = setting(5.0, "avae: weight of log p(x|z) on model samples; 1 is the "
                                       "AVAE bound, 0 is cheaper.", _OBJ)
    obs_var: float | None = setting(None, "Observation variance v of the likelihood (default: the "
                                    "model's, lowered by --obs-var-ratio).", _OBJ)
    # Adapts v to the model (issue 21): a nominal v far above the error tuning must see (pythae's
    # mse loss means v = 1) leaves the likelihood blind to it; the evidence is in docs/results-pythae.md.
    obs_var_ratio: float | None = setting(
        10.0, "avae, Gaussian likelihood, no --obs-var: tune with v = min(v, K · e₀), e₀ the "
        "model's own sample round-trip error per element measured before tuning; 0 keeps v.", _OBJ,
        metavar="K")
    cycle_space: str | None = setting("pixel", "cycle: measure the re-encoding error in pixels, "
                                      "‖g(μ(g(z))) − g(z)‖²/v, or in latents, ‖μ(g(z)) − z‖²/s².",
                                      _OBJ, choices=("pixel", "latent"))
    cycle_depth: int | None = setting(0, "cycle: first move z₀ k ~ U{0..K} cycles by the current "
                                      "encoder, so the loss sees the latents the loop reaches.", _OBJ)
    anchor: float | None = setting(0.0, "Weight a of the anchor to the frozen base encoder (avae: "
                                   "KL(q_tuned ‖ q_base); cycle: ‖μ − μ_base‖²/s²) on --images, "
                                   "else on decoded samples (avae) or perturbed ones (cycle).", _OBJ)
    anchor_noise: float | None = setting(0.03, "cycle, data-free: std of the noise, as a fraction "
                                         "of the data range, that pushes decoded samples off the "
                                         "decoder's range for the anchor.", _OBJ)
    prior: str | None = setting(None, "Prior to sample, where the model offers several (see info).", _Z0)
    prior_refine: int | None = setting(0, "Refine each prior draw by z ← μ_base(g(z)) this many "
                                       "times (data-free).", _Z0)
    # The refinement is ~4 of the latent-diffusion recipe's ~12 passes a step (issue 22).
    refine_reuse: int | None = setting(1, "Use each refined prior draw in about N batches: a pool "
                                       "of N × batch draws, ⌈batch/N⌉ replaced a step (1: fresh "
                                       "draws every step).", _Z0, metavar="N")
    latents: str | None = setting(None, "Sample z₀ from this file (.npy/.pt/.safetensors, N × latent "
                                  "shape) instead of the prior.", _Z0, metavar="PATH")
    images: str | None = setting(None, "Draw z₀ from the base posteriors of this folder of images "
                                 "(PNG/JPEG, any size; your own photos or generations), encoded "
                                 "once; the anchor is then taken on them.", _Z0, metavar="DIR")
    fit: str | None = setting("crop", "How --images of another size fit the model: crop (shorter "
                              "side resized, centre crop) or tile.", _Z0, choices=FITS)
    sample_noise: bool | None = setting(False, "Add N(0, v) observation noise to decoded samples.", _Z0)
    steps: int | None = setting(5000, "Optimiser steps.", _OPT)
    batch_size: int | None = setting(128, "Samples per step.", _OPT)
    lr: float | None = setting(1e-4, "Adam learning rate.", _OPT)
    # Cosine decay: the late, slow phase is where robustness is lost and unused units collapse.
    schedule: str | None = setting("cosine", "Learning-rate decay after warmup.", _OPT, choices=SCHEDULES)
    warmup_steps: int | None = setting(0, "Linear learning-rate warmup steps.", _OPT)
    precision: str | None = setting("fp32", "fp32, bf16 autocast (CUDA or bf16 CPUs), or auto: bf16 "
                                    "where it runs faster (the hardware; on CPU a built-in MLP "
                                    f"also needs ≥ {CPU_BF16_MIN_ENCODER_PARAMS:,} encoder "
                                    "parameters; OUT records which ran).",
                                    _OPT, choices=PRECISIONS)
    seed: int | None = setting(0, "Seed for z₀ draws and noise.", _RUN)
    device: str | None = setting("auto", f"{DEVICES}.", _RUN)
    save_every: int | None = setting(500, "Write a resumable state every N steps.", _RUN)
    eval_samples: int | None = setting(None, "Prior samples for the before/after table (default: "
                                       "sized so the measurement costs ≤ 10% of the run).", _RUN)

    def __post_init__(self) -> None:
        """Check every setting that is set (unset ones are checked once resolved)."""
        require_finite(self)
        v = self
        if v.rho is not None and not 0.0 < v.rho < 1.0:
            raise SelfconsistError(f"--rho must lie in (0, 1), got {v.rho}")
        for name in ("lambda_rec", "prior_refine", "anchor", "anchor_noise", "cycle_depth", "warmup_steps",
                     "obs_var_ratio"):
            if getattr(v, name) is not None and getattr(v, name) < 0:
                raise SelfconsistError(f"--{name.replace('_', '-')} must be ≥ 0")
        for name in ("steps", "batch_size", "save_every", "eval_samples", "lr", "obs_var", "refine_reuse"):
            if getattr(v, name) is not None and getattr(v, name) <= 0:
                raise SelfconsistError(f"--{name.replace('_', '-')} must be positive")
        for f in self.__dataclass_fields__.values():
            choices, value = f.metadata.get("choices"), getattr(v, f.name)
            if choices and value is not None and value not in choices:
                raise SelfconsistError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {value!r}")
        if v.latents and v.images:
            raise SelfconsistError("pass --latents or --images, not both")
        if v.prior_refine and (v.latents or v.images):
            raise SelfconsistError("--prior-refine refines prior draws; it does not apply to "
                                   "--latents or --images")
        if v.refine_reuse is not None and v.refine_reuse > 1 and (v.prior_refine == 0 or v.latents or v.images):
            raise SelfconsistError("--refine-reuse reuses refined prior draws; it needs --prior-refine > 0 "
                                   "and no --latents or --images")


#: Settings of the bundled example (``selfconsist tune`` with no model) on top of the built-in
#: family's (observation noise on the model samples, lr 1e-3): 1500 steps (~10 s on a laptop
#: CPU), and v stays the model's 0.05 (the setting docs/results-demo.md measured; the noise is
#: drawn at that v).
EXAMPLE_SETTINGS: dict[str, Any] = {"steps": 1500, "obs_var_ratio": 0.0}


def resolve_config(vae: VAEAdapter | None, cfg: TuneConfig | None = None, *,
                   example: bool = False) -> Resolved:
    """Every setting of ``cfg`` filled, with where it came from (see :mod:`selfconsist.settings`).

    Layers, later ones winning: the declared defaults; the family's ``tune_defaults``; with
    ``--images``, the family's ``tune_defaults_images`` (the data-light recipe); the bundled
    example's settings; and last what ``cfg`` sets. A family's ``prior_refine`` does not apply
    when z₀ comes from a file or images, nor its ``refine_reuse`` when nothing is refined.
    """
    cfg = cfg or TuneConfig()
    family = dict(getattr(vae, "tune_defaults", {}))
    layers: list[tuple[str, dict[str, Any]]] = [("family", family)]
    if cfg.latents or cfg.images:
        family.pop("prior_refine", None)
    if cfg.latents or cfg.images or cfg.prior_refine == 0:  # nothing refined to reuse
        family.pop("refine_reuse", None)
    if cfg.images:
        layers.append(("family", dict(getattr(vae, "tune_defaults_images", {}))))
    if example:
        layers.append(("example", EXAMPLE_SETTINGS))
    return resolve(cfg, *layers)


@dataclass
class TuneResult:
    vae: VAEAdapter
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    out: Path | None = None
    #: Mean |μ_tuned − μ_base| in base-latent standard deviations on the first 64 --images (None
    #: without them: `selfconsist eval --compare --data` measures it on held-out real images).
    latent_shift: dict[str, float] | None = None
    #: The tuned model in the kind the caller passed: for an in-memory diffusers/pythae model
    #: the tuned copy (in the caller's dtype and device); otherwise the adapter (``vae``).
    model: Any = None
    #: Every setting that ran, and where it came from (default, family, example, option).
    settings: Resolved | None = None
    #: The observation variance v the likelihood used (after --obs-var-ratio).
    obs_var: float | None = None
    #: One line when the sample round trip did not improve clearly, naming the option to try.
    advice: str | None = None


def lr_factor(step: int, cfg: TuneConfig) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then the schedule."""
    warmup, steps = cfg.warmup_steps or 0, cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        return 1.0 - t
    return 1.0


def latent_shift(mu_base: Tensor, mu_tuned: Tensor) -> dict[str, float]:
    """Mean and standard error of the per-image latent shift (base-latent std units)."""
    per = latent_shift_per_image(mu_base, mu_tuned, channel_std(mu_base))
    se = float(per.std() / math.sqrt(per.numel())) if per.numel() > 1 else float("nan")
    return {"value": float(per.mean()), "stderr": se}


def adapted_obs_var(cfg: TuneConfig, vae: VAEAdapter, before: dict[str, Any]) -> float:
    """The v the likelihood uses: ``--obs-var`` if given; else, for the avae objective, the
    model's v lowered to K·e₀ (K = ``obs_var_ratio``, e₀ the sample round-trip error per
    element before tuning) when it is larger. A v that high weighs the very error tuning should remove at almost
    nothing against the KL and coupling terms, and the round trip does not move."""
    if cfg.obs_var is not None:
        return float(cfg.obs_var)
    v = float(vae.obs_var)
    e0 = float(before.get("sample_roundtrip_mse", {}).get("value", math.nan))
    if cfg.objective != "avae" or vae.likelihood != "gaussian" or not cfg.obs_var_ratio or not e0 > 0:
        return v  # (the cycle loss is scaled by 1/v only: v would reweigh it against its anchor)
    return min(v, cfg.obs_var_ratio * e0)


#: A round trip that falls by less than this share (or within its noise) earns the advice line.
ADVICE_BELOW = 0.10


def advice_line(cfg: TuneConfig, vae: VAEAdapter, obs_var: float, before: dict[str, Any],
                after: dict[str, Any]) -> str | None:
    """One line when the sample round trip fell by less than 10%, within its noise or rose:
    says so and names the option to try (docs/results-pythae.md shows that it works). None otherwise."""
    from .report import BETTER, WORSE, verdict

    key = "sample_roundtrip_mse"
    if cfg.objective != "avae" or key not in before or key not in after:
        # The cycle objective aims at real images' encode → decode loops, which the sample round
        # trip does not measure (eval --data does), and its sweep found no lr or step count that
        # helps (docs/latent-diffusion.md): advice there would be unmeasured and wrong.
        return None
    v = verdict(key, before[key], after[key])
    if v.verdict == BETTER and v.after <= (1 - ADVICE_BELOW) * v.before:
        return None
    how = {BETTER: "by under 10%", WORSE: "for the worse"}.get(v.verdict, "within noise")
    what = f"tune: the sample round trip changed {v.change_text()} ({how}); "
    if vae.likelihood == "gaussian":
        suggest = float(f"{min(obs_var / 10, 2.0 * v.before):.1g}")  # one significant digit
        return what + (f"try --obs-var {suggest:g} (this run used v = {obs_var:.3g}; the model's "
                       f"own round-trip error is {v.before:.2g} per element)")
    return what + f"try --lambda-rec {4 * cfg.lambda_rec:g} (a sharper likelihood on the samples)"


def measurement_plan(vae: VAEAdapter, cfg: TuneConfig) -> MeasurementPlan:
    """The before/after measurement sized to this run (see :mod:`selfconsist.budget`)."""
    return plan_measurement(cfg.steps, cfg.batch_size, tuple(vae.latent_shape), cfg.eval_samples)


class TuneRecipe:
    """One tuning run, its state on ``self``; :func:`tune` calls the methods in order."""

    def __init__(self, vae: VAEAdapter, settings: Resolved, out: Path | None, *, resume: bool,
                 overwrite: bool, progress: bool, metadata: dict[str, str] | None) -> None:
        self.vae, self.settings, self.cfg = vae, settings, settings.config
        self.out, self.resume, self.overwrite, self.metadata = out, resume, overwrite, metadata or {}
        self.state_file = state_path_for(out) if out is not None else None
        self.progress, self.step = progress, 0
        self.before: dict[str, Any] = {}
        self.responsive: Tensor | None = None
        self.mu_base: Tensor | None = None

    def setup(self) -> None:
        """Device, process group, precision, frozen decoder, z₀ source, optimiser."""
        cfg, vae = self.cfg, self.vae
        device = resolve_device(cfg.device)
        # torchrun: join the process group; rank 0 alone measures, prints and writes
        self.dist = distributed.setup(device)
        self.device = device = self.dist.place(device)
        keep_freed_memory(device)  # no page faults for each step's buffers on CPU
        self.progress = self.progress and self.dist.is_main
        # auto → bf16 where it pays; the model-size limit was measured on the built-in MLP only
        size = vae.num_parameters()[0] if mlp_step.is_builtin_mlp(vae) else None
        self.precision = resolve_precision(device, cfg.precision, size)
        autocast(device, self.precision)  # validates precision against the device early
        vae.to(device)
        vae.set_prior(cfg.prior)
        vae.freeze_decoder()
        vae.set_encoder_mode(False)  # dropout/normalisation statistics stay as trained
        self.input_sha = sha256_file(vae.source.path) if vae.source.path and Path(vae.source.path).exists() else None
        self.images = load_images(cfg.images, vae, cfg.fit) if cfg.images else None
        # The frozen base model refines prior draws, or is the anchor's reference off --images.
        needs_base = cfg.prior_refine > 0 or (cfg.anchor > 0 and self.images is None)
        self.base = frozen_copy(vae) if needs_base else None
        self.source = Z0Source(vae, cfg, self.base, self.images)
        self.anchor_q = self.source.posteriors if cfg.anchor > 0 and self.images is not None else None
        self.objective = posthoc.OBJECTIVES[cfg.objective]
        self.decoder_before = [p.detach().to("cpu", copy=True) for p in vae.decoder_parameters()]
        self.plan = measurement_plan(vae, cfg)
        self.params = [p for p in vae.encoder_parameters() if p.requires_grad]
        if not self.params:
            raise SelfconsistError("the adapter exposes no trainable encoder parameters")
        self.fast = cpu_fast_path(device, self.precision)
        self.opt = adam(self.params, cfg.lr, device)
        # The built-in MLP's step differentiated by hand (mlp_step.py): the same terms, faster.
        hand = mlp_step.ENABLED["on"] and mlp_step.tune_supports(vae, cfg, self.precision, self.dist.world_size)
        self.hand = mlp_step.MLPTuneStep(vae, cfg, self.precision) if hand else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, self.dist.rank))

    def begin(self) -> None:
        """Resume from the saved state, or measure the base model and save the state at once
        (on an SD-size model the measurement takes minutes; a kill after it loses nothing)."""
        if self.resume:
            self._load_state()
        elif self.dist.is_main:  # rank 0 measures; the others go straight to the first collective
            vae, cfg, plan = self.vae, self.cfg, self.plan
            with stage("tune: measuring before: decoder responses", self.progress, plan.describe()):
                d = math.prod(vae.latent_shape)
                self.responsive = responsive_elements(
                    vae, torch.Generator().manual_seed(cfg.seed + 2), n=plan.probe_samples,
                    max_elements=d if plan.probe_mode == "element" else 0)
            with stage("tune: measuring before: round trip", self.progress):
                self.before = roundtrip_summary(vae, n=plan.roundtrip_samples, seed=cfg.seed + 1,
                                                rho=cfg.rho, responsive=self.responsive)
                # Where real images move is what a diffusion model trained on the base latents
                # sees. Decoded samples are no proxy: moving their latents is the point.
                if self.images is not None:
                    self.mu_base = encode_batched(vae, self.images[:SHIFT_SAMPLES])[0]
        self.dist.broadcast_(self.params)  # the same start on every rank, as DDP would ensure
        # v from the before-figures (rank 0 measured them; a resumed run restores them)
        cfg = self.cfg
        v = torch.tensor([adapted_obs_var(cfg, self.vae, self.before) if self.dist.is_main
                          else 0.0], dtype=torch.float64, device=self.device)
        self.dist.broadcast_([v])
        self.obs_var = float(v.item())
        if cfg.obs_var is None and self.obs_var != self.vae.obs_var:
            log.info("tune: observation variance v = %.3g (the model's %.3g is above %g× its own "
                     "round-trip error; --obs-var-ratio)", self.obs_var, self.vae.obs_var,
                     cfg.obs_var_ratio)
        if not self.resume:
            self.save_state()

    def _load_state(self) -> None:
        state = load_state(self.state_file, config=json_meta(asdict(self.cfg)), precision=self.precision,
                           added={"refine_reuse": 1})
        if state.get("input_sha256") != self.input_sha:
            raise SelfconsistError(f"{self.state_file} belongs to another input model")
        saved, dist = int(state.get("world_size", 1)), self.dist
        if saved != dist.world_size:  # each rank's z₀ stream lives in the state
            raise SelfconsistError(
                f"{self.state_file} was written by a {saved}-process run; resume it with {saved} "
                f"process(es) (torchrun --nproc-per-node {saved}), not {dist.world_size}")
        self.vae.load_encoder_state(state["encoder"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(self.gen, state["rng_ranks"][dist.rank] if dist.active else state["rng"])
        self.source.load_pool_state(state.get("z0_pools", [None] * saved)[dist.rank])
        self.step, self.before = int(state["step"]), state["before"]
        self.responsive, self.mu_base = state["responsive"], state["mu_base"]

    def save_state(self) -> None:
        """The resumable state of the last finished step (a collective: every rank calls it)."""
        if self.state_file is None:
            return
        rngs = self.dist.gather(rng_state(self.gen))
        pools = self.dist.gather(self.source.pool_state())  # refined draws kept for reuse, if any
        if self.dist.is_main:
            atomic_torch_save({"config": json_meta(asdict(self.cfg)), "step": self.step,
                               "input_sha256": self.input_sha, "before": self.before,
                               "responsive": self.responsive, "mu_base": self.mu_base,
                               "world_size": self.dist.world_size, "rng_ranks": rngs, "z0_pools": pools,
                               "encoder": self.vae.encoder_state(), "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict(), "rng": rngs[0],
                               "precision": self.precision}, self.state_file)

    def train_step(self) -> dict[str, Tensor]:
        """One optimiser step; returns the per-item terms and the loss (key ``loss``)."""
        cfg, dev = self.cfg, self.device
        if self.hand is not None:  # gradients set by the step itself
            with autocast(dev, self.precision):  # a refinement of z₀ runs in the step's precision
                z0, _ = self.source.sample(cfg.batch_size, self.gen)
            loss, terms = self.hand(z0, self.obs_var, self.gen)
            self._check_finite(loss)
        else:
            with autocast(dev, self.precision):  # refinement and iterates run in the step's precision
                z0, idx = self.source.sample(cfg.batch_size, self.gen)
                anchor_x = self.images[idx].to(dev) if self.anchor_q is not None else None
                anchor_b = tuple(t[idx].to(dev) for t in self.anchor_q) if self.anchor_q is not None else None
                terms = self.objective.terms(self.vae, z0, cfg, self.obs_var, self.gen, self.base,
                                             anchor_x, anchor_b)
            loss = self.objective.loss(terms, cfg)
            self._check_finite(loss)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.dist.average_gradients(self.params)  # (1/N) Σ_r g_r: N × B acts as one batch N·B
        self.opt.step()
        self.sched.step()
        return {**terms, "loss": loss}

    def _check_finite(self, loss: Tensor) -> None:
        try:
            check_finite(self.step, self.dist.mean(loss))  # every rank stops together
        except NonFiniteLossError as e:
            raise nonfinite_stop(e, self.out, self.state_file) from None

    def train(self) -> None:
        """The loop. A SIGINT/SIGTERM during a step is acted on at its end: the state of the
        last finished step is saved, so --resume continues from it."""
        cfg, signals = self.cfg, current_stop()
        if self.state_file is not None:
            signals.checkpoint = lambda: (self.save_state(), (self.step, self.state_file))[1]
        modules = self.vae.encoder_modules() + self.vae.decoder_modules()
        set_channels_last(modules, self.fast)
        bar_terms = _BarTerms(self.objective.headline, math.prod(self.vae.latent_shape))
        with Progress(cfg.steps, "tune", enabled=self.progress, start=self.step) as bar, signals.deferred():
            while self.step < cfg.steps:
                terms = self.train_step()
                self.step += 1
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_state()
                    log.debug("tune: saved the resumable state at step %d to %s", self.step, self.state_file)
                bar_terms.update(terms)
                if self.step % 10 == 1 or self.step == cfg.steps:
                    bar.update(self.step, bar_terms.shown(terms))
                if self.dist.active:  # a signal to any rank stops every rank after this same step
                    signals.signum = self.dist.agree_stop(signals.signum)
                signals.check()
        set_channels_last(modules, False)
        self._signals = signals

    def measure_after(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The same round-trip figures as before, the latent shift on --images, and the guard
        that the decoder is bit-for-bit the one loaded."""
        vae, cfg = self.vae, self.cfg
        with stage("tune: measuring after", self.progress):
            after = roundtrip_summary(vae, n=self.plan.roundtrip_samples, seed=cfg.seed + 1,
                                      rho=cfg.rho, responsive=self.responsive)
            shift = None
            if self.mu_base is not None:
                shift = latent_shift(self.mu_base, encode_batched(vae, self.images[:SHIFT_SAMPLES])[0])
                shift["on"] = f"the {min(len(self.images), SHIFT_SAMPLES)} --images"
                warning = shift_warning(shift["value"], shift["on"])
                if warning:
                    log.warning(warning)
        for p, p0 in zip(vae.decoder_parameters(), self.decoder_before, strict=True):
            if not torch.equal(p.detach().cpu(), p0):  # a guard on our promise, not expected to fire
                raise RuntimeError("the decoder changed during tuning; refusing to write the result")
        return after, shift

    def save_checkpoint(self, after: dict[str, Any], shift: dict[str, Any] | None) -> None:
        """OUT in the input's format, whole or absent, with the run's settings and figures."""
        vae, signals = self.vae, self._signals
        meta = {META_PREFIX + "tune_config": json_meta(asdict(self.cfg)),
                META_PREFIX + "tune_sources": json_meta(dict(self.settings.sources)),
                META_PREFIX + "version": __version__,
                META_PREFIX + "input_sha256": self.input_sha or "",
                META_PREFIX + "adapter": vae.name,
                META_PREFIX + "source": json_meta({"repo_id": vae.source.repo_id,
                                                   "revision": vae.source.revision,
                                                   "license": vae.source.license,
                                                   "format": vae.source.format}),
                META_PREFIX + "metrics": json_meta({"before": self.before, "after": after,
                                                    "latent_shift": shift}),
                META_PREFIX + "world_size": str(self.dist.world_size),
                META_PREFIX + "precision": self.precision,  # what ran (cfg says what was asked)
                META_PREFIX + "obs_var": repr(self.obs_var),  # the v that ran (--obs-var-ratio)
                **self.metadata}
        with signals.deferred():  # OUT is whole or absent; a signal now lets the run finish
            with atomic_output(self.out, overwrite=self.overwrite) as tmp:
                vae.save(tmp, meta)
            signals.checkpoint = None
            if self.state_file is not None:
                self.state_file.unlink(missing_ok=True)


class _BarTerms:
    """The progress bar's figures: the loss, a running headline term, then the other terms
    (the first ones are what an 80-column bar keeps)."""

    def __init__(self, headline: str, latent_dim: int) -> None:
        self.headline, self.d, self.running = headline, latent_dim, None

    def update(self, terms: dict[str, Tensor]) -> None:
        """Every step: the running mean of the headline term."""
        value = terms[self.headline].mean().item()
        if self.headline == "coupling":  # −C(x)/d, the coupling KL per latent element
            value = -value / self.d
        self.running = value if self.running is None else 0.95 * self.running + 0.05 * value

    def shown(self, terms: dict[str, Tensor]) -> dict[str, float]:
        if self.headline == "coupling":  # the AVAE bar: its terms in their usual order
            name, rest = "cons/elem", {"log_lik": terms["log_lik"], "kl": terms["kl"],
                                       "C": terms["coupling"], **({"anchor": terms["anchor"]}
                                                                  if "anchor" in terms else {})}
        else:
            name, rest = self.headline, {k: v for k, v in terms.items() if k not in ("loss", self.headline)}
        return {"loss": terms["loss"].item(), name: self.running, **{k: v.mean().item() for k, v in rest.items()}}


@locks_output
@stoppable("tune")
def tune(vae: VAEAdapter | Any, cfg: TuneConfig | None = None, out: str | Path | None = None, *,
         resume: bool = False, overwrite: bool = False, progress: bool = True,
         metadata: dict[str, str] | None = None, example: bool = False,
         advise: bool = True) -> TuneResult:
    """Tune ``vae``'s encoder; write it to ``out`` if given.

    ``vae`` is anything :func:`selfconsist.load` takes. An adapter is tuned in place; a path
    or Hub id is loaded first; an in-memory diffusers or pythae model is tuned on a copy and
    never changed, and ``result.model`` is that tuned copy in the caller's dtype and device.
    Settings ``cfg`` leaves unset take the model family's defaults (``result.settings``).
    When the sample round trip did not clearly improve, ``result.advice`` names the option to
    try, and ``advise`` logs it as a warning (the CLI prints it after its table instead).
    """
    from .loading import as_adapter, native_like

    given, vae = vae, as_adapter(vae)
    settings = resolve_config(vae, cfg, example=example)
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    if resume and out is None:
        raise SelfconsistError("resume needs an output path (its state lives beside it)")
    src = vae.source.path
    if out is not None and src is not None and Path(src).resolve() == out.resolve():
        raise SelfconsistError(f"--out {out} is the input model; the input is never modified")

    recipe = TuneRecipe(vae, settings, out, resume=resume, overwrite=overwrite,
                        progress=progress, metadata=metadata)
    recipe.setup()
    recipe.begin()
    recipe.train()
    if not recipe.dist.is_main:  # the encoders are identical on every rank; rank 0 writes
        return TuneResult(vae=vae, before={}, after={}, model=native_like(vae, given), settings=settings)
    after, shift = recipe.measure_after()
    if out is not None:
        recipe.save_checkpoint(after, shift)
    advice = advice_line(recipe.cfg, vae, recipe.obs_var, recipe.before, after)
    if advice and advise:
        log.warning(advice)
    return TuneResult(vae=vae, before=recipe.before, after=after, out=out, latent_shift=shift,
                      model=native_like(vae, given), settings=settings, obs_var=recipe.obs_var,
                      advice=advice)
