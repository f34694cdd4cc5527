"""The public adapter protocol: what any VAE must expose to be tuned and evaluated.

To wrap your own model, subclass :class:`VAEAdapter` and implement the abstract
methods (see ``examples/custom_adapter.py``). selfconsist only ever talks to a
model through this class, so the objective, the tuning loop, the metrics and the
PGD attack work the same for every model family.

Shapes never include the batch dimension: ``latent_shape`` is ``(64,)`` for an
MLP VAE and ``(4, 32, 32)`` for a latent-diffusion autoencoder at 256×256.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..objective import reparameterize
from .options import LoadOptions


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's own device keeps a CPU generator usable (and its
    stream identical) whether the model runs on CPU or GPU.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag exp(logvar)), batched."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + ε·std (reparameterised, differentiable)."""
        return reparameterize(self.mean, self.logvar, generator)


@dataclass
class Prior:
    """p(z) = N(mean, diag std²); ``mean`` and ``std`` broadcast to ``latent_shape``."""

    mean: Tensor
    std: Tensor
    name: str = "nominal"
    description: str = "N(0, I)"

    def to(self, device: torch.device | str) -> Prior:
        return Prior(self.mean.to(device), self.std.to(device), self.name, self.description)


@dataclass
class SourceInfo:
    """Where a model came from; used for metadata and model cards."""

    path: Path | None = None
    format: str = ""
    repo_id: str | None = None
    revision: str | None = None
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class VAEAdapter(ABC):
    """A VAE seen through selfconsist's eyes.

    Subclasses set ``name`` (used by ``--adapter NAME``) and implement:

    * :meth:`encode` → :class:`DiagonalGaussian` over the latent;
    * :meth:`decode` → the decoder mean g(z), in ``data_range``;
    * :meth:`priors` → the priors on offer, first one the default;
    * :meth:`encoder_modules` / :meth:`decoder_modules` (the parameters follow from them);
    * :meth:`save` → write the model back in the format it was loaded from;
    * :attr:`latent_shape`, :attr:`data_shape`, :attr:`data_range`.

    Loadable adapters also implement :meth:`sniff` and :meth:`load` so the registry
    can find them from a checkpoint path, and name the :class:`LoadOptions` fields their
    ``load`` reads in :attr:`load_options`.
    """

    #: Registry name, e.g. ``"builtin"``.
    name: ClassVar[str] = ""
    #: The :class:`LoadOptions` fields :meth:`load` reads (besides ``trust_remote_code``, which
    #: every adapter takes). The registry refuses any other that is set, naming this adapter.
    load_options: ClassVar[frozenset[str]] = frozenset()
    #: ``"gaussian"`` (with :attr:`obs_var`) or ``"bernoulli"``.
    likelihood: str = "gaussian"
    #: Observation variance v of the Gaussian likelihood.
    obs_var: float = 1.0
    #: TuneConfig settings for this family that differ from the generic defaults, chosen by
    #: evidence (``tune.resolve_config`` applies them; explicit settings still win).
    tune_defaults: ClassVar[dict[str, Any]] = {}
    #: Applied on top of :attr:`tune_defaults` when the user passes ``--images`` (the
    #: data-light recipe of this family).
    tune_defaults_images: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self._prior_name: str | None = None
        self.source = SourceInfo()

    # --- discovery -------------------------------------------------------------------------
    @classmethod
    def sniff(cls, path: Path) -> bool:
        """True when ``path`` looks like a checkpoint this adapter loads. Must be cheap and
        must not execute or unpickle anything from the file."""
        return False

    @classmethod
    def format_of(cls, path: Path) -> str:
        """The ``source.format`` a load of ``path`` would report, as cheaply as :meth:`sniff`
        (model cards pick their loading instructions by it without loading the model)."""
        return ""

    @classmethod
    def load(cls, path: Path, options: LoadOptions | None = None) -> VAEAdapter:
        """Load the model at ``path``. The registry calls ``load(path, options=LoadOptions(…))``
        with only the fields in :attr:`load_options` (and ``trust_remote_code``) set."""
        raise NotImplementedError(f"adapter {cls.name!r} cannot load checkpoints from a path")

    # --- the model ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def data_shape(self) -> tuple[int, ...]: ...

    @property
    def data_range(self) -> tuple[float, float]:
        """(low, high) of valid inputs; PGD clips to it."""
        return (0.0, 1.0)

    @abstractmethod
    def encode(self, x: Tensor) -> DiagonalGaussian: ...

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor: ...

    @abstractmethod
    def encoder_modules(self) -> list[nn.Module]:
        """The modules whose parameters form the encoder (the only ones ``tune`` changes)."""

    @abstractmethod
    def decoder_modules(self) -> list[nn.Module]:
        """The modules whose parameters form the decoder (frozen by ``tune``)."""

    @abstractmethod
    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write the model to ``path`` in the format it was loaded from.

        ``metadata`` are string pairs to record (tune config, input hash, metrics).
        Callers pass a temporary path and rename it into place, so this need not be atomic.
        """

    # --- priors ----------------------------------------------------------------------------
    def priors(self) -> dict[str, Prior]:
        """The priors this model offers, by name; the first is the default."""
        shape = (1,) * len(self.latent_shape)
        dev = self.device
        return {"nominal": Prior(torch.zeros(shape, device=dev), torch.ones(shape, device=dev))}

    def set_prior(self, name: str | None) -> None:
        """Choose the prior by name (None: the default)."""
        from ..errors import SelfconsistError

        if name is not None and name not in self.priors():
            raise SelfconsistError(
                f"prior {name!r} is not offered by this model; choose one of {list(self.priors())}"
            )
        self._prior_name = name

    @property
    def prior(self) -> Prior:
        options = self.priors()
        name = self._prior_name or next(iter(options))
        return options[name]

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latents z₀ ~ p(z), shape (n, *latent_shape)."""
        p = self.prior
        eps = randn((n, *self.latent_shape), generator, self.device)
        return p.mean + p.std * eps

    # --- derived from the modules ------------------------------------------------------------
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.encoder_modules():
            yield from m.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.decoder_modules():
            yield from m.parameters()

    @property
    def device(self) -> torch.device:
        for p in self.encoder_parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> VAEAdapter:
        for m in self.encoder_modules() + self.decoder_modules():
            m.to(device)
        return self

    def set_encoder_mode(self, train: bool) -> None:
        for m in self.encoder_modules():
            m.train(train)

    def freeze_decoder(self) -> None:
        """Decoder in eval mode and no gradient into its parameters (gradients still flow
        *through* it to the encoder)."""
        for m in self.decoder_modules():
            m.eval()
            m.requires_grad_(False)

    def encoder_state(self) -> dict[str, Tensor]:
        """Encoder tensors (parameters and buffers) by name, for resumable checkpoints."""
        return {
            f"{i}.{k}": v.detach().clone()
            for i, m in enumerate(self.encoder_modules())
            for k, v in m.state_dict().items()
        }

    def load_encoder_state(self, state: Mapping[str, Tensor]) -> None:
        for i, m in enumerate(self.encoder_modules()):
            prefix = f"{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def checkpoint_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every encoder and decoder tensor (parameters and buffers), by the name the checkpoint
        gives it, for messages that point into the file. The default names them
        ``encoder.KEY`` / ``decoder.KEY`` (``encoder.I.KEY`` when there are several modules)."""
        for role, mods in (("encoder", self.encoder_modules()), ("decoder", self.decoder_modules())):
            for i, m in enumerate(mods):
                prefix = role if len(mods) == 1 else f"{role}.{i}"
                for k, t in m.state_dict().items():
                    yield f"{prefix}.{k}", t

    def describe(self) -> dict[str, Any]:
        """Architecture summary for ``selfconsist info``."""
        return {}

    # --- conveniences ----------------------------------------------------------------------
    def num_parameters(self) -> tuple[int, int]:
        enc = sum(p.numel() for p in self.encoder_parameters())
        dec = sum(p.numel() for p in self.decoder_parameters())
        return enc, dec


def check_finite_weights(vae: VAEAdapter, where: object) -> None:
    """Refuse a model with a NaN or Inf weight, naming the tensor.

    Every load passes through here: such a model measures NaN before tuning starts, and the
    tuning loop's stop on a NaN loss would then blame the learning rate. One reduction per
    tensor, so the check costs a fraction of reading the file.
    """
    for name, t in vae.checkpoint_tensors():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
            plural = "s" if nan + inf > 1 else ""
            raise CheckpointError(f"{where}: tensor {name} holds {what} value{plural}; the "
                                  "checkpoint is corrupt (re-download or re-export it)")
