"""``selfconsist eval`` end to end on tiny built-in models, and the pieces it is made of."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import selfconsist
from selfconsist.cli import main
from selfconsist.evaluate import EvalConfig, _to_model_range
from selfconsist.report import render_table
from selfconsist.train import TrainConfig, train

DATA_FREE = {"sample_roundtrip_mse", "latent_roundtrip_corr", "consistency_kl", "drift@10",
             "adv_shift@0.1", "adv_shift@0.2", "responsive_elements"}
WITH_DATA = {"recon_mse", "recon_psnr", "active_units", "responsive_active", "drift_data@10",
             "adv_shift_data@0.1", "adv_shift_data@0.2"}
# image data (C, H, W): the real-image cycles (no SSIM below 11×11, so none on 8×8 digits)
_CYCLES = {"cycle_psnr@1", "cycle_psnr@2", "cycle_psnr@5", "cycle_psnr@10", "cycle_db_lost"}
# the deterministic chain, the pipeline chain (sampled, uint8) and the idempotent bound
WITH_IMAGES = ({"image_psnr", "pipe_image_psnr", "bound_encoder_db_lost"} | _CYCLES
               | {"pipe_" + k for k in _CYCLES} | {"bound_" + k for k in _CYCLES})
WITH_LABELS = {"probe_acc", "probe_acc_adv@0.1", "probe_acc_adv@0.2", "probe_acc_ce@0.1", "probe_acc_ce@0.2"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny MLP VAEs on the digits (the second stands in for a tuned model)."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        p = root / f"vae{seed}.safetensors"
        train(TrainConfig(data="digits", steps=200, device="cpu", seed=seed, hidden=64,
                          latent_dim=16), p, progress=False)
        paths.append(p)
    return paths[0], paths[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def eval_args(models: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    a, b = models
    return ["eval", str(a), "--compare", str(b), "--data", "digits", "--out", str(out),
            "--samples", "200", "--device", "cpu", *extra]


@pytest.mark.slow
def test_cli_eval_writes_metrics_report_and_figures(models, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(eval_args(models, out, "--seed", "3"), capsys)
    assert code == 0, stderr
    assert "| metric | model | tuned | change | verdict | better |" in stdout
    assert str(out / "report.md") in stdout

    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"models", "config", "versions", "data", "stderr_methods"}
    assert set(m["models"]) == {"model", "tuned"}
    for name, res in m["models"].items():
        missing = (DATA_FREE | WITH_DATA | WITH_LABELS) - set(res)
        assert not missing, (name, missing)
        for key, est in res.items():
            assert set(est) == {"value", "stderr"}, key
            assert est["value"] is not None and math.isfinite(est["value"]), key
        assert 0 <= res["responsive_active"]["value"] <= res["responsive_elements"]["value"]
        assert res["responsive_elements"]["value"] <= 16
        assert 0.0 <= res["probe_acc"]["value"] <= 1.0
        assert res["probe_acc_adv@0.2"]["value"] <= res["probe_acc"]["value"]
        assert res["recon_psnr"]["value"] == pytest.approx(
            10 * math.log10(1.0 / res["recon_mse"]["value"]))
    assert m["config"]["seed"] == 3 and m["config"]["eps_used"] == [0.1, 0.2]
    assert m["config"]["seeds"]  # every stage's seed is recorded
    assert m["versions"]["torch"] == torch.__version__
    assert m["data"]["n"] == 1797 and m["data"]["labels"] is True
    assert m["data"]["n_train_probe"] + m["data"]["n_test"] == 1797
    assert set(m["stderr_methods"]) >= DATA_FREE | WITH_DATA | WITH_LABELS

    report = (out / "report.md").read_text()
    assert "| metric | model | tuned | change | verdict | better |" in report
    for key in DATA_FREE | WITH_DATA | WITH_LABELS:
        assert f"`{key}`" in report
    for fig in ("roundtrip", "drift", "adversarial", "metrics"):
        png = out / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig}.png)" in report  # embedded by a relative path
    assert not list(tmp_path.glob(".eval.*"))  # the temporary folder is gone

    # same seed, same numbers; another seed, other numbers
    code, _, _ = run_cli(eval_args(models, tmp_path / "again", "--seed", "3", "--quiet",
                                   "--no-figures"), capsys)
    assert code == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["models"] == m["models"]
    code, _, _ = run_cli(eval_args(models, tmp_path / "other", "--seed", "4", "--quiet",
                                   "--no-figures"), capsys)
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert other["models"]["model"]["sample_roundtrip_mse"] != m["models"]["model"][
        "sample_roundtrip_mse"]


def test_cli_fast_keeps_what_the_user_gave_even_at_the_default(tmp_path, monkeypatch,
                                                               capsys) -> None:
    # --fast lowers only the settings the user did not give: an explicit --samples 1000 stays
    # 1000 although it is EvalConfig's default (the preset would make it 256).
    import selfconsist.cli.eval as cli_eval
    from selfconsist.evaluate import FAST_PRESET

    seen: list[tuple[EvalConfig, dict]] = []

    def fake_evaluate(model, compare=None, *, config, **kwargs):
        seen.append((config, kwargs))
        return type("R", (), {"metrics": {"models": {"model": {}}}})()

    monkeypatch.setattr(cli_eval, "evaluate", fake_evaluate)
    d = EvalConfig()
    base = ["eval", "m.safetensors", "--out", str(tmp_path / "o")]
    code, _, err = run_cli(base + ["--fast", "--samples", str(d.samples), "--pgd-steps", "7"],
                           capsys)
    assert code == 0, err
    cfg, kwargs = seen[-1]
    assert cfg.samples == d.samples and cfg.pgd_steps == 7
    assert (cfg.responsive_samples, cfg.bootstrap, cfg.real_images) == (
        FAST_PRESET["responsive_samples"], FAST_PRESET["bootstrap"], FAST_PRESET["real_images"])
    assert "name" not in kwargs and "compare_name" not in kwargs  # evaluate()'s own defaults
    # Nothing given: every setting is EvalConfig's default, declared once on the field.
    code, _, err = run_cli(base, capsys)
    assert code == 0, err
    assert seen[-1][0] == d
    code, _, err = run_cli(base + ["--fast"], capsys)
    assert code == 0, err
    assert seen[-1][0] == EvalConfig(**FAST_PRESET)
    assert EvalConfig.resolve(seed=None, samples=None) == d
    assert EvalConfig.resolve(True, samples=d.samples).samples == d.samples


def test_cli_refuses_a_non_empty_out_and_bad_labels(models, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(eval_args(models, out, "--quiet"), capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"

    bad = tmp_path / "labels.npy"
    np.save(bad, np.zeros(10, dtype=np.int64))
    code, _, err = run_cli(eval_args(models, tmp_path / "x", "--labels", str(bad)), capsys)
    assert code == 2 and "10 labels for 1797 images" in err
    assert not (tmp_path / "x").exists()


def test_split_labels_override_and_overwrite(models, tmp_path, capsys) -> None:
    labels = tmp_path / "parity.npy"
    np.save(labels, np.arange(1797) % 2)
    out = tmp_path / "split"
    out.mkdir()  # an empty folder is fine without --overwrite
    args = ["eval", str(models[0]), "--data", "digits", "--labels", str(labels),
            "--n-train", "1000", "--n-test", "300", "--samples", "50", "--eps", "0.05",
            "--no-figures", "--quiet", "--device", "cpu", "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "change" not in stdout  # one model: no change column
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["n_train_probe"] == 1000 and m["data"]["n_test"] == 300
    assert m["data"]["n_classes"] == 2
    assert set(m["models"]) == {"model"}
    assert "probe_acc_adv@0.05" in m["models"]["model"]
    assert m["config"]["eps_used"] == [0.05]
    code, _, err = run_cli(args, capsys)
    assert code == 2  # now it is not empty
    code, _, err = run_cli(args + ["--overwrite", "--name", "base"], capsys)
    assert code == 0, err
    assert set(json.loads((out / "metrics.json").read_text())["models"]) == {"base"}


def test_python_api_without_matplotlib(models, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    vae = selfconsist.load(models[0])
    x = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = selfconsist.EvalConfig(samples=64, device="cpu", bootstrap=20)
    res = selfconsist.evaluate(vae, data=x, out=tmp_path / "api", config=cfg, name="mine")
    assert any(r.name == "selfconsist" and r.levelname == "WARNING"
               and "matplotlib is not installed" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == ["metrics.json", "report.md"]
    assert "## Figures" not in res.report
    got = set(res.metrics["models"]["mine"])
    assert got == DATA_FREE | WITH_DATA | WITH_IMAGES | ({"latent_roundtrip_corr_responsive"} & got)
    assert res.metrics["data"]["n_test"] == 60  # no labels: everything is held out
    # the package attribute stays the function even though the module is imported
    assert callable(selfconsist.evaluate)
    assert selfconsist.evaluate(vae, config=cfg).metrics["models"]["model"].keys() >= DATA_FREE


def test_render_table_and_config() -> None:
    metrics = {"models": {
        "model": {"probe_acc": {"value": 0.5, "stderr": 0.01},
                  "adv_shift@0.1": {"value": 2.0, "stderr": None}},
        "tuned": {"probe_acc": {"value": 0.6, "stderr": 0.01},
                  "adv_shift@0.1": {"value": 1.0, "stderr": 0.1}},
    }}
    table = render_table(metrics)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | model | tuned | change | verdict | better |"
    # 0.1 > 2·√(0.01² + 0.01²) ≈ 0.028: a real gain; −1 against a 0.2 threshold: better
    assert "| `probe_acc` | 0.5 ± 0.01 | 0.6 ± 0.01 | +0.1 (+20%) | **better** | ↑ higher |" in lines
    assert "| `adv_shift@0.1` | 2 | 1 ± 0.1 | -1 (-50%) | **better** | ↓ lower |" in lines
    assert render_table(metrics["models"], ["tuned"]).splitlines()[0] == (
        "| metric | tuned | better |")
    # ε defaults follow the data range's width; data in [0, 1] maps onto it
    assert EvalConfig().eps_for((0.0, 1.0)) == (0.1, 0.2)
    assert EvalConfig().eps_for((-1.0, 1.0)) == (0.2, 0.4)
    assert EvalConfig(eps=(0.3,)).eps_for((-1.0, 1.0)) == (0.3,)
    assert torch.equal(_to_model_range(torch.tensor([0.0, 0.5, 1.0]), (-1.0, 1.0)),
                       torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(selfconsist.SelfconsistError):
        EvalConfig(eps=(0.1, -0.2))


def test_evaluate_a_perfectly_self_consistent_model() -> None:
    from .test_metrics import LinearGaussianVAE, orthonormal

    vae = LinearGaussianVAE(orthonormal(12, 4), lo=-math.inf, hi=math.inf)
    cfg = EvalConfig(samples=300, device="cpu", bootstrap=20)
    with pytest.raises(selfconsist.SelfconsistError, match="--eps"):
        selfconsist.evaluate(vae, config=cfg)  # unbounded range: ε needs giving
    cfg = EvalConfig(samples=300, device="cpu", bootstrap=20, eps=(0.05,))
    x = vae.decode(torch.randn(200, 4, generator=torch.Generator().manual_seed(1))).detach()
    res = selfconsist.evaluate(vae, data=x, config=cfg).metrics["models"]["model"]
    assert res["sample_roundtrip_mse"]["value"] < 1e-10
    assert res["drift@10"]["value"] < 1e-10 and res["drift_data@10"]["value"] < 1e-10
    assert res["latent_roundtrip_corr"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert res["latent_roundtrip_corr_responsive"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert res["responsive_elements"]["value"] == 4 and res["responsive_active"]["value"] == 4
    assert res["recon_mse"]["value"] < 1e-10
    assert "recon_psnr" not in res  # no PSNR without a bounded data range


def test_figures_show_unbounded_data_rescaled_for_display():
    # imshow is called with vmin 0, vmax 1: unbounded data must be mapped into [0, 1] for
    # display, whatever the item's shape, or the picture is a saturated blank.
    from selfconsist.plots import to_image

    x = torch.linspace(-5.0, 5.0, 3 * 4 * 4).reshape(3, 4, 4)
    for item in (x, x[:1], x[0], x.flatten()):
        img = to_image(item, (-math.inf, math.inf))
        assert img.min() == 0.0 and img.max() == 1.0, item.shape
    bounded = to_image(x, (-10.0, 10.0))  # a bounded range maps by (x − lo)/(hi − lo)
    assert abs(float(bounded.min()) - 0.25) < 1e-6 and abs(float(bounded.max()) - 0.75) < 1e-6


def test_report_figures_and_stage_lines(models, tmp_path, monkeypatch) -> None:
    """report.md opens with the verdict summary; the figures hold what they promise (every
    ε, label and probe prediction, a difference map, ratios); each stage logs its duration."""
    import io
    import logging

    from selfconsist import plots

    grids: dict[str, list] = {}
    real_grid = plots._grid

    def spy(Figure, rows, path, title, col_titles=None):
        grids[Path(path).stem] = [rows, title]
        real_grid(Figure, rows, path, title, col_titles)

    monkeypatch.setattr(plots, "_grid", spy)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("selfconsist")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        cfg = EvalConfig(samples=64, device="cpu", bootstrap=20, pgd_steps=3, n_figure=4,
                         responsive_samples=8)
        res = selfconsist.evaluate(models[0], compare=models[1], data="digits",
                                   out=tmp_path / "ev", config=cfg, progress=True)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert any(ln.startswith("eval [1/") and ln.endswith("…") for ln in lines)
    assert any("PGD shift (data): done in" in ln for ln in lines)
    assert "stages done in" in lines[-1]

    report = res.report
    summary = report.split("## Summary", 1)[1].split("## Metrics", 1)[0]
    bullets = [ln for ln in summary.splitlines() if ln.startswith("- ")]
    assert 3 <= len(bullets) <= 4
    assert bullets[0].startswith("- Improved") and bullets[1].startswith("- Got worse")
    assert "Decoder-responsive elements" in bullets[-1]
    assert "| verdict |" in report and "2·√(se₁² + se₂²)" in report
    assert "latent_roundtrip_corr" in res.metrics["definitions"]

    rows, title = grids["adversarial"]
    assert "PGD on the latent shift" in title and "ε = 0.1, 0.2" in title
    labels = [r[0] for r in rows]
    for name in ("model", "tuned"):
        for eps in ("0.1", "0.2"):
            assert f"{name}\nx + δ, ε={eps}" in labels and f"{name}\ng(μ(x + δ)), ε={eps}" in labels
    clean = rows[labels.index("model\nx")]
    assert len(clean[2]) == 4 and all(c.startswith("label ") and " · probe " in c
                                      for c in clean[2])
    attacked = rows[labels.index("model\nx + δ, ε=0.2")]
    assert all(c.startswith("probe ") for c in attacked[2])

    rows, _ = grids["roundtrip"]
    labels = [r[0] for r in rows]
    # two independently trained decoders draw different samples: each model shows its own
    assert "model\nx = g(z₀)" in labels and "tuned\nx = g(z₀)" in labels
    assert "model\n|x − g(μ(x))|" in labels and "tuned\n|x − g(μ(x))|" in labels
    errs = rows[labels.index("tuned\ng(μ(x))")][2]
    assert len(errs) == 4 and all(c.startswith("MSE ") for c in errs)
    assert (tmp_path / "ev" / "metrics.png").exists()


def test_metrics_figure_is_a_ratio_chart_of_two_models(tmp_path) -> None:
    from matplotlib.figure import Figure

    from selfconsist.plots import metrics_figure, ratio_with_error

    r, se = ratio_with_error({"value": 2.0, "stderr": 0.2}, {"value": 1.0, "stderr": 0.1})
    assert r == pytest.approx(0.5) and se == pytest.approx(0.5 * math.sqrt(0.01 + 0.01))
    assert ratio_with_error({"value": 0.0, "stderr": 0.0}, {"value": 0.0, "stderr": 0.0}) is None
    one = {"models": {"model": {"probe_acc": {"value": 0.5, "stderr": 0.01}}}}
    assert not metrics_figure(Figure, one, tmp_path / "one.png")  # no empty panels
    two = {"models": {"model": {"probe_acc": {"value": 0.5, "stderr": 0.01},
                                "probe_acc_ce@0.2": {"value": 0.0, "stderr": 0.0}},
                      "tuned": {"probe_acc": {"value": 0.6, "stderr": 0.01},
                                "probe_acc_ce@0.2": {"value": 0.0, "stderr": 0.0}}}}
    assert metrics_figure(Figure, two, tmp_path / "two.png")
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"


def test_roundtrip_figure_shows_shared_samples_once(tmp_path, monkeypatch) -> None:
    # A tuned model keeps the decoder: same z₀, same x = g(z₀), so one row of samples.
    from matplotlib.figure import Figure

    from selfconsist import plots

    seen = []
    monkeypatch.setattr(plots, "_grid", lambda F, rows, path, title, c=None: seen.append(rows))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    chains = {n: torch.stack([x, (x + d).clamp(0, 1)], 1) for n, d in (("model", 0.2),
                                                                      ("tuned", 0.05))}
    arts = {n: {"sample_chains": c, "data_range": (0.0, 1.0)} for n, c in chains.items()}
    assert plots.roundtrip_figure(Figure, arts, tmp_path / "r.png")
    labels = [r[0] for r in seen[0]]
    assert labels == ["x = g(z₀)", "model\ng(μ(x))", "model\n|x − g(μ(x))|",
                      "tuned\ng(μ(x))", "tuned\n|x − g(μ(x))|"]
    diff_rows = [r for r in seen[0] if "|x" in r[0]]
    assert diff_rows[0][3]["vmax"] == diff_rows[1][3]["vmax"]  # one colour scale for both
