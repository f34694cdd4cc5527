"""The built-in MLP's hand-derived train step (selfconsist/mlp_step.py) against autograd on
objective.py's functions: loss, every gradient, the random stream, and whole runs."""

from __future__ import annotations

import pytest
import torch

from selfconsist import mlp_step, models
from selfconsist.adapters.base import Prior
from selfconsist.adapters.builtin import BuiltinVAE, new_model
from selfconsist.models import ModelConfig
from selfconsist.runtime import cpu_has_bf16
from selfconsist.train import AutogradStep, TrainConfig, train, train_step


def _params(vae: BuiltinVAE) -> list[torch.nn.Parameter]:
    return list(vae.encoder.parameters()) + list(vae.decoder.parameters())


def _double(vae: BuiltinVAE) -> BuiltinVAE:
    vae.encoder.double()
    vae.decoder.double()
    return vae


def _both(vae: BuiltinVAE, x: torch.Tensor, rho: float | None, seed: int = 3):
    """(loss, terms, grads, generator state) of the autograd step and of the hand-derived one."""
    out = []
    for step in (AutogradStep(vae, rho), mlp_step.MLPTrainStep(vae, rho)):
        for p in _params(vae):
            p.grad = None
        gen = torch.Generator().manual_seed(seed)
        loss, terms = step(x, gen)
        out.append((loss, terms, [p.grad.clone() for p in _params(vae)], gen.get_state()))
    return out


class _ShiftedPrior(BuiltinVAE):
    """A built-in MLP with the prior N(0.3, 2²): exercises the whitening in the derivatives."""

    def priors(self) -> dict[str, Prior]:
        shape = self.latent_shape
        return {"shifted": Prior(torch.full(shape, 0.3, dtype=torch.float64),
                                 torch.full(shape, 2.0, dtype=torch.float64))}


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("rho", [None, 0.8])
@pytest.mark.parametrize("shifted", [False, True])
def test_matches_autograd_in_float64(likelihood: str, rho: float | None, shifted: bool) -> None:
    cfg = ModelConfig(arch="mlp", data_shape=(3, 6, 6), latent_dim=5, hidden=12, depth=3,
                      likelihood=likelihood, obs_var=0.1)
    vae = _double(new_model(cfg, seed=1))
    if shifted:
        vae = _ShiftedPrior(cfg, vae.encoder, vae.decoder)
    x = torch.rand(7, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if likelihood == "bernoulli":
        x = (x > 0.5).double()
    (la, ta, ga, sa), (lb, tb, gb, sb) = _both(vae, x, rho)
    assert torch.equal(sa, sb), "the two steps must draw the same noise from the generator"
    assert torch.allclose(la, lb, rtol=1e-12, atol=0)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-12, atol=1e-12), k
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * a.abs().max().item())


def test_bernoulli_clamp_gives_zero_gradient_where_autograd_does() -> None:
    # A saturated decoder output (p < ε) gets no gradient through the clamp, in either step.
    cfg = ModelConfig(arch="mlp", data_shape=(1, 4, 4), latent_dim=3, hidden=8, depth=2,
                      likelihood="bernoulli")
    vae = _double(new_model(cfg, seed=0))
    with torch.no_grad():
        vae.decoder.net[-1].bias[:8] = -40.0  # sigmoid(-40) ≈ 4e-18 < 1e-6
    x = torch.ones(5, 1, 4, 4, dtype=torch.float64)
    (_, _, ga, _), (_, _, gb, _) = _both(vae, x, None)
    bias_grad_a, bias_grad_b = ga[-1], gb[-1]
    assert torch.all(bias_grad_a[:8] == 0) and torch.all(bias_grad_b[:8] == 0)
    assert torch.allclose(bias_grad_a, bias_grad_b, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("rho", [None, 0.975])
def test_matches_autograd_in_float32_at_the_papers_size(onednn: bool, rho: float | None) -> None:
    was = models.ONEDNN_LINEAR["on"]
    if onednn and not models.use_onednn_linear(True):
        models.use_onednn_linear(was)
        pytest.skip("this PyTorch build has no oneDNN linear")
    try:
        models.use_onednn_linear(onednn)
        cfg = ModelConfig(arch="mlp", data_shape=(3, 28, 28), latent_dim=64, hidden=200, depth=4)
        vae = new_model(cfg, seed=0)
        x = torch.rand(64, 3, 28, 28, generator=torch.Generator().manual_seed(0))
        (la, _, ga, _), (lb, _, gb, _) = _both(vae, x, rho)
    finally:
        models.use_onednn_linear(was)
    assert torch.allclose(la, lb, rtol=1e-5)
    for a, b in zip(ga, gb, strict=True):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_train_takes_it_only_for_the_fp32_cpu_mlp() -> None:
    mlp = new_model(ModelConfig(arch="mlp", data_shape=(1, 8, 8)), seed=0)
    conv = new_model(ModelConfig(arch="conv", data_shape=(1, 8, 8)), seed=0)
    assert isinstance(train_step(mlp, 0.9), mlp_step.MLPTrainStep)
    assert isinstance(train_step(conv, 0.9), AutogradStep)
    assert isinstance(train_step(_double(new_model(mlp.config, seed=0)), 0.9), AutogradStep)
    was = mlp_step.ENABLED["on"]
    mlp_step.ENABLED["on"] = False
    try:
        assert isinstance(train_step(mlp, 0.9), AutogradStep)
    finally:
        mlp_step.ENABLED["on"] = was
    with pytest.raises(ValueError, match="MLP"):
        mlp_step.MLPTrainStep(conv, 0.9)

    class OwnEncode(BuiltinVAE):  # a subclass that changes encode keeps the autograd step
        def encode(self, x):
            return super().encode(x)

    assert not mlp_step.supports(OwnEncode(mlp.config, mlp.encoder, mlp.decoder))


@pytest.mark.parametrize("objective", ["vae", "avae"])
def test_whole_runs_agree_with_the_autograd_step(tmp_path, objective: str) -> None:
    # 60 steps on the digits: the two steps round differently, so the weights drift apart a
    # little, but the run must land at the same place to well within the training noise.
    cfg = TrainConfig(objective=objective, steps=60, save_every=1000, hidden=32, depth=2,
                      latent_dim=8)
    was = mlp_step.ENABLED["on"]
    try:
        runs = {}
        for on in (True, False):
            mlp_step.ENABLED["on"] = on
            runs[on] = train(cfg, tmp_path / f"{on}.safetensors", progress=False)
    finally:
        mlp_step.ENABLED["on"] = was
    for a, b in zip(_params(runs[True]), _params(runs[False]), strict=True):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@pytest.mark.parametrize("sample_noise", [False, True])
@pytest.mark.parametrize("lambda_rec", [1.0, 5.0])
def test_tune_step_matches_posthoc_terms(sample_noise: bool, lambda_rec: float) -> None:
    # float32: posthoc_terms computes the likelihood in float32 whatever the model's dtype
    from types import SimpleNamespace

    from selfconsist.posthoc import avae_loss, posthoc_terms

    cfg = SimpleNamespace(rho=0.9, lambda_rec=lambda_rec, sample_noise=sample_noise, anchor=0.0,
                          objective="avae")
    vae = new_model(ModelConfig(arch="mlp", data_shape=(3, 6, 6), latent_dim=5, hidden=12, depth=3),
                    seed=2)
    vae.freeze_decoder()
    z0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    enc = list(vae.encoder_parameters())
    results = []
    for hand in (False, True):
        for p in enc:
            p.grad = None
        gen = torch.Generator().manual_seed(7)
        if hand:
            loss, terms = mlp_step.MLPTuneStep(vae, cfg)(z0, 0.03, gen)
        else:
            terms = posthoc_terms(vae, z0, cfg, 0.03, gen)
            loss = avae_loss(terms, cfg)
            loss.backward()
        results.append((loss.detach(), {k: t.detach() for k, t in terms.items()},
                        [p.grad.clone() for p in enc], gen.get_state()))
    (la, ta, ga, sa), (lb, tb, gb, sb) = results
    assert torch.equal(sa, sb)
    assert torch.allclose(la, lb, rtol=1e-6)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-5), k
    for a, b in zip(ga, gb, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert all(p.grad is None for p in vae.decoder_parameters())


def test_tune_takes_it_only_where_it_applies() -> None:
    from types import SimpleNamespace

    mlp = new_model(ModelConfig(arch="mlp", data_shape=(1, 8, 8)), seed=0)
    cfg = SimpleNamespace(objective="avae", lambda_rec=5.0, anchor=0.0)
    assert mlp_step.tune_supports(mlp, cfg, "fp32", 1)
    assert mlp_step.tune_supports(mlp, cfg, "bf16", 1)
    assert not mlp_step.tune_supports(mlp, cfg, "fp16", 1)
    assert not mlp_step.tune_supports(mlp, cfg, "fp32", 2)
    for change in ({"objective": "cycle"}, {"lambda_rec": 0.0}, {"anchor": 0.1}):
        assert not mlp_step.tune_supports(mlp, SimpleNamespace(**{**vars(cfg), **change}), "fp32", 1)


def _count_hand_tune_steps(monkeypatch) -> list[int]:  # noqa: ANN001
    """Count the calls of the hand-derived tune step, so that a test of it fails if tune stopped
    taking it (and compared autograd with itself): ``calls[0]``."""
    calls = [0]
    original = mlp_step.MLPTuneStep.__call__

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mlp_step.MLPTuneStep, "__call__", counted)
    return calls


def _tune_with_and_without_the_hand_step(tmp_path, monkeypatch, **settings):  # noqa: ANN001, ANN003, ANN202
    """Tune one small MLP twice for 40 steps, with the hand-derived step (checked to run every
    step) and without it (``mlp_step.ENABLED`` off: autograd); returns the base model, the two
    results and the two tuned models (hand-derived first)."""
    import selfconsist
    from selfconsist.tune import TuneConfig

    calls = _count_hand_tune_steps(monkeypatch)
    vae0 = new_model(ModelConfig(arch="mlp", data_shape=(1, 8, 8), latent_dim=8, hidden=32, depth=2), seed=0)
    vae0.save(tmp_path / "base.safetensors", {})
    results = {}
    for on in (True, False):
        monkeypatch.setitem(mlp_step.ENABLED, "on", on)
        calls[0] = 0
        results[on] = selfconsist.tune(
            selfconsist.load(tmp_path / "base.safetensors"),
            TuneConfig(steps=40, batch_size=32, device="cpu", eval_samples=64, **settings),
            out=tmp_path / f"{on}.safetensors", progress=False)
        assert calls[0] == (40 if on else 0)  # so that no test compares autograd with itself
    a, b = (selfconsist.load(tmp_path / f"{on}.safetensors") for on in (True, False))
    return vae0, results, a, b


@pytest.mark.parametrize("sample_noise", [False, True])
def test_whole_tunes_agree_with_the_autograd_step(tmp_path, monkeypatch, sample_noise: bool) -> None:
    vae0, results, a, b = _tune_with_and_without_the_hand_step(tmp_path, monkeypatch, sample_noise=sample_noise)
    for pa, pb in zip(a.encoder_parameters(), b.encoder_parameters(), strict=True):
        assert (pa - pb).abs().max() <= 1e-3 * pa.abs().max()
    for pa, p0 in zip(a.decoder_parameters(), vae0.decoder_parameters(), strict=True):
        assert torch.equal(pa, p0)
    assert results[True].after["sample_roundtrip_mse"]["value"] == pytest.approx(
        results[False].after["sample_roundtrip_mse"]["value"], rel=1e-2)


def _tune_step_results(vae: BuiltinVAE, cfg, z0: torch.Tensor, kind: str):
    """(loss, terms, encoder grads, generator state) of tune's step: ``autograd`` (posthoc_terms
    in fp32), ``autocast`` (posthoc_terms under bf16 autocast), or the hand-derived step in
    ``fp32``/``bf16``."""
    from selfconsist.posthoc import avae_loss, posthoc_terms

    enc = list(vae.encoder_parameters())
    for p in enc:
        p.grad = None
    gen = torch.Generator().manual_seed(7)
    if kind in ("autograd", "autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
            terms = posthoc_terms(vae, z0, cfg, 0.03, gen)
        loss = avae_loss(terms, cfg)
        loss.backward()
    else:
        loss, terms = mlp_step.MLPTuneStep(vae, cfg, kind)(z0, 0.03, gen)
    return (loss.detach(), {k: t.detach() for k, t in terms.items()}, [p.grad.clone() for p in enc],
            gen.get_state())


@pytest.mark.parametrize("sample_noise", [False, True])
@pytest.mark.parametrize(("likelihood", "shifted", "lambda_rec"),
                         [("gaussian", False, 1.0), ("gaussian", True, 5.0),
                          ("bernoulli", False, 5.0), ("bernoulli", True, 1.0)])
def test_bf16_tune_step_is_what_autocast_computes(sample_noise: bool, likelihood: str, shifted: bool,
                                                  lambda_rec: float) -> None:
    # bf16 runs on any CPU (emulated where it has no bf16 units), so this runs everywhere.
    from types import SimpleNamespace

    cfg = SimpleNamespace(rho=0.9, lambda_rec=lambda_rec, sample_noise=sample_noise, anchor=0.0,
                          objective="avae")
    mcfg = ModelConfig(arch="mlp", data_shape=(3, 8, 8), latent_dim=6, hidden=48, depth=3,
                       likelihood=likelihood)
    vae = new_model(mcfg, seed=2)
    if shifted:  # the whitening by a non-standard prior, in the terms and the seeds
        vae = _ShiftedPrior(mcfg, vae.encoder, vae.decoder)
    vae.freeze_decoder()
    z0 = torch.randn(16, 6, generator=torch.Generator().manual_seed(4))
    la, ta, ga, sa = _tune_step_results(vae, cfg, z0, "autocast")
    lb, tb, gb, sb = _tune_step_results(vae, cfg, z0, "bf16")
    l32, t32, g32, _ = _tune_step_results(vae, cfg, z0, "autograd")
    assert torch.equal(sa, sb)
    # The forward is autocast's: bf16 products, biases, ReLUs and sigmoid, fp32 terms. On a CPU
    # with bf16 units the two run the same kernels, so loss and terms are bit-equal there (where
    # bf16 is emulated, unmeasured, to bf16 precision).
    if cpu_has_bf16():
        assert torch.equal(la, lb)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
    else:
        assert torch.allclose(la, lb, rtol=1e-3)
        for k in ta:
            assert torch.allclose(ta[k], tb[k], rtol=1e-3, atol=1e-3), k
    # The backward differs from autocast's only in where it rounds to bf16 (its output seed and
    # bias sums stay fp32): equal to bf16 precision, and as near fp32's as autocast's is.
    cos = torch.nn.functional.cosine_similarity
    for a, b, c in zip(ga, gb, g32, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()
        assert cos(a.flatten(), b.flatten(), dim=0) > 0.9999
        assert cos(c.flatten(), b.flatten(), dim=0) > cos(c.flatten(), a.flatten(), dim=0) - 1e-3
        # λ_rec 5 weights the bf16-rounded reconstruction seed 5×: autocast too falls to ~0.9988
        assert cos(c.flatten(), b.flatten(), dim=0) > (0.999 if lambda_rec == 1.0 else 0.995)
    assert not torch.allclose(lb, l32, rtol=1e-7)  # it did run in bf16
    assert torch.allclose(lb, l32, rtol=2e-2)
    assert all(p.grad is None for p in vae.decoder_parameters())


def test_bf16_weight_copies_follow_the_parameters() -> None:
    """The bf16 copies of the weights: the encoder's made again after each optimiser step, the
    frozen decoder's once, and again if its parameters are loaded anew."""
    vae = new_model(ModelConfig(arch="mlp", data_shape=(1, 4, 4), latent_dim=3, hidden=8, depth=2), seed=0)
    vae.freeze_decoder()
    step = mlp_step.MLPTrainStep(vae, 0.9, decoder_grads=False, dtype=torch.bfloat16)
    enc_params = list(vae.encoder_parameters())
    opt = torch.optim.Adam(enc_params, lr=0.1, fused=True)  # fused: moves no version counter
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)

    def copies_match(cast: mlp_step._Cast) -> bool:
        return all(torch.equal(w, lin.weight.to(torch.bfloat16)) and torch.equal(b, lin.bias.to(torch.bfloat16))
                   for (w, b), lin in zip(cast(), cast.layers, strict=True))

    step(x, gen)
    enc_before, dec_before = step.enc_w(), step.dec_w()
    opt.step()
    assert step.enc_w() is not enc_before and copies_match(step.enc_w)
    assert step.dec_w() is dec_before  # frozen: not cast again
    with torch.no_grad():
        vae.decoder.net[0].weight.mul_(2.0)
    assert step.dec_w() is not dec_before and copies_match(step.dec_w)
    fp32 = mlp_step.MLPTrainStep(vae, 0.9)
    assert all(w is lin.weight for (w, _), lin in zip(fp32.enc_w(), fp32.enc, strict=True))


@pytest.mark.skipif(not cpu_has_bf16(), reason="tune --precision bf16 needs a CPU with bf16 units")
def test_whole_bf16_tunes_agree_with_the_autocast_step(tmp_path, monkeypatch) -> None:
    vae0, results, a, b = _tune_with_and_without_the_hand_step(tmp_path, monkeypatch, precision="bf16")
    # bf16 rounding compounds through Adam over 40 steps, so the runs part by a fraction of how
    # far the encoder moved (here 0.01–0.2 of it; against autocast on stale weights, 0.3–1.2×).
    for pa, pb, p0 in zip(a.encoder_parameters(), b.encoder_parameters(), vae0.encoder_parameters(), strict=True):
        moved = (pb - p0).abs().max()
        assert moved > 1e-3
        assert (pa - pb).abs().max() <= 0.35 * moved
    for pa, p0 in zip(a.decoder_parameters(), vae0.decoder_parameters(), strict=True):
        assert torch.equal(pa, p0)
    assert a.metadata["selfconsist.precision"] == "bf16"
    assert results[True].after["sample_roundtrip_mse"]["value"] == pytest.approx(
        results[False].after["sample_roundtrip_mse"]["value"], rel=5e-2)


@pytest.mark.skipif(not cpu_has_bf16(), reason="tune --precision bf16 needs a CPU with bf16 units")
def test_bf16_tune_resumes_bit_identically(tmp_path, monkeypatch) -> None:
    import sys

    import selfconsist
    from selfconsist.tune import TuneConfig

    recipe = sys.modules["selfconsist.tune"]
    new_model(ModelConfig(arch="mlp", data_shape=(1, 8, 8), latent_dim=8, hidden=32, depth=2),
              seed=0).save(tmp_path / "base.safetensors", {})
    cfg = TuneConfig(steps=30, save_every=10, batch_size=32, device="cpu", eval_samples=64, precision="bf16")
    calls = _count_hand_tune_steps(monkeypatch)
    selfconsist.tune(selfconsist.load(tmp_path / "base.safetensors"), cfg, out=tmp_path / "full.safetensors",
                     progress=False)
    assert calls[0] == 30  # the hand-derived bf16 step is what resumes here
    original = recipe.check_finite

    def stop_at_25(step, loss):
        if step == 25:
            raise KeyboardInterrupt
        original(step, loss)

    monkeypatch.setattr(recipe, "check_finite", stop_at_25)
    with pytest.raises(KeyboardInterrupt):
        selfconsist.tune(selfconsist.load(tmp_path / "base.safetensors"), cfg, out=tmp_path / "part.safetensors",
                         progress=False)
    monkeypatch.setattr(recipe, "check_finite", original)
    assert (tmp_path / "part.safetensors.state.pt").exists()
    selfconsist.tune(selfconsist.load(tmp_path / "base.safetensors"), cfg, out=tmp_path / "part.safetensors",
                     resume=True, progress=False)
    a, b = (selfconsist.load(tmp_path / f"{n}.safetensors") for n in ("full", "part"))
    for pa, pb in zip(a.encoder_parameters(), b.encoder_parameters(), strict=True):
        assert torch.equal(pa, pb)


def _train_step_results(vae: BuiltinVAE, x: torch.Tensor, rho: float | None, kind: str):
    """(loss, terms, grads, generator state) of train's step: ``autograd`` (fp32),
    ``autocast`` (the autograd step under bf16 autocast) or the hand-derived step in ``bf16``."""
    for p in _params(vae):
        p.grad = None
    gen = torch.Generator().manual_seed(5)
    if kind == "bf16":
        loss, terms = mlp_step.MLPTrainStep(vae, rho, dtype=torch.bfloat16)(x, gen)
    else:  # torch's autocast itself: runtime.autocast refuses bf16 on CPUs without bf16 units
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
            loss, terms = AutogradStep(vae, rho)(x, gen)
    return loss, terms, [p.grad.clone() for p in _params(vae)], gen.get_state()


@pytest.mark.parametrize("rho", [None, 0.8])
@pytest.mark.parametrize(("likelihood", "shifted"), [("gaussian", False), ("gaussian", True),
                                                     ("bernoulli", False)])
def test_bf16_train_step_is_what_autocast_computes(rho: float | None, likelihood: str, shifted: bool) -> None:
    # train's step updates the decoder too: its bf16 weight copies are made every step, and
    # its gradients come out of bf16 products, as the encoder's do.
    mcfg = ModelConfig(arch="mlp", data_shape=(3, 8, 8), latent_dim=6, hidden=48, depth=3,
                       likelihood=likelihood)
    vae = new_model(mcfg, seed=2)
    if shifted:
        vae = _ShiftedPrior(mcfg, vae.encoder, vae.decoder)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    la, ta, ga, sa = _train_step_results(vae, x, rho, "autocast")
    lb, tb, gb, sb = _train_step_results(vae, x, rho, "bf16")
    l32, _, g32, _ = _train_step_results(vae, x, rho, "autograd")
    assert torch.equal(sa, sb)
    assert set(ta) == set(tb) == ({"log_lik", "kl"} | ({"coupling"} if rho else set()))
    if cpu_has_bf16():  # the same bf16 kernels: bit-equal (emulated bf16: to bf16 precision)
        assert torch.equal(la, lb)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
    else:
        assert torch.allclose(la, lb, rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity
    for a, b, c in zip(ga, gb, g32, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()
        assert cos(a.flatten(), b.flatten(), dim=0) > 0.9999
        assert cos(c.flatten(), b.flatten(), dim=0) > min(0.999, cos(c.flatten(), a.flatten(), dim=0) - 1e-3)
    assert not torch.allclose(lb, l32, rtol=1e-7)  # it did run in bf16
    assert torch.allclose(lb, l32, rtol=2e-2)


def test_train_picks_the_step_for_its_precision() -> None:
    mlp = new_model(ModelConfig(arch="mlp", data_shape=(1, 8, 8)), seed=0)
    conv = new_model(ModelConfig(arch="conv", data_shape=(1, 8, 8)), seed=0)
    step = train_step(mlp, 0.9, precision="bf16")
    assert isinstance(step, mlp_step.MLPTrainStep) and step.dtype == torch.bfloat16
    assert train_step(mlp, 0.9).dtype == torch.float32
    step = train_step(conv, 0.9, precision="bf16")
    assert isinstance(step, AutogradStep) and step.precision == "bf16"


@pytest.mark.skipif(not cpu_has_bf16(), reason="train --precision bf16 needs a CPU with bf16 units")
@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_bf16_train_runs_and_resumes_bit_identically(tmp_path, monkeypatch, model: str) -> None:
    import json
    import sys

    from safetensors import safe_open

    recipe = sys.modules["selfconsist.train"]
    cfg = TrainConfig(model=model, objective="avae", data="digits", steps=24, save_every=8, latent_dim=4,
                      hidden=32, depth=2, channels=(8, 16), device="cpu", precision="bf16")
    made = []
    monkeypatch.setattr(recipe, "train_step", lambda *a, **k: made.append(train_step(*a, **k)) or made[-1])
    full = train(cfg, tmp_path / "full.safetensors", progress=False)
    assert type(made[0]) is (mlp_step.MLPTrainStep if model == "mlp" else AutogradStep)
    original = recipe.check_finite

    def stop_at_20(step, loss):
        if step == 20:
            raise KeyboardInterrupt
        original(step, loss)

    monkeypatch.setattr(recipe, "check_finite", stop_at_20)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "part.safetensors", progress=False)
    monkeypatch.setattr(recipe, "check_finite", original)
    resumed = train(cfg, tmp_path / "part.safetensors", resume=True, progress=False)
    for a, b in zip(full.state_tensors().values(), resumed.state_tensors().values(), strict=True):
        assert torch.equal(a, b) and a.is_contiguous()
    with safe_open(tmp_path / "part.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["selfconsist.train_precision"] == "bf16"
    assert json.loads(meta["selfconsist.train_config"])["precision"] == "bf16"
    # and it differs from an fp32 run: bf16 really ran
    fp32 = train(TrainConfig(**{**cfg.__dict__, "precision": "fp32"}), tmp_path / "fp32.safetensors",
                 progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(full.state_tensors().values(),
                                                     fp32.state_tensors().values(), strict=True))


def test_train_auto_precision_keeps_fp32_for_a_small_mlp(tmp_path, monkeypatch) -> None:
    from safetensors import safe_open

    from selfconsist import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: True)  # any CPU: the size rule decides
    cfg = TrainConfig(data="digits", steps=3, latent_dim=4, hidden=16, depth=2, device="cpu", precision="auto")
    train(cfg, tmp_path / "a.safetensors", progress=False)
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata()["selfconsist.train_precision"] == "fp32"


def test_train_refuses_bf16_on_a_cpu_without_bf16_units(tmp_path, monkeypatch) -> None:
    from selfconsist import runtime
    from selfconsist.errors import SelfconsistError

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    cfg = TrainConfig(data="digits", steps=3, latent_dim=4, hidden=16, device="cpu", precision="bf16")
    with pytest.raises(SelfconsistError, match="bf16 units"):
        train(cfg, tmp_path / "a.safetensors", progress=False)
    assert not (tmp_path / "a.safetensors").exists()


def test_train_resume_refuses_a_state_of_another_precision(tmp_path, monkeypatch) -> None:
    # --precision auto resolves by machine: a state of a bf16 run must not continue in fp32
    import sys

    from selfconsist import runtime
    from selfconsist.errors import SelfconsistError

    recipe = sys.modules["selfconsist.train"]
    cfg = TrainConfig(data="digits", steps=20, save_every=5, latent_dim=4, hidden=16, depth=2,
                      device="cpu", precision="auto")
    monkeypatch.setattr(recipe, "resolve_precision", lambda *a, **k: "bf16")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)  # bf16 runs (emulated) anywhere
    original = recipe.check_finite

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt
        original(step, loss)

    monkeypatch.setattr(recipe, "check_finite", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "m.safetensors", progress=False)
    monkeypatch.setattr(recipe, "check_finite", original)
    monkeypatch.setattr(recipe, "resolve_precision", lambda *a, **k: "fp32")
    with pytest.raises(SelfconsistError, match="written by a run in bf16.*--precision bf16"):
        train(cfg, tmp_path / "m.safetensors", resume=True, progress=False)
    monkeypatch.setattr(recipe, "resolve_precision", lambda *a, **k: "bf16")
    train(cfg, tmp_path / "m.safetensors", resume=True, progress=False)  # the same precision resumes


def test_train_resumes_a_state_from_before_precision_was_a_setting(tmp_path, monkeypatch) -> None:
    import json
    import sys

    recipe = sys.modules["selfconsist.train"]
    cfg = TrainConfig(data="digits", steps=20, save_every=5, latent_dim=4, hidden=16, depth=2, device="cpu")
    full = train(cfg, tmp_path / "full.safetensors", progress=False)
    original = recipe.check_finite

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt
        original(step, loss)

    monkeypatch.setattr(recipe, "check_finite", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "old.safetensors", progress=False)
    monkeypatch.setattr(recipe, "check_finite", original)
    # rewrite the state as the previous release wrote it: no precision anywhere
    path = tmp_path / "old.safetensors.state.pt"
    state = torch.load(path, weights_only=True)
    del state["precision"]
    old_cfg = json.loads(state["config"])
    del old_cfg["precision"]
    state["config"] = json.dumps(old_cfg, sort_keys=True)
    torch.save(state, path)
    resumed = train(cfg, tmp_path / "old.safetensors", resume=True, progress=False)
    for a, b in zip(full.state_tensors().values(), resumed.state_tensors().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not cpu_has_bf16(), reason="train --precision bf16 needs a CPU with bf16 units")
def test_train_auto_precision_takes_bf16_for_a_large_mlp(tmp_path, monkeypatch) -> None:
    from safetensors import safe_open

    from selfconsist import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: True)
    cfg = TrainConfig(data="digits", steps=3, latent_dim=16, hidden=200, depth=4, device="cpu", precision="auto")
    vae = train(cfg, tmp_path / "a.safetensors", progress=False)
    assert vae.num_parameters()[0] >= runtime.CPU_BF16_MIN_ENCODER_PARAMS
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata()["selfconsist.train_precision"] == "bf16"
