"""Post-hoc, data-free self-consistency tuning of a pretrained VAE's encoder.

The whole recipe, top to bottom (notation of ``shared/design/avae.md``):

    z₀ ~ p(z)                       (or refined, or a latents file, or image posteriors)
    x  = g(z₀)                      frozen decoder, no gradient
    q  = q(z|x),  z = μ + ε·σ       the encoder being tuned
    x̃  = g(z)                       gradient reaches μ, σ through z (λ_rec > 0)
    q′ = q(z′|sg[x̃])                re-encoding of the decoded sample
    maximise  λ_rec·log p(x|z) − KL(q ‖ p) + C(x) − a·KL(q ‖ q_base)   over the encoder only

Where z₀ comes from (:class:`Z0Source`): the prior; the prior *refined* by the frozen base
encoder, z ← μ_base(g(z)) a few times, which is still data-free but lands z₀ where the encoder
puts decoded images (a sharp VAE's aggregate posterior is far from any Gaussian); a latents
file; or the posteriors of a folder of the user's own images. The optional anchor (weight
a > 0) keeps the tuned encoder's posterior near the frozen base encoder's on the anchor inputs
(the user's images when given, else the decoded samples), so that latents a diffusion model was
trained on stay where they were.

The decoder is frozen (eval mode, ``requires_grad=False``, not in the optimiser)
and checked to be bit-for-bit unchanged before anything is written. A resumable
state (encoder, optimiser, scheduler, RNG streams, step) is written atomically
every ``save_every`` steps beside OUT; ``resume=True`` continues from it and ends
at exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed
from . import objective as obj
from ._version import __version__
from .adapters.base import VAEAdapter, randn
from .budget import MeasurementPlan, plan_measurement
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
from .metrics import responsive_elements, roundtrip_summary
from .realimage import channel_std, latent_shift_per_image, shift_warning
from .runtime import (
    PRECISIONS,
    Progress,
    adam,
    autocast,
    check_finite,
    cpu_fast_path,
    current_stop,
    log,
    nonfinite_stop,
    resolve_device,
    resolve_precision,
    set_channels_last,
    stage,
    stoppable,
)
from .validate import require_finite

SCHEDULES = ("constant", "cosine", "linear")
SHIFT_SAMPLES = 64  # --images on which tune measures the latent shift (two encoder passes)


@dataclass
class TuneConfig:
    """Settings of a post-hoc tuning run. The defaults are the ones justified by
    ``examples/colormnist/`` (see the README's table)."""

    rho: float = 0.975  # coupling strength; re-encodings must land within √(1−ρ²) of ρu
    # Weight of log p(x|z) on model samples. 1 is the faithful AVAE bound; model samples are
    # noise-free decoder means, so a sharper likelihood (5 ≙ v/5) is justified, and on the
    # ColorMNIST VAE it is what keeps both the round-trip gain and the robustness gain.
    lambda_rec: float = 5.0
    steps: int = 5000
    batch_size: int = 128
    lr: float = 1e-4
    # Cosine decay: the late, slow phase is where robustness is lost and unused units collapse.
    schedule: str = "cosine"  # constant, cosine or linear decay, after warmup
    warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    # or bf16 (autocast; CUDA or a CPU with bf16 units), or auto: bf16 where the hardware has it
    precision: str = "fp32"
    obs_var: float | None = None  # None: the model's own observation variance
    sample_noise: bool = False  # add N(0, v) observation noise to decoded samples
    prior: str | None = None  # None: the adapter's default prior
    latents: str | None = None  # sample z₀ from this file instead of the prior
    images: str | None = None  # or from the base posteriors of this folder of images
    fit: str = "crop"  # how --images of another size are brought to the model's (crop or tile)
    prior_refine: int = 0  # refine prior draws by z ← μ_base(g(z)) this many times
    anchor: float = 0.0  # weight a of KL(q_tuned(z|x) ‖ q_base(z|x)) on the anchor inputs
    save_every: int = 500
    eval_samples: int | None = None  # before/after round-trip samples; None: sized to the run

    def __post_init__(self) -> None:
        require_finite(self)
        if not 0.0 < self.rho < 1.0:
            raise SelfconsistError(f"--rho must lie in (0, 1), got {self.rho}")
        if self.lambda_rec < 0:
            raise SelfconsistError("--lambda-rec must be ≥ 0")
        for name in ("steps", "batch_size", "save_every", "eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SelfconsistError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0:
            raise SelfconsistError("--lr must be positive")
        if self.obs_var is not None and self.obs_var <= 0:
            raise SelfconsistError("--obs-var must be positive")
        if self.schedule not in SCHEDULES:
            raise SelfconsistError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prior_refine < 0:
            raise SelfconsistError("--prior-refine must be ≥ 0")
        if self.anchor < 0:
            raise SelfconsistError("--anchor must be ≥ 0")
        if self.fit not in ("crop", "tile"):
            raise SelfconsistError(f"--fit must be crop or tile, got {self.fit!r}")
        if self.latents and self.images:
            raise SelfconsistError("pass --latents or --images, not both")
        if self.prior_refine and (self.latents or self.images):
            raise SelfconsistError("--prior-refine refines prior draws; it does not apply to "
                                   "--latents or --images")
        if self.precision not in PRECISIONS:
            raise SelfconsistError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


    @classmethod
    def for_model(cls, vae: VAEAdapter | None, **settings: Any) -> TuneConfig:
        """The defaults for ``vae``'s family (``type(vae).tune_defaults``, chosen by evidence;
        see the README), overridden by every setting given that is not None."""
        given = {k: v for k, v in settings.items() if v is not None}
        family = dict(getattr(vae, "tune_defaults", {}))
        if given.get("latents") or given.get("images"):
            family.pop("prior_refine", None)  # it refines prior draws; z₀ comes from elsewhere
        return cls(**{**family, **given})


@dataclass
class TuneResult:
    vae: VAEAdapter
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    out: Path | None = None
    #: Mean |μ_tuned − μ_base| in base-latent standard deviations on the first 64 --images (None
    #: without them: `selfconsist eval --compare --data` measures it on held-out real images);
    #: see :func:`selfconsist.realimage.latent_shift_per_image`.
    latent_shift: dict[str, float] | None = None
    #: The tuned model in the kind the caller passed: for an in-memory diffusers/pythae model
    #: the tuned copy (in the caller's dtype and device); otherwise the adapter (``vae``).
    model: Any = None


def lr_factor(step: int, cfg: TuneConfig) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        return 1.0 - t
    return 1.0


def load_latents(path: str | Path, latent_shape: tuple[int, ...]) -> Tensor:
    """Latents (N, *latent_shape) from .npy, .pt (tensors only) or .safetensors (first tensor)."""
    path = Path(path)
    if not path.is_file():
        raise SelfconsistError(f"--latents {path}: no such file")
    try:
        if path.suffix == ".npy":
            import numpy as np

            z = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if not tensors:
                raise SelfconsistError(f"--latents {path}: the file holds no tensors")
            z = next(iter(tensors.values()))
        elif path.suffix in (".pt", ".pth"):
            z = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise SelfconsistError(f"--latents {path}: use .npy, .pt or .safetensors")
    except SelfconsistError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise SelfconsistError(f"--latents {path}: cannot read ({e})") from None
    if not isinstance(z, Tensor):
        raise SelfconsistError(f"--latents {path}: expected one tensor")
    z = z.float()
    if tuple(z.shape[1:]) != tuple(latent_shape) or z.shape[0] == 0:
        want = ", ".join(map(str, latent_shape))
        raise SelfconsistError(f"--latents {path}: shape {tuple(z.shape)}, expected (N, {want})")
    if not torch.isfinite(z).all():
        raise SelfconsistError(f"--latents {path}: contains NaN or Inf")
    return z


def load_images(folder: str | Path, vae: VAEAdapter, fit: str = "crop") -> Tensor:
    """A folder of images as a batch in the model's data shape and range (``--images``)."""
    from .data import load_image_folder

    path = Path(folder)
    if not path.is_dir():
        raise SelfconsistError(f"--images {path}: no such folder")
    try:
        data = load_image_folder(path, tuple(vae.data_shape), fit=fit, data_range=vae.data_range)
    except SelfconsistError as e:
        raise SelfconsistError(f"--images: {e}") from None
    return data.x


def _frozen_copy(vae: VAEAdapter) -> VAEAdapter:
    """A frozen deep copy: the base encoder for refinement and the anchor. It costs one more
    copy of the model's weights, and keeps the reference fixed while the encoder trains."""
    base = copy.deepcopy(vae)
    for p in base.encoder_parameters():
        p.requires_grad_(False)
    base.freeze_decoder()
    base.set_encoder_mode(False)
    return base


@torch.no_grad()
def _encode_all(vae: VAEAdapter, x: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(mean, logvar) of q(z|x) for a whole batch, in chunks, on the CPU."""
    means, logvars = [], []
    for i in range(0, x.shape[0], batch_size):
        q = vae.encode(x[i:i + batch_size].to(vae.device))
        means.append(q.mean.float().cpu())
        logvars.append(q.logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


class Z0Source:
    """Where the latents z₀ that are decoded into training samples come from.

    * ``prior``: z₀ ~ p(z), the adapter's prior (for diffusers models, the latent distribution
      the diffusion pipeline decodes from);
    * ``refined``: a prior draw followed by ``prior_refine`` steps of z ← μ_base(g(z)) through
      the frozen base model. Still data-free; the draws land where the encoder puts decoded
      images, which for a sharp VAE is far from the Gaussian;
    * ``latents``: rows of a user's latents file;
    * ``images``: z₀ = μ + σ·ε from the base posteriors of a user's images, encoded once.
    """

    def __init__(self, vae: VAEAdapter, cfg: TuneConfig, base: VAEAdapter | None = None,
                 images: Tensor | None = None) -> None:
        self.vae, self.cfg, self.base = vae, cfg, base
        self.latents = load_latents(cfg.latents, vae.latent_shape) if cfg.latents else None
        self.posteriors = _encode_all(vae, images) if images is not None else None
        self.kind = ("latents" if cfg.latents else "images" if images is not None
                     else "refined" if cfg.prior_refine else "prior")

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(z₀, indices of the images drawn or None)."""
        dev = self.vae.device
        if self.latents is not None:
            return self.latents[torch.randint(self.latents.shape[0], (n,), generator=gen)].to(dev), None
        if self.posteriors is not None:
            idx = torch.randint(self.posteriors[0].shape[0], (n,), generator=gen)
            mean, logvar = (t[idx].to(dev) for t in self.posteriors)
            return obj.reparameterize(mean, logvar, gen), idx
        z = self.vae.sample_prior(n, gen)
        if self.cfg.prior_refine:
            with torch.no_grad():
                for _ in range(self.cfg.prior_refine):
                    z = self.base.encode(self.base.decode(z).float()).mean.float()
        return z, None


def posthoc_terms(vae: VAEAdapter, z0: Tensor, cfg: TuneConfig, obs_var: float,
                  gen: torch.Generator, base: VAEAdapter | None = None,
                  anchor_x: Tensor | None = None,
                  anchor_q: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-item terms of L_post on a batch of latents z₀ (see the module docstring).

    With ``cfg.anchor > 0`` an ``anchor`` term KL(q_tuned(z|x) ‖ q_base(z|x)) is added: on
    ``anchor_x`` with the base posteriors ``anchor_q`` precomputed (the user's images), or else
    on the decoded samples x through the frozen ``base`` model (one more encoder forward).
    """
    prior = vae.prior
    with torch.no_grad():
        x = vae.decode(z0).float()
        if cfg.sample_noise:
            x = x + math.sqrt(obs_var) * randn(x.shape, gen, x.device)
    q = vae.encode(x)
    mh, lvh = obj.whiten(q.mean.float(), q.logvar.float(), prior.mean, prior.std)
    z = obj.reparameterize(q.mean.float(), q.logvar.float(), gen)
    if cfg.lambda_rec > 0:
        x_rec = vae.decode(z).float()  # the gradient reaches the encoder through z
        log_lik = obj.log_likelihood(x, x_rec, vae.likelihood, obs_var)
    else:  # cheaper: no backward pass through the decoder
        with torch.no_grad():
            x_rec = vae.decode(z).float()
        log_lik = torch.zeros(x.shape[0], device=x.device)
    q2 = vae.encode(x_rec.detach())  # x̃ is a constant: stop-gradient
    mh2, lvh2 = obj.whiten(q2.mean.float(), q2.logvar.float(), prior.mean, prior.std)
    terms = {"log_lik": log_lik, "kl": obj.kl_to_standard_normal(mh, lvh),
             "coupling": obj.coupling_term(mh, lvh, mh2, lvh2, cfg.rho)}
    if cfg.anchor > 0:
        if anchor_x is not None and anchor_q is not None:
            qa, (mb, lvb) = vae.encode(anchor_x), anchor_q
        else:
            qa = q
            with torch.no_grad():
                qb = base.encode(x)
            mb, lvb = qb.mean.float(), qb.logvar.float()
        terms["anchor"] = obj.kl_diagonal_gaussians(qa.mean.float(), qa.logvar.float(), mb, lvb)
    return terms


def _latent_shift(mu_base: Tensor, mu_tuned: Tensor) -> dict[str, float]:
    per = latent_shift_per_image(mu_base, mu_tuned, channel_std(mu_base))
    se = float(per.std() / math.sqrt(per.numel())) if per.numel() > 1 else float("nan")
    return {"value": float(per.mean()), "stderr": se}


def _responsive(vae: VAEAdapter, cfg: TuneConfig, plan: MeasurementPlan) -> Tensor:
    """Decoder-responsive latent elements: a fixed reference for the before/after table (the
    decoder does not change). Probed per element or per channel as ``plan`` says."""
    d = math.prod(vae.latent_shape)
    return responsive_elements(vae, torch.Generator().manual_seed(cfg.seed + 2),
                               n=plan.probe_samples,
                               max_elements=d if plan.probe_mode == "element" else 0)


def measurement_plan(vae: VAEAdapter, cfg: TuneConfig) -> MeasurementPlan:
    """The before/after measurement sized to this run (see :mod:`selfconsist.budget`)."""
    return plan_measurement(cfg.steps, cfg.batch_size, tuple(vae.latent_shape), cfg.eval_samples)


def _input_sha(vae: VAEAdapter) -> str | None:
    path = vae.source.path
    return sha256_file(path) if path is not None and Path(path).exists() else None


@locks_output
@stoppable("tune")
def tune(vae: VAEAdapter | Any, cfg: TuneConfig | None = None, out: str | Path | None = None, *,
         resume: bool = False, overwrite: bool = False, progress: bool = True,
         metadata: dict[str, str] | None = None) -> TuneResult:
    """Tune ``vae``'s encoder for self-consistency; write it to ``out`` if given.

    ``vae`` is anything :func:`selfconsist.load` takes. An adapter is tuned in place; a path
    or Hub id is loaded first; an in-memory diffusers or pythae model is tuned on a copy and
    never changed, and ``result.model`` is that tuned copy in the caller's dtype and device.
    """
    from .loading import as_adapter, native_like

    given, vae = vae, as_adapter(vae)
    cfg = cfg or TuneConfig()
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    if resume and out is None:
        raise SelfconsistError("resume needs an output path (its state lives beside it)")
    src = vae.source.path
    if out is not None and src is not None and Path(src).resolve() == out.resolve():
        raise SelfconsistError(f"--out {out} is the input model; the input is never modified")
    state_file = state_path_for(out) if out is not None else None

    device = resolve_device(cfg.device)
    # torchrun: join the process group; rank 0 alone measures, prints and writes (see distributed)
    dist = distributed.setup(device)
    device = dist.place(device)
    progress = progress and dist.is_main
    precision = resolve_precision(device, cfg.precision)  # auto → bf16 where the hardware has it
    autocast(device, precision)  # validates precision against the device early
    vae.to(device)
    vae.set_prior(cfg.prior)
    vae.freeze_decoder()
    vae.set_encoder_mode(False)  # dropout/normalisation statistics stay as trained
    obs_var = cfg.obs_var if cfg.obs_var is not None else vae.obs_var
    d = math.prod(vae.latent_shape)
    input_sha = _input_sha(vae)
    images = load_images(cfg.images, vae, cfg.fit) if cfg.images else None
    # The frozen base model is needed only to refine prior draws or to anchor on decoded samples.
    needs_base = cfg.prior_refine > 0 or (cfg.anchor > 0 and images is None)
    base = _frozen_copy(vae) if needs_base else None
    source = Z0Source(vae, cfg, base, images)
    anchor_q = source.posteriors if cfg.anchor > 0 and images is not None else None
    decoder_before = [p.detach().to("cpu", copy=True) for p in vae.decoder_parameters()]
    plan = measurement_plan(vae, cfg)

    params = [p for p in vae.encoder_parameters() if p.requires_grad]
    if not params:
        raise SelfconsistError("the adapter exposes no trainable encoder parameters")
    fast = cpu_fast_path(device, precision)
    opt = adam(params, cfg.lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, dist.rank))
    start = 0

    if resume:
        state = load_state(state_file, config=json_meta(asdict(cfg)))
        if state.get("input_sha256") != input_sha:
            raise SelfconsistError(f"{state_file} belongs to another input model")
        saved_world = int(state.get("world_size", 1))
        if saved_world != dist.world_size:  # each rank's z₀ stream lives in the state
            raise SelfconsistError(
                f"{state_file} was written by a {saved_world}-process run; resume it with "
                f"{saved_world} process(es) (torchrun --nproc-per-node {saved_world}), "
                f"not {dist.world_size}")
        vae.load_encoder_state(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(gen, state["rng_ranks"][dist.rank] if dist.active else state["rng"])
        start, before = int(state["step"]), state["before"]
        responsive = state["responsive"]
        mu_base = state["mu_base"]
    elif not dist.is_main:  # rank 0 measures; the others go straight to the first collective
        responsive, before, mu_base = None, {}, None
    else:
        # The measurement can take a while on a big model: say what it is doing, and how long.
        with stage("tune: measuring before: decoder responses", progress, plan.describe()):
            responsive = _responsive(vae, cfg, plan)
        with stage("tune: measuring before: round trip", progress):
            before = roundtrip_summary(vae, n=plan.roundtrip_samples, seed=cfg.seed + 1,
                                       rho=cfg.rho, responsive=responsive)
            # Where real images move is what a diffusion model trained on the base latents
            # sees. Decoded samples are no proxy: moving their latents is the point of tuning.
            mu_base = _encode_all(vae, images[:SHIFT_SAMPLES])[0] if images is not None else None

    def save_state(step: int) -> None:
        if state_file is not None:
            rngs = dist.gather(rng_state(gen))  # a collective: every rank calls save_state
            if not dist.is_main:
                return
            atomic_torch_save({"config": json_meta(asdict(cfg)), "step": step,
                               "input_sha256": input_sha, "before": before,
                               "responsive": responsive, "mu_base": mu_base,
                               "world_size": dist.world_size, "rng_ranks": rngs,
                               "encoder": vae.encoder_state(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": rngs[0]}, state_file)

    dist.broadcast_(params)  # the same start on every rank, as DDP would ensure

    # SIGINT/SIGTERM: a signal during a step is acted on at the step's end; anywhere after
    # this point the state of the last finished step is saved, so --resume continues from it.
    signals, done = current_stop(), start

    def checkpoint() -> tuple[int, Path | None]:
        save_state(done)
        return done, state_file

    if state_file is not None:
        signals.checkpoint = checkpoint
    modules = vae.encoder_modules() + vae.decoder_modules()
    set_channels_last(modules, fast)
    running = None
    with Progress(cfg.steps, "tune", enabled=progress, start=start) as bar, signals.deferred():
        for step in range(start, cfg.steps):
            z0, idx = source.sample(cfg.batch_size, gen)
            anchor_x = images[idx].to(device) if anchor_q is not None else None
            anchor_b = tuple(t[idx].to(device) for t in anchor_q) if anchor_q is not None else None
            with autocast(device, precision):
                terms = posthoc_terms(vae, z0, cfg, obs_var, gen, base, anchor_x, anchor_b)
            bound = obj.avae_objective(terms["log_lik"], terms["kl"], terms["coupling"],
                                       cfg.lambda_rec)
            loss = -bound.mean()
            if "anchor" in terms:
                loss = loss + cfg.anchor * terms["anchor"].mean()
            try:
                check_finite(step, dist.mean(loss))  # every rank stops together
            except NonFiniteLossError as e:
                raise nonfinite_stop(e, out, state_file) from None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(params)  # g = (1/N) Σ_r g_r: N × B acts as one batch N·B
            opt.step()
            sched.step()
            done = step + 1
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
                log.debug("tune: saved the resumable state at step %d to %s", step + 1, state_file)
            # Running consistency figure: −C(x)/d, the coupling KL per latent element.
            cons = -terms["coupling"].mean().item() / d
            running = cons if running is None else 0.95 * running + 0.05 * cons
            if step % 10 == 0 or step + 1 == cfg.steps:
                # The first terms are the ones an 80-column bar keeps.
                bar.update(step + 1, {"loss": loss.item(), "cons/elem": running,
                                      "log_lik": terms["log_lik"].mean().item(),
                                      "kl": terms["kl"].mean().item(),
                                      "C": terms["coupling"].mean().item(),
                                      **({"anchor": terms["anchor"].mean().item()}
                                         if "anchor" in terms else {})})
            if dist.active:  # a signal to any rank stops every rank after this same step
                signals.signum = dist.agree_stop(signals.signum)
            signals.check()

    set_channels_last(modules, False)
    if not dist.is_main:  # the encoders are identical on every rank; rank 0 measures and writes
        return TuneResult(vae=vae, before={}, after={}, out=None, model=native_like(vae, given))
    with stage("tune: measuring after", progress):
        after = roundtrip_summary(vae, n=plan.roundtrip_samples, seed=cfg.seed + 1, rho=cfg.rho,
                                  responsive=responsive)
        shift = None
        if mu_base is not None:
            shift = _latent_shift(mu_base, _encode_all(vae, images[:SHIFT_SAMPLES])[0])
            shift["on"] = f"the {min(len(images), SHIFT_SAMPLES)} --images"
            warning = shift_warning(shift["value"], shift["on"])
            if warning:
                logging.getLogger("selfconsist").warning(warning)
    for p, p0 in zip(vae.decoder_parameters(), decoder_before, strict=True):
        if not torch.equal(p.detach().cpu(), p0):  # a guard on our promise, not expected to fire
            raise RuntimeError("the decoder changed during tuning; refusing to write the result")

    if out is not None:
        meta = {META_PREFIX + "tune_config": json_meta(asdict(cfg)),
                META_PREFIX + "version": __version__,
                META_PREFIX + "input_sha256": input_sha or "",
                META_PREFIX + "adapter": vae.name,
                META_PREFIX + "source": json_meta({"repo_id": vae.source.repo_id,
                                                   "revision": vae.source.revision,
                                                   "license": vae.source.license,
                                                   "format": vae.source.format}),
                META_PREFIX + "metrics": json_meta({"before": before, "after": after,
                                                    "latent_shift": shift}),
                META_PREFIX + "world_size": str(dist.world_size),
                META_PREFIX + "precision": precision,  # what ran (cfg says what was asked)
                **(metadata or {})}
        with signals.deferred():  # OUT is whole or absent; a signal now lets the run finish
            with atomic_output(out, overwrite=overwrite) as tmp:
                vae.save(tmp, meta)
            signals.checkpoint = None
            if state_file is not None:
                state_file.unlink(missing_ok=True)
    return TuneResult(vae=vae, before=before, after=after, out=out, latent_shift=shift,
                      model=native_like(vae, given))
