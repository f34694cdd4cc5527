"""The sweep's table: every tuned testbed measured on the held-out photos (``sweep.py table``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure(base, tuned, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Held-out figures of ``tuned`` (and of ``base`` when ``tuned is base``)."""
    from selfconsist.realimage import cycle_metrics, latent_compatibility

    m = {k: e.as_dict() for k, e in cycle_metrics(tuned, x, (1, 2, 5, 10)).estimates.items()}
    if tuned is not base:
        m.update({k: e.as_dict() for k, e in latent_compatibility(base, tuned, x).items()})
        # img2img pipelines *sample* the posterior, so its width matters too: the geometric-mean
        # ratio σ_tuned/σ_base over elements, per image.
        with torch.no_grad():
            lv_b, lv_t = base.encode(x).logvar.float(), tuned.encode(x).logvar.float()
        r = (0.5 * (lv_t - lv_b)).flatten(1).mean(1).exp()
        m["sigma_ratio"] = {"value": float(r.mean()), "stderr": float(r.std() / len(r) ** 0.5)}
    return m


def fmt(e: dict[str, float] | None, digits: int = 2) -> str:
    if e is None:
        return "–"
    return f"{e['value']:.{digits}f} ± {e['stderr']:.{digits}f}"


def write_table(root: Path, names: list[str], heldout: Path, out: str | None,
                testbed: Path = HERE / "testbed-vae") -> None:
    import selfconsist
    from selfconsist.data import load_image_folder

    base = selfconsist.load(str(testbed))
    x = load_image_folder(heldout, tuple(base.data_shape), fit="crop", data_range=base.data_range).x
    rows = [("base (not tuned)", measure(base, base, x), None)]
    for name in names:
        path = root / "".join(c if c.isalnum() else "_" for c in name).strip("_")
        rec_path = path.with_name(path.name + ".json")
        if not rec_path.exists():
            continue
        rec = json.loads(rec_path.read_text())
        cache = path.with_name(path.name + ".heldout.json")  # measuring is the slow part
        if cache.exists():
            m = json.loads(cache.read_text())
        else:
            m = measure(base, selfconsist.load(str(path)), x)
            cache.write_text(json.dumps(m))
        rows.append((name, m, rec))
    b = rows[0][1]
    lines = [
        f"Held-out photos: {x.shape[0]} crops of {len(set(p.name.split('_s')[0] for p in heldout.iterdir()))} "
        "photos never seen in training, 64 px. Per-image means ± standard errors. Every run: "
        "`selfconsist.tune` on `examples/ldm/testbed-vae`, 300 steps (unless named), batch 8, seed 0, "
        "lr 1e-4 (unless named), λ_rec 5, bf16 autocast on this CPU; v is `obs_var` (default 0.1). "
        "`images` = `--images` with 64 crops of the training photos (`photos.py user`); anchors "
        "act on those images with `--images`, else on the decoded samples. σ ratio: geometric-mean "
        "σ_tuned/σ_base of the posterior on the held-out crops (img2img pipelines sample it). "
        "s/run: wall time on the shared 2-core machine with 2–5 runs at once, so only roughly "
        "comparable.",
        "",
        "Reproduce: `python examples/ldm/photos.py heldout runs/ldm/heldout && python "
        "examples/ldm/photos.py user runs/ldm/user && python examples/ldm/sweep.py tune && "
        "python examples/ldm/sweep.py table --out examples/ldm/results.md`.",
        "",
        "| setting | PSNR (dB) | Δ PSNR | PSNR after 10 cycles | dB lost, cycles 1→10 | latent shift (std) "
        "| σ ratio | sample round-trip MSE, before → after | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m, rec in rows:
        rt = "–"
        if rec is not None:
            bf, af = rec["before"]["sample_roundtrip_mse"]["value"], rec["after"]["sample_roundtrip_mse"]["value"]
            rt = f"{bf:.4f} → {af:.4f} (×{af / bf:.2f})"
        dpsnr = m["image_psnr"]["value"] - b["image_psnr"]["value"]
        lines.append(f"| {name} | {fmt(m['image_psnr'])} | {dpsnr:+.2f} | {fmt(m['cycle_psnr@10'])} | "
                     f"{fmt(m['cycle_db_lost'])} | {fmt(m.get('latent_shift'), 3)} | "
                     f"{fmt(m.get('sigma_ratio'))} | {rt} | "
                     f"{rec['seconds'] if rec else '–'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
