"""Train a built-in VAE from scratch, as a plain VAE or as an AVAE (the paper's first mode).

One loop, top to bottom:

    x ~ data;  q = q(z|x);  z = μ + ε·σ;  x̃ = g(z)
    VAE:   maximise  log p(x|z) − KL(q ‖ p)
    AVAE:  maximise  log p(x|z) − KL(q ‖ p) + C(x),  C from q and the re-encoding q(z′|sg[x̃])

The decoder learns only from the reconstruction term: x̃ enters the coupling
through a stop-gradient. Mini-batches are drawn with a seeded generator whose
state is saved in the resumable state (OUT.state.pt), so ``resume`` replays exactly
the same stream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import mlp_step
from . import objective as obj
from ._version import __version__
from .adapters.builtin import BuiltinVAE, new_model
from .data import Dataset, load_dataset
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
    state_path_for,
)
from .models import INITS, ModelConfig
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
    flush_denormals,
    keep_freed_memory,
    nonfinite_stop,
    resolve_device,
    resolve_precision,
    set_channels_last,
    stoppable,
)
from .settings import option
from .validate import require_finite


@dataclass
class TrainConfig:
    """Everything that defines a from-scratch run (stored in the checkpoint header). Each field
    declares its default and help once; ``selfconsist train`` builds its options from them."""

    model: str = option("mlp", "Architecture: mlp (the paper's 4×200) or conv.", choices=("mlp", "conv"))
    data: str = option("digits", "digits, mnist:PATH, colormnist:PATH, a .npy/.npz file or an image folder.")
    objective: str = option("vae", "vae (plain ELBO) or avae (ELBO + coupling C(x)).", choices=("vae", "avae"))
    rho: float = option(0.975, "Coupling strength ρ in (0, 1) for --objective avae.")
    steps: int = option(3000, "Optimiser steps.")
    batch_size: int = option(64, "Mini-batch size.")
    lr: float = option(1e-3, "Adam learning rate.")
    seed: int = option(0, "Seed for initialisation and mini-batches.")
    device: str = option("auto", f"{DEVICES}.")
    precision: str = option("fp32", "fp32, bf16 (CUDA, or a CPU with bf16 units), or auto: bf16 where "
                            "it runs faster (the hardware; on CPU an MLP also needs ≥ "
                            f"{CPU_BF16_MIN_ENCODER_PARAMS:,} encoder parameters; OUT records which ran).",
                            choices=PRECISIONS)
    latent_dim: int = option(64, "Latent size.")
    hidden: int = option(200, "Hidden width.")
    depth: int = option(4, "Hidden layers per side (mlp).")
    channels: tuple[int, ...] = (32, 64)
    obs_var: float = option(0.05, "Gaussian observation variance v.")
    likelihood: str = option("gaussian", "gaussian or bernoulli.", choices=("gaussian", "bernoulli"))
    n_train: int | None = option(None, "Use only the first N items (e.g. 8000 of MNIST's test set).",
                                 metavar="N")
    save_every: int = option(500, "Save a resumable state every N steps.", metavar="N")
    data_seed: int = 0  # ColorMNIST colours
    init: str = option("haiku", "Weight init: haiku (truncated normal, std 1/√fan_in, zero biases; "
                       "trains better) or torch (PyTorch's layer defaults, the old init).", choices=INITS)

    def __post_init__(self) -> None:
        require_finite(self)
        if self.objective not in ("vae", "avae"):
            raise SelfconsistError(f"--objective must be vae or avae, got {self.objective!r}")
        if not 0.0 < self.rho < 1.0:
            raise SelfconsistError(f"--rho must lie in (0, 1), got {self.rho}")
        for name in ("steps", "batch_size", "save_every", "latent_dim", "hidden", "depth"):
            if getattr(self, name) <= 0:
                raise SelfconsistError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0 or self.obs_var <= 0:
            raise SelfconsistError("--lr and --obs-var must be positive")
        self.channels = tuple(self.channels)
        if self.init not in INITS:
            raise SelfconsistError(f"--init must be one of {INITS}, got {self.init!r}")
        if self.precision not in PRECISIONS:
            raise SelfconsistError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def model_config(cfg: TrainConfig, data_shape: tuple[int, ...]) -> ModelConfig:
    return ModelConfig(arch=cfg.model, data_shape=data_shape, latent_dim=cfg.latent_dim,
                       hidden=cfg.hidden, depth=cfg.depth, channels=cfg.channels,
                       likelihood=cfg.likelihood, obs_var=cfg.obs_var)


def _terms_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if autocast left it in a half type; fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def avae_step_terms(vae: BuiltinVAE, x: torch.Tensor, gen: torch.Generator, rho: float | None
                    ) -> dict[str, torch.Tensor]:
    """Per-item terms of the (A)VAE bound on a batch x; ``rho=None`` skips the coupling.

    Under bf16 autocast the networks run in bf16 and the terms in fp32 (the casts are no-ops
    outside autocast)."""
    prior = vae.prior
    q = vae.encode(x)
    mean, logvar = _terms_dtype(q.mean), _terms_dtype(q.logvar)
    mh, lvh = obj.whiten(mean, logvar, prior.mean, prior.std)
    z = obj.reparameterize(mean, logvar, gen)
    x_rec = _terms_dtype(vae.decode(z))
    terms = {
        "log_lik": obj.log_likelihood(x, x_rec, vae.likelihood, vae.obs_var),
        "kl": obj.kl_to_standard_normal(mh, lvh),
    }
    if rho is not None:
        q2 = vae.encode(x_rec.detach())  # stop-gradient: the decoder learns only from log_lik
        mh2, lvh2 = obj.whiten(_terms_dtype(q2.mean), _terms_dtype(q2.logvar), prior.mean, prior.std)
        terms["coupling"] = obj.coupling_term(mh, lvh, mh2, lvh2, rho)
    return terms


class AutogradStep:
    """The train step by autograd: the bound of :func:`avae_step_terms` (under bf16 autocast
    for ``precision="bf16"``), then ``backward`` into the parameters' ``.grad``. Returns
    ``(loss, terms)`` without their graphs, as :class:`selfconsist.mlp_step.MLPTrainStep` does
    (the built-in MLP's hand-derived step)."""

    def __init__(self, vae: BuiltinVAE, rho: float | None, precision: str = "fp32") -> None:
        self.vae, self.rho, self.precision = vae, rho, precision

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(x.device, self.precision):
            terms = avae_step_terms(self.vae, x, gen, self.rho)
        zero = torch.zeros((), device=x.device)
        loss = -obj.avae_objective(terms["log_lik"], terms["kl"], terms.get("coupling", zero), 1.0).mean()
        self.vae.encoder.zero_grad(set_to_none=True)
        self.vae.decoder.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in terms.items()}


def train_step(vae: BuiltinVAE, rho: float | None, hand: bool | None = None, precision: str = "fp32"
               ) -> AutogradStep | mlp_step.MLPTrainStep:
    """The step ``train`` runs: the hand-derived one for the built-in MLP on CPU, in fp32 or
    bf16 (the same objective, faster per step: docs/performance.md), autograd otherwise or when
    :data:`selfconsist.mlp_step.ENABLED` is off. ``hand`` overrides that switch for this call
    (the benchmarks compare the two steps; the hand-derived one still needs a model it
    supports). ``precision`` is a resolved one, fp32 or bf16."""
    if (mlp_step.ENABLED["on"] if hand is None else hand) and mlp_step.supports(vae):
        return mlp_step.MLPTrainStep(vae, rho, dtype=mlp_step.DTYPES[precision])
    return AutogradStep(vae, rho, precision)


@locks_output
@stoppable("train")
def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, data: Dataset | None = None) -> BuiltinVAE:
    """Train a built-in VAE and write it to ``out`` (one .safetensors with the config in its header)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SelfconsistError(f"{out} exists; pass --overwrite to replace it")
    state_file = state_path_for(out)
    device = resolve_device(cfg.device)
    keep_freed_memory(device)  # no page faults for each step's buffers on CPU

    data = data if data is not None else load_dataset(cfg.data, seed=cfg.data_seed)
    x_all = data.x[: cfg.n_train] if cfg.n_train else data.x
    x_all = x_all.to(device)
    vae = new_model(model_config(cfg, tuple(x_all.shape[1:])), seed=cfg.seed, init=cfg.init).to(device)
    # auto → bf16 where it pays (runtime.resolve_precision; the size limit is the MLP's)
    size = vae.num_parameters()[0] if mlp_step.is_builtin_mlp(vae) else None
    precision = resolve_precision(device, cfg.precision, size)
    autocast(device, precision)  # refuses bf16 where it cannot run, before any step
    params = list(vae.encoder_parameters()) + list(vae.decoder_parameters())
    opt = adam(params, cfg.lr, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0

    if resume:
        state = load_state(state_file, config=json_meta(asdict(cfg)), added={"precision": "fp32"},
                           precision=precision)
        vae.encoder.load_state_dict(state["encoder"])
        vae.decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(gen, state["rng"])
        start = int(state["step"])

    def save_state(step: int) -> None:
        atomic_torch_save({"config": json_meta(asdict(cfg)), "step": step,
                           "encoder": vae.encoder.state_dict(), "decoder": vae.decoder.state_dict(),
                           "optimizer": opt.state_dict(), "rng": rng_state(gen), "precision": precision},
                          state_file)

    # SIGINT/SIGTERM: acted on at the end of the step in progress; the state of the last
    # finished step is saved so that --resume continues from it.
    signals, done = current_stop(), start

    def checkpoint() -> tuple[int, Path]:
        save_state(done)
        return done, state_file

    signals.checkpoint = checkpoint
    rho = cfg.rho if cfg.objective == "avae" else None
    step_fn = train_step(vae, rho, precision=precision)
    vae.encoder.train()
    vae.decoder.train()
    modules = [vae.encoder, vae.decoder]
    set_channels_last(modules, cpu_fast_path(device, precision))  # oneDNN's bf16 conv layout
    with (Progress(cfg.steps, f"train {cfg.objective}", enabled=progress, start=start) as bar,
          signals.deferred(), flush_denormals(device)):
        for step in range(start, cfg.steps):
            idx = torch.randint(x_all.shape[0], (cfg.batch_size,), generator=gen)
            loss, terms = step_fn(x_all.index_select(0, idx.to(device)), gen)  # sets every .grad
            try:
                check_finite(step, loss)
            except NonFiniteLossError as e:
                raise nonfinite_stop(e, out, state_file) from None
            opt.step()
            done = step + 1
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
            if step % 10 == 0 or step + 1 == cfg.steps:
                bar.update(step + 1, {"loss": loss.item(),
                                      **{k: v.mean().item() for k, v in terms.items()}})
            signals.check()

    set_channels_last(modules, False)  # the contiguous layout that saving expects
    vae.encoder.eval()
    vae.decoder.eval()
    vae.to("cpu")
    meta = {META_PREFIX + "train_config": json_meta(asdict(cfg)),
            META_PREFIX + "version": __version__,
            META_PREFIX + "train_precision": precision,  # what ran (the config says what was asked)
            META_PREFIX + "data": json.dumps({"name": data.name, "n": int(x_all.shape[0])})}
    with signals.deferred():  # OUT is whole or absent; a signal now lets the run finish
        with atomic_output(out, overwrite=overwrite) as tmp:
            vae.save(tmp, meta)
        signals.checkpoint = None
        state_file.unlink(missing_ok=True)
    return vae
