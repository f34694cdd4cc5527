"""Built-in VAEs: the paper's MLP and a small convolutional VAE.

Both encoders output (μ, log σ²) of a diagonal Gaussian over a flat latent; both
decoders end in a sigmoid, so data live in [0, 1]. The architecture is fully
described by a :class:`ModelConfig`, which is stored in the checkpoint header.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import runtime
from .errors import CheckpointError, SelfconsistError
from .validate import require_finite

ARCHS = ("mlp", "conv")
#: Weight initialisations of a fresh built-in model: ``haiku`` (the default, see
#: :func:`init_weights`) or ``torch`` (PyTorch's layer defaults, selfconsist before 0.x).
INITS = ("haiku", "torch")


@dataclass
class ModelConfig:
    """Architecture of a built-in VAE.

    ``hidden``/``depth`` size the MLP (the paper's is 4×200); ``channels`` are the
    conv widths, one stride-2 stage each. ``obs_var`` is the Gaussian observation
    variance v the model was trained with.
    """

    arch: str = "mlp"
    data_shape: tuple[int, ...] = (1, 8, 8)
    latent_dim: int = 64
    hidden: int = 200
    depth: int = 4
    channels: tuple[int, ...] = (32, 64)
    likelihood: str = "gaussian"
    obs_var: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_finite(self)  # e.g. "obs_var": NaN in a checkpoint header
        self.data_shape = tuple(int(s) for s in self.data_shape)
        self.channels = tuple(int(c) for c in self.channels)
        if self.arch not in ARCHS:
            raise SelfconsistError(f"unknown architecture {self.arch!r}; choose one of {ARCHS}")
        if len(self.data_shape) != 3:
            raise SelfconsistError(f"data_shape must be (C, H, W), got {self.data_shape}")
        if self.likelihood not in ("gaussian", "bernoulli"):
            raise SelfconsistError(f"likelihood must be gaussian or bernoulli, got {self.likelihood}")
        if self.arch == "conv":
            c, h, w = self.data_shape
            k = 2 ** len(self.channels)
            if h > 64 or w > 64:
                raise SelfconsistError(f"the conv VAE takes images up to 64×64, got {h}×{w}")
            if h % k or w % k:
                raise SelfconsistError(
                    f"the conv VAE with {len(self.channels)} stages needs H and W divisible by {k}, "
                    f"got {h}×{w}; use fewer --channels or the mlp model"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_shape"] = list(self.data_shape)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


def _onednn_linear_op() -> Any:
    """oneDNN's dense fp32 linear (``torch.ops.mkldnn._linear_pointwise``), or None where this
    PyTorch build lacks it."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _onednn_is_faster() -> bool:
    """Whether this CPU is one where oneDNN's fp32 gemm beats PyTorch's default (MKL): AMD CPUs
    whose AVX-512 units are full width (Zen 5, family 26 and later). Off Intel CPUs MKL runs its
    AVX2 kernels, which on a Zen 5 use half of each vector unit; Zen 4 (family 25) executes
    AVX-512 on 256-bit units, so there AVX2 loses nothing.
    Measured (docs/performance.md), train step, in-process A/B:
    - AVX-512 AMD EPYC of the first sessions (family not recorded; MKL's 1024³ sgemm at
      58–69 GFLOP/s against oneDNN's 129–143, the two-to-one of a full-width unit): oneDNN 1.2×;
    - Zen 4 EPYC (family 25; MKL 85–91 against oneDNN 106 at 1024³, level at the MLP's
      shapes): MKL 1.06× (hand-derived step) and 1.07–1.10× (autograd);
    - AVX2-only AMD EPYC: MKL 1.07×; AVX-512 Intel Xeon: MKL 1.22–1.27×.
    A fixed property of the machine, so a resumed run takes the same path and stays
    bit-identical."""
    try:
        wide = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except (AttributeError, RuntimeError):
        return False
    family = runtime.cpu_family()
    return wide and runtime.cpu_vendor() == "AuthenticAMD" and family is not None and family >= 26


#: Whether built-in models run their fp32 CPU linear layers (forward and backward) on oneDNN:
#: where the build has it and the CPU is an AMD one with full-width AVX-512 (:func:`_onednn_is_faster`).
#: :func:`use_onednn_linear` switches it (the tests and benchmarks).
ONEDNN_LINEAR = {"on": _ONEDNN_LINEAR is not None and _onednn_is_faster()}
#: The smallest product (batch × in × out multiply-adds) that goes to oneDNN: below it the
#: custom autograd node's overhead outweighs the faster gemm (on the dev machine oneDNN was
#: 0.5–0.9× MKL per layer for products under ~1.5 M, 1.1–2× above 2.5 M; docs/performance.md),
#: so the bundled digits VAE (at most 128×96×96) keeps PyTorch's default path.
ONEDNN_MIN_MACS = 1 << 21


def use_onednn_linear(on: bool) -> bool:
    """Route built-in models' fp32 CPU linear layers through oneDNN (``on``) or PyTorch's default
    gemm; returns whether oneDNN is in use (False where the build has no oneDNN linear)."""
    ONEDNN_LINEAR["on"] = bool(on) and _ONEDNN_LINEAR is not None
    return ONEDNN_LINEAR["on"]


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b on oneDNN, with the two backward products on oneDNN too:
    ∂x = ∂y W and ∂W = ∂yᵀ x (each only where its input needs a gradient), ∂b = Σ_batch ∂y."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable  # no double backward: an error, never a silently wrong second derivative
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            gw = _ONEDNN_LINEAR(grad.t(), x.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and initialisation) whose fp32 CPU
    product of a 2-D batch runs on oneDNN when :data:`ONEDNN_LINEAR` is on and the product has
    at least :data:`ONEDNN_MIN_MACS` multiply-adds; anything else (small products, autocast,
    GPU, other dtypes or shapes) is ``nn.Linear``'s own path."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (ONEDNN_LINEAR["on"] and x.dim() == 2 and x.device.type == "cpu"
                and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.shape[0] * w.shape[0] * w.shape[1] >= ONEDNN_MIN_MACS
                and not torch.is_autocast_enabled("cpu")):
            return _OneDNNLinearFn.apply(x, w, self.bias)
        return super().forward(x)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n_in = int(torch.tensor(cfg.data_shape).prod())
        self.net = _mlp([n_in] + [cfg.hidden] * cfg.depth + [2 * cfg.latent_dim])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.net(x.flatten(1)).chunk(2, dim=1)
        return mean, logvar


class MLPDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.data_shape = cfg.data_shape
        n_out = int(torch.tensor(cfg.data_shape).prod())
        self.net = _mlp([cfg.latent_dim] + [cfg.hidden] * cfg.depth + [n_out])

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(z)).view(-1, *self.data_shape)


class ConvEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.data_shape
        layers: list[nn.Module] = []
        for ch in cfg.channels:
            layers += [nn.Conv2d(c, ch, 4, stride=2, padding=1), nn.ReLU()]
            c = ch
        self.conv = nn.Sequential(*layers)
        k = 2 ** len(cfg.channels)
        self.head = _mlp([c * (h // k) * (w // k), cfg.hidden, 2 * cfg.latent_dim])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.head(self.conv(x).flatten(1)).chunk(2, dim=1)
        return mean, logvar


class ConvDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c_out, h, w = cfg.data_shape
        k = 2 ** len(cfg.channels)
        chans = list(reversed(cfg.channels))
        self.start = (chans[0], h // k, w // k)
        self.head = nn.Sequential(
            _mlp([cfg.latent_dim, cfg.hidden, chans[0] * (h // k) * (w // k)]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:] + [c_out], strict=True):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        layers.pop()  # no ReLU before the sigmoid
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.deconv(self.head(z).view(-1, *self.start)))


def fan_in(layer: nn.Module) -> int:
    """Inputs that feed one output unit: in_features (Linear), C_in·k_h·k_w (Conv2d and
    ConvTranspose2d; torch stores the transposed kernel as (C_in, C_out, k_h, k_w))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.in_channels * layer.weight[0, 0].numel()
    if isinstance(layer, nn.Conv2d):
        return layer.weight[0].numel()
    raise TypeError(f"no fan-in rule for {type(layer).__name__}")


@torch.no_grad()
def init_weights(module: nn.Module) -> nn.Module:
    """Haiku's default initialisation, in place, for every Linear/Conv2d/ConvTranspose2d:

        W ~ N(0, σ²) truncated to [−2σ, 2σ],  σ = 1/√fan_in;   b = 0

    (the truncated draw's own std is ≈ 0.88σ). Against PyTorch's default (uniform with bound
    1/√fan_in, std ≈ 0.58/√fan_in, and non-zero biases) it keeps activations' scale through the
    ReLU stack; on ColorMNIST it trains the paper's MLP to a markedly lower held-out
    reconstruction at the same steps (``examples/colormnist/init_comparison.md``).
    Draws from the global torch generator (seed it first, as :func:`new_model` does)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
            std = 1.0 / fan_in(layer) ** 0.5
            nn.init.trunc_normal_(layer.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if layer.bias is not None:
                layer.bias.zero_()
    return module


def build(cfg: ModelConfig, init: str = "haiku") -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for a config, initialised by ``init`` (one of :data:`INITS`)."""
    if init not in INITS:
        raise SelfconsistError(f"--init must be one of {INITS}, got {init!r}")
    if cfg.arch == "mlp":
        enc, dec = MLPEncoder(cfg), MLPDecoder(cfg)
    else:
        enc, dec = ConvEncoder(cfg), ConvDecoder(cfg)
    if init == "haiku":
        init_weights(enc)
        init_weights(dec)
    return enc, dec
