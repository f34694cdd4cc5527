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
    Progress,
    adam,
    check_finite,
    current_stop,
    flush_denormals,
    keep_freed_memory,
    nonfinite_stop,
    resolve_device,
    stoppable,
)
from .validate import require_finite


@dataclass
class TrainConfig:
    """Everything that defines a from-scratch run (stored in the checkpoint header)."""

    model: str = "mlp"
    data: str = "digits"
    objective: str = "vae"  # "vae" or "avae"
    rho: float = 0.975
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    latent_dim: int = 64
    hidden: int = 200
    depth: int = 4
    channels: tuple[int, ...] = (32, 64)
    obs_var: float = 0.05
    likelihood: str = "gaussian"
    n_train: int | None = None  # use only the first n items (e.g. 8000 of MNIST's test set)
    save_every: int = 500
    data_seed: int = 0  # ColorMNIST colours
    init: str = "haiku"  # or torch: PyTorch's layer defaults (selfconsist's init before issue 13)

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


def model_config(cfg: TrainConfig, data_shape: tuple[int, ...]) -> ModelConfig:
    return ModelConfig(arch=cfg.model, data_shape=data_shape, latent_dim=cfg.latent_dim,
                       hidden=cfg.hidden, depth=cfg.depth, channels=cfg.channels,
                       likelihood=cfg.likelihood, obs_var=cfg.obs_var)


def avae_step_terms(vae: BuiltinVAE, x: torch.Tensor, gen: torch.Generator, rho: float | None
                    ) -> dict[str, torch.Tensor]:
    """Per-item terms of the (A)VAE bound on a batch x; ``rho=None`` skips the coupling."""
    prior = vae.prior
    q = vae.encode(x)
    mh, lvh = obj.whiten(q.mean, q.logvar, prior.mean, prior.std)
    z = q.sample(gen)
    x_rec = vae.decode(z)
    terms = {
        "log_lik": obj.log_likelihood(x, x_rec, vae.likelihood, vae.obs_var),
        "kl": obj.kl_to_standard_normal(mh, lvh),
    }
    if rho is not None:
        q2 = vae.encode(x_rec.detach())  # stop-gradient: the decoder learns only from log_lik
        mh2, lvh2 = obj.whiten(q2.mean, q2.logvar, prior.mean, prior.std)
        terms["coupling"] = obj.coupling_term(mh, lvh, mh2, lvh2, rho)
    return terms


class AutogradStep:
    """The train step by autograd: the bound of :func:`avae_step_terms`, then ``backward`` into
    the parameters' ``.grad``. Returns ``(loss, terms)`` without their graphs, as
    :class:`selfconsist.mlp_step.MLPTrainStep` does (the built-in MLP's hand-derived step)."""

    def __init__(self, vae: BuiltinVAE, rho: float | None) -> None:
        self.vae, self.rho = vae, rho

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = avae_step_terms(self.vae, x, gen, self.rho)
        zero = torch.zeros((), device=x.device)
        loss = -obj.avae_objective(terms["log_lik"], terms["kl"], terms.get("coupling", zero), 1.0).mean()
        self.vae.encoder.zero_grad(set_to_none=True)
        self.vae.decoder.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in terms.items()}


def train_step(vae: BuiltinVAE, rho: float | None, hand: bool | None = None
               ) -> AutogradStep | mlp_step.MLPTrainStep:
    """The step ``train`` runs: the hand-derived one for the built-in MLP in fp32 on CPU (the
    same objective, 1.1–1.2× faster per step: docs/performance.md), autograd otherwise or when
    :data:`selfconsist.mlp_step.ENABLED` is off. ``hand`` overrides that switch for this call
    (the benchmarks compare the two steps; the hand-derived one still needs a model it supports)."""
    if (mlp_step.ENABLED["on"] if hand is None else hand) and mlp_step.supports(vae):
        return mlp_step.MLPTrainStep(vae, rho)
    return AutogradStep(vae, rho)


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
    params = list(vae.encoder_parameters()) + list(vae.decoder_parameters())
    opt = adam(params, cfg.lr, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0

    if resume:
        state = load_state(state_file, config=json_meta(asdict(cfg)))
        vae.encoder.load_state_dict(state["encoder"])
        vae.decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(gen, state["rng"])
        start = int(state["step"])

    def save_state(step: int) -> None:
        atomic_torch_save({"config": json_meta(asdict(cfg)), "step": step,
                           "encoder": vae.encoder.state_dict(), "decoder": vae.decoder.state_dict(),
                           "optimizer": opt.state_dict(), "rng": rng_state(gen)}, state_file)

    # SIGINT/SIGTERM: acted on at the end of the step in progress; the state of the last
    # finished step is saved so that --resume continues from it.
    signals, done = current_stop(), start

    def checkpoint() -> tuple[int, Path]:
        save_state(done)
        return done, state_file

    signals.checkpoint = checkpoint
    rho = cfg.rho if cfg.objective == "avae" else None
    step_fn = train_step(vae, rho)
    vae.encoder.train()
    vae.decoder.train()
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

    vae.encoder.eval()
    vae.decoder.eval()
    vae.to("cpu")
    meta = {META_PREFIX + "train_config": json_meta(asdict(cfg)),
            META_PREFIX + "version": __version__,
            META_PREFIX + "data": json.dumps({"name": data.name, "n": int(x_all.shape[0])})}
    with signals.deferred():  # OUT is whole or absent; a signal now lets the run finish
        with atomic_output(out, overwrite=overwrite) as tmp:
            vae.save(tmp, meta)
        signals.checkpoint = None
        state_file.unlink(missing_ok=True)
    return vae
