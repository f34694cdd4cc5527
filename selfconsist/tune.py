"""Post-hoc, data-free self-consistency tuning of a pretrained VAE's encoder.

The whole recipe, top to bottom (notation of ``shared/design/avae.md``):

    z₀ ~ p(z)                       (or a row of a latents file)
    x  = g(z₀)                      frozen decoder, no gradient
    q  = q(z|x),  z = μ + ε·σ       the encoder being tuned
    x̃  = g(z)                       gradient reaches μ, σ through z (λ_rec > 0)
    q′ = q(z′|sg[x̃])                re-encoding of the decoded sample
    maximise  λ_rec·log p(x|z) − KL(q ‖ p) + C(x)      over the encoder only

The decoder is frozen (eval mode, ``requires_grad=False``, not in the optimiser)
and checked to be bit-for-bit unchanged before anything is written. A resumable
state (encoder, optimiser, scheduler, RNG streams, step) is written atomically
every ``save_every`` steps beside OUT; ``resume=True`` continues from it and ends
at exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__, distributed
from . import objective as obj
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
from .runtime import (
    PRECISIONS,
    Progress,
    adam,
    autocast,
    check_finite,
    cpu_fast_path,
    nonfinite_stop,
    resolve_device,
    resolve_precision,
    set_channels_last,
)
from .validate import require_finite

SCHEDULES = ("constant", "cosine", "linear")


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
        if self.precision not in PRECISIONS:
            raise SelfconsistError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class TuneResult:
    vae: VAEAdapter
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    out: Path | None = None
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


def posthoc_terms(vae: VAEAdapter, z0: Tensor, cfg: TuneConfig, obs_var: float,
                  gen: torch.Generator) -> dict[str, Tensor]:
    """Per-item terms of L_post on a batch of prior latents z₀ (see the module docstring)."""
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
    return {"log_lik": log_lik, "kl": obj.kl_to_standard_normal(mh, lvh),
            "coupling": obj.coupling_term(mh, lvh, mh2, lvh2, cfg.rho)}


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
    latents = load_latents(cfg.latents, vae.latent_shape) if cfg.latents else None
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
    elif not dist.is_main:  # rank 0 measures; the others go straight to the first collective
        responsive, before = None, {}
    else:
        if progress:  # the measurement can take a while on a big model: say what it is doing
            print(f"tune: measuring before ({plan.describe()})", file=sys.stderr, flush=True)
        responsive = _responsive(vae, cfg, plan)
        before = roundtrip_summary(vae, n=plan.roundtrip_samples, seed=cfg.seed + 1, rho=cfg.rho,
                                   responsive=responsive)

    def save_state(step: int) -> None:
        if state_file is not None:
            rngs = dist.gather(rng_state(gen))  # a collective: every rank calls save_state
            if not dist.is_main:
                return
            atomic_torch_save({"config": json_meta(asdict(cfg)), "step": step,
                               "input_sha256": input_sha, "before": before,
                               "responsive": responsive, "world_size": dist.world_size,
                               "rng_ranks": rngs,
                               "encoder": vae.encoder_state(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": rngs[0]}, state_file)

    dist.broadcast_(params)  # the same start on every rank, as DDP would ensure

    modules = vae.encoder_modules() + vae.decoder_modules()
    set_channels_last(modules, fast)
    running = None
    with Progress(cfg.steps, "tune", enabled=progress, start=start) as bar:
        for step in range(start, cfg.steps):
            if latents is None:
                z0 = vae.sample_prior(cfg.batch_size, gen)
            else:
                z0 = latents[torch.randint(latents.shape[0], (cfg.batch_size,), generator=gen)]
                z0 = z0.to(device)
            with autocast(device, precision):
                terms = posthoc_terms(vae, z0, cfg, obs_var, gen)
            bound = obj.avae_objective(terms["log_lik"], terms["kl"], terms["coupling"],
                                       cfg.lambda_rec)
            loss = -bound.mean()
            try:
                check_finite(step, dist.mean(loss))  # every rank stops together
            except NonFiniteLossError as e:
                raise nonfinite_stop(e, out, state_file) from None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(params)  # g = (1/N) Σ_r g_r: N × B acts as one batch N·B
            opt.step()
            sched.step()
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
            # Running consistency figure: −C(x)/d, the coupling KL per latent element.
            cons = -terms["coupling"].mean().item() / d
            running = cons if running is None else 0.95 * running + 0.05 * cons
            if step % 10 == 0 or step + 1 == cfg.steps:
                bar.update(step + 1, {"loss": loss.item(), "log_lik": terms["log_lik"].mean().item(),
                                      "kl": terms["kl"].mean().item(),
                                      "C": terms["coupling"].mean().item(), "cons/elem": running})

    set_channels_last(modules, False)
    if progress:
        print("tune: measuring after", file=sys.stderr, flush=True)
    if not dist.is_main:  # the encoders are identical on every rank; rank 0 measures and writes
        return TuneResult(vae=vae, before={}, after={}, out=None, model=native_like(vae, given))
    after = roundtrip_summary(vae, n=plan.roundtrip_samples, seed=cfg.seed + 1, rho=cfg.rho,
                              responsive=responsive)
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
                META_PREFIX + "metrics": json_meta({"before": before, "after": after}),
                META_PREFIX + "world_size": str(dist.world_size),
                META_PREFIX + "precision": precision,  # what ran (cfg says what was asked)
                **(metadata or {})}
        with atomic_output(out, overwrite=overwrite) as tmp:
            vae.save(tmp, meta)
        if state_file is not None:
            state_file.unlink(missing_ok=True)
    return TuneResult(vae=vae, before=before, after=after, out=out, model=native_like(vae, given))
