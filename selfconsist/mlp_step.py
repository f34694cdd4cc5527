r"""The built-in MLP's train step differentiated by hand: no autograd graph, one batch for both
encoder backward passes.

Why: at the paper's ColorMNIST size (MLP 4×200, latent 64, batch 64) the matrix products of an
autograd step are under half its time; the rest is Adam, autograd's bookkeeping and ~150 small
kernels with their allocations (``benchmarks/step_floor.py``). This step runs the same products with a few
dozen fused elementwise ops, and for the AVAE it stacks the two encoder passes (on x and on the
re-encoded x̃) into one backward of 2B rows, so the encoder's backward costs two products per
layer instead of four. The math is :mod:`selfconsist.objective`'s, differentiated by hand;
``tests/test_mlp_step.py`` checks value and gradient against autograd on those functions.

Per linear layer ℓ (ReLU between layers, none after the last):

    a_ℓ = h_{ℓ−1} W_ℓᵀ + b_ℓ,   h_ℓ = relu(a_ℓ)
    ∂W_ℓ = δ_ℓᵀ h_{ℓ−1},   ∂b_ℓ = Σ_rows δ_ℓ,   δ_{ℓ−1} = (δ_ℓ W_ℓ) ⊙ [h_{ℓ−1} > 0]

with δ_ℓ = ∂loss/∂a_ℓ and loss = −(1/B) Σ_items [λ log p(x|z) − KL(q ‖ p) + C(x)] (λ = 1 for
``train``, ``tune``'s λ_rec for :class:`MLPTuneStep`, whose decoder is frozen). The seeds of
the backward pass, in whitened units (μ̂ = (μ − m)/s, l̂ = log σ² − 2 log s, r = 1 − ρ²):

    decoder output x̃ = sigmoid(o):   ∂o = ∂x̃ ⊙ x̃(1 − x̃)
        Gaussian:  ∂x̃ = λ(x̃ − x)/(vB)
        Bernoulli: ∂x̃ = −λ(x/p − (1 − x)/(1 − p))/B with p = x̃ inside [ε, 1 − ε], 0 outside (the clamp)
    z = μ + e·σ:   ∂μ += ∂z,   ∂log σ² += ∂z ⊙ e·σ/2
    KL:            ∂μ̂ += μ̂/B,   ∂l̂ += (exp l̂ − 1)/(2B)
    C (AVAE):      ∂μ̂ += −ρ(μ̂′ − ρμ̂)/(rB),   ∂l̂ += ρ² exp l̂/(2rB)
                   ∂μ̂′ = (μ̂′ − ρμ̂)/(rB),     ∂l̂′ = (exp l̂′/r − 1)/(2B)
    whitening:     ∂μ = ∂μ̂/s,   ∂log σ² = ∂l̂

x̃ enters the re-encoding as a constant (the stop-gradient of :mod:`selfconsist.train`), so the
coupling's gradient reaches the encoder only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import models
from . import objective as obj
from .adapters.base import VAEAdapter, randn
from .adapters.builtin import BuiltinVAE

#: Whether ``train`` takes this step where it :func:`supports` the model; the tests and
#: ``benchmarks/step_floor.py`` switch it off to compare with the autograd step.
ENABLED = {"on": True}


def supports(vae: BuiltinVAE) -> bool:
    """Whether :class:`MLPTrainStep` can run this model: the built-in MLP in fp32 on CPU (the
    only device it was measured on), whose ``encode``/``decode`` are the built-in ones (a
    subclass that overrides them keeps the autograd step, which calls them)."""
    own = type(vae).encode is BuiltinVAE.encode and type(vae).decode is BuiltinVAE.decode
    return (own and vae.device.type == "cpu" and is_builtin_mlp(vae)
            and all(p.dtype == torch.float32 for p in vae.encoder_parameters())
            and all(p.dtype == torch.float32 for p in vae.decoder_parameters()))


def is_builtin_mlp(vae: VAEAdapter) -> bool:
    """Whether ``vae`` is a built-in MLP VAE (any dtype or device)."""
    return (isinstance(vae, BuiltinVAE) and isinstance(vae.encoder, models.MLPEncoder)
            and isinstance(vae.decoder, models.MLPDecoder))


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


def _onednn(n_macs: int, t: Tensor) -> bool:
    """Whether an fp32 product of ``n_macs`` multiply-adds goes to oneDNN: the rule
    ``models.Linear`` applies (:data:`models.ONEDNN_LINEAR`, :data:`models.ONEDNN_MIN_MACS`), so
    that both steps pick the same gemm on a given machine. bf16 products take PyTorch's own bf16
    gemm (oneDNN's already)."""
    return (models.ONEDNN_LINEAR["on"] and t.device.type == "cpu" and t.dtype == torch.float32
            and n_macs >= models.ONEDNN_MIN_MACS)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, on the gemm ``models.Linear`` would take for it (:func:`_onednn`)."""
    if _onednn(a.shape[0] * a.shape[1] * b.shape[1], a):
        return models._ONEDNN_LINEAR(a, b.t(), None, "none", [], "")
    return a @ b


#: A layer's (weight, bias) in the step's compute dtype: the parameters themselves in fp32.
Weights = list[tuple[Tensor, Tensor]]


def _forward(weights: Weights, outs: list[Tensor]) -> None:
    """Run the MLP on ``outs[0]``, writing layer ℓ's output into ``outs[ℓ]``: h_ℓ = relu(a_ℓ)
    for the hidden layers, the pre-activation a_L for the last."""
    for i, (w, b) in enumerate(weights):
        h, out = outs[i], outs[i + 1]
        if _onednn(h.shape[0] * w.shape[0] * w.shape[1], h):
            out.copy_(models._ONEDNN_LINEAR(h, w, b, "none", [], ""))
        else:
            torch.addmm(b, h, w.t(), out=out)
        if i < len(weights) - 1:
            out.relu_()


def _backward(layers: list[nn.Linear], weights: Weights, hs: list[Tensor], delta: Tensor,
              input_grad: bool, weight_grads: bool = True) -> Tensor | None:
    """Set ``.grad`` of every layer's ∂W, ∂b in the parameters' dtype (unless not
    ``weight_grads``: a frozen network, only passed through); return ∂loss/∂input if
    ``input_grad``. ``weights`` and ``hs`` are in the compute dtype, as ``delta`` is."""
    for i in range(len(layers) - 1, -1, -1):
        lin, (w, _) = layers[i], weights[i]
        if weight_grads:
            lin.weight.grad = _product(delta.t(), hs[i]).to(lin.weight.dtype)
            lin.bias.grad = delta.sum(0, dtype=lin.bias.dtype)
        if i > 0:  # ReLU: h > 0 exactly where a > 0
            delta = torch.ops.aten.threshold_backward(_product(delta, w), hs[i], 0.0)
        elif input_grad:
            delta = _product(delta, w)
    return delta if input_grad else None


class _Cast:
    """A network's weights in the compute dtype. fp32: the parameters themselves. bf16: copies,
    made every call for a network that trains (its parameters change every step), and once for
    a frozen one, again only if a parameter was replaced or written in place (another tensor,
    storage or version counter: ``load_state_dict``, an in-place op on the parameter). The
    version counter cannot tell about a trained network: fused Adam updates parameters without
    moving it; nor about writes through ``p.data``, which a frozen network must not get (tune
    checks every decoder tensor after the run)."""

    def __init__(self, layers: list[nn.Linear], dtype: torch.dtype, frozen: bool) -> None:
        self.layers, self.dtype, self.frozen = layers, dtype, frozen
        self._key: list[tuple[int, int, int]] | None = None
        self._weights: Weights = []

    def __call__(self) -> Weights:
        if all(lin.weight.dtype == self.dtype for lin in self.layers):
            return [(lin.weight, lin.bias) for lin in self.layers]
        key = [(id(p), p.data_ptr(), p._version) for lin in self.layers for p in (lin.weight, lin.bias)]
        if not self.frozen or key != self._key:
            self._weights = [(lin.weight.to(self.dtype), lin.bias.to(self.dtype)) for lin in self.layers]
            self._key = key
        return self._weights


class MLPTrainStep:
    """One (A)VAE training step of a built-in MLP VAE, gradients by hand (module docstring).

    ``__call__(x, gen)`` draws the reparameterisation noise from ``gen`` exactly as
    :func:`selfconsist.train.avae_step_terms` does (one ``randn`` of the mean's shape), writes
    every parameter's gradient into its ``.grad`` and returns ``(loss, terms)`` as plain tensors
    (no graph): the same per-item terms, so progress and the finite check read the same names.
    ``rho=None`` trains the plain VAE. For :class:`MLPTuneStep` the decoder is frozen
    (``decoder_grads=False``: the backward passes through it without its weight products) and the
    reconstruction term is weighted by ``lambda_rec``.

    ``dtype=torch.bfloat16`` runs what bf16 autocast would: products, biases, ReLUs and the
    decoder's sigmoid in bf16; the latent statistics, the terms, the seeds of the backward pass
    and the gradients in fp32 (the parameters stay fp32, Adam updates them in fp32).
    """

    def __init__(self, vae: BuiltinVAE, rho: float | None, *, lambda_rec: float = 1.0,
                 decoder_grads: bool = True, dtype: torch.dtype | None = None) -> None:
        if not is_builtin_mlp(vae):
            raise ValueError("MLPTrainStep needs a built-in MLP VAE")
        self.vae, self.rho = vae, rho
        self.dtype = dtype or next(vae.encoder.parameters()).dtype
        self.lambda_rec, self.decoder_grads = lambda_rec, decoder_grads
        self.enc = _linears(vae.encoder.net)
        self.dec = _linears(vae.decoder.net)
        self.enc_w = _Cast(self.enc, self.dtype, frozen=False)
        self.dec_w = _Cast(self.dec, self.dtype, frozen=not decoder_grads)
        self.latent = vae.config.latent_dim
        self.prior = (vae.prior.mean, vae.prior.std)

    @torch.no_grad()
    def __call__(self, x: Tensor, gen: torch.Generator, obs_var: float | None = None
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """``obs_var``: the likelihood's v (default the model's own; tune passes its adaptive v)."""
        vae, rho, L, dt, ft = self.vae, self.rho, self.latent, self.dtype, x.dtype  # compute, terms
        v = vae.obs_var if obs_var is None else obs_var
        B = x.shape[0]
        m, s = self.prior
        enc_w, dec_w = self.enc_w(), self.dec_w()
        # Activation buffers: rows :B for the pass on x, rows B: for the AVAE's pass on x̃, so
        # that one backward of 2B rows serves both (the encoder's input rows B: are x̃ itself,
        # written there by the decoder's sigmoid).
        rows = 2 * B if rho is not None else B
        he = ([x.new_empty(rows, lin.in_features, dtype=dt) for lin in self.enc]
              + [x.new_empty(rows, 2 * L, dtype=dt)])
        hd = ([x.new_empty(B, lin.in_features, dtype=dt) for lin in self.dec]
              + [x.new_empty(B, self.dec[-1].out_features, dtype=dt)])
        xf = x.reshape(B, -1)  # the likelihood's x, in the terms' dtype
        he[0][:B].copy_(xf)

        # Forward: encode x, sample z, decode.
        _forward(enc_w, [h[:B] for h in he])
        mean, logvar = he[-1][:B, :L].to(ft), he[-1][:B, L:].to(ft)
        eps = randn(mean.shape, gen, mean.device, mean.dtype)  # objective.reparameterize's draw
        sd = logvar.mul(0.5).exp_()
        torch.addcmul(mean, eps, sd, out=hd[0])  # z
        _forward(dec_w, hd)
        x_rec = hd[-1].sigmoid_() if rho is None else torch.sigmoid(hd[-1], out=he[0][B:])

        mh, lvh = obj.whiten(mean, logvar, m, s)
        if vae.likelihood == "gaussian":
            residual = x_rec - xf  # kept for the gradient (x̃ − x)/v; in the terms' dtype (promoted)
            log_lik = obj.gaussian_log_likelihood_of_residual(residual, v)
        else:
            log_lik = obj.log_likelihood(xf, x_rec.to(ft), vae.likelihood, v)
        terms = {"log_lik": log_lik, "kl": obj.kl_to_standard_normal(mh, lvh)}
        inv_b = 1.0 / B

        # ∂loss/∂(μ̂, l̂) of the first encoding from KL (the coupling adds below).
        d_mh = mh * inv_b
        d_lvh = lvh.exp().sub_(1.0).mul_(0.5 * inv_b)

        if rho is not None:
            _forward(enc_w, [h[B:] for h in he])
            mean2, logvar2 = he[-1][B:, :L].to(ft), he[-1][B:, L:].to(ft)
            mh2, lvh2 = obj.whiten(mean2, logvar2, m, s)
            terms["coupling"] = obj.coupling_term(mh, lvh, mh2, lvh2, rho)
            r = 1.0 - rho * rho
            diff = mh2 - rho * mh  # μ̂′ − ρμ̂
            d_mh.add_(diff, alpha=-rho * inv_b / r)
            d_lvh.add_(lvh.exp(), alpha=rho * rho * 0.5 * inv_b / r)
            d_enc2 = torch.cat([diff.mul(inv_b / r) / s,
                                lvh2.exp().mul_(1.0 / r).sub_(1.0).mul_(0.5 * inv_b)], dim=1)

        # Decoder backward: ∂o = ∂x̃ ⊙ x̃(1 − x̃), then the layers down to ∂z.
        slope = torch.addcmul(x_rec, x_rec, x_rec, value=-1.0)  # x̃(1 − x̃) = x̃ − x̃²
        w_rec = self.lambda_rec * inv_b
        if vae.likelihood == "gaussian":
            d_o = residual.mul_(slope).mul_(w_rec / v)
        else:
            xr = x_rec.to(ft)
            p = xr.clamp(obj.BERNOULLI_EPS, 1.0 - obj.BERNOULLI_EPS)
            d_x = ((1.0 - xf) / (1.0 - p) - xf / p).mul_(w_rec)
            d_x.mul_((xr >= obj.BERNOULLI_EPS) & (xr <= 1.0 - obj.BERNOULLI_EPS))
            d_o = d_x.mul_(slope)
        d_z = _backward(self.dec, dec_w, hd, d_o.to(dt), input_grad=True,
                        weight_grads=self.decoder_grads)
        assert d_z is not None
        d_z = d_z.to(ft)

        # ∂(μ, log σ²) of the first encoding: sampling path + KL (+ coupling) seeds.
        d_mean = d_z + d_mh / s
        d_logvar = d_z.mul_(eps).mul_(sd).mul_(0.5).add_(d_lvh)
        d_enc = torch.cat([d_mean, d_logvar], dim=1)

        # Encoder backward; for the AVAE both passes at once, as one batch of 2B rows.
        if rho is not None:
            d_enc = torch.cat([d_enc, d_enc2])
        _backward(self.enc, enc_w, he, d_enc.to(dt), input_grad=False)

        bound = obj.avae_objective(terms["log_lik"], terms["kl"],
                                   terms.get("coupling", torch.zeros((), device=x.device)), self.lambda_rec)
        return -bound.mean(), terms


#: tune's precision → the hand-derived step's compute dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tune_supports(vae: VAEAdapter, cfg: Any, precision: str, world_size: int) -> bool:
    """Whether ``tune`` can take :class:`MLPTuneStep`: the built-in MLP (fp32 parameters) on CPU,
    in fp32 or bf16, the ``avae`` objective with λ_rec > 0 and no anchor, one process."""
    return (isinstance(vae, BuiltinVAE) and supports(vae) and cfg.objective == "avae"
            and cfg.lambda_rec > 0 and cfg.anchor == 0 and precision in DTYPES and world_size == 1)


class MLPTuneStep:
    """``tune``'s step on model samples for the built-in MLP, gradients by hand: the terms of
    :func:`selfconsist.posthoc.posthoc_terms` (x = g(z₀), plus √v·noise with ``sample_noise``),
    with the same draws from the generator in the same order, and the encoder's gradients
    written to ``.grad``; the frozen decoder is only passed through. ``precision="bf16"`` is
    what ``posthoc_terms`` under bf16 autocast computes (:class:`MLPTrainStep`)."""

    def __init__(self, vae: BuiltinVAE, cfg: Any, precision: str = "fp32") -> None:
        self.vae, self.sample_noise = vae, cfg.sample_noise
        self.step = MLPTrainStep(vae, cfg.rho, lambda_rec=cfg.lambda_rec, decoder_grads=False,
                                 dtype=DTYPES[precision])

    @torch.no_grad()
    def __call__(self, z0: Tensor, obs_var: float, gen: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        step = self.step
        if step.dtype == torch.float32:
            x = self.vae.decode(z0).float()
        else:  # decode(z0) as autocast runs it: bf16 products, bf16 sigmoid
            hs = [z0.to(step.dtype)] + [z0.new_empty(z0.shape[0], lin.out_features, dtype=step.dtype)
                                        for lin in step.dec]
            _forward(step.dec_w(), hs)
            x = hs[-1].sigmoid_().float()
        if self.sample_noise:
            x = x + math.sqrt(obs_var) * randn(x.shape, gen, x.device)
        return self.step(x, gen, obs_var)
