"""What limits the cycle objective on the SD-class testbed: budget, generalisation or capacity?

    python examples/ldm/limits.py --out runs/ldm/limits/NAME.json [--lr 3e-4] [--size 32]
        [--train all|last] [--steps 1000] [--anchor 0] [--images runs/ldm/user]

A bare loop of the pixel-idempotence objective (the same math as ``tune --objective cycle``:
z₀ = μ_base(x_u) of the user crops, loss |g(μ(g(z₀))) − g(z₀)|²/(2v)·… in mean form, optional
mean anchor on x_u), so that one can watch, every ``--every`` steps, three things side by side:

* the training loss on the user crops it trains on, and the same loss on held-out TEST crops
  (the generalisation gap);
* the dB lost between cycles 1 and 10 (posterior means) on 32 held-out TEST crops and on 32 of
  the user crops (does the loop improve where it trained, but not elsewhere?);
* the latent shift of the TEST crops against the base encoder (σ units).

``--teacher`` measures instead what distilling the exact decoder inversion (the idempotent
bound's z = argmin ‖g(z) − x‖²) would ask of the encoder, on the held-out crops: on a real image
(the first encode) and on a decoded one (every later encode).

``--distill W`` adds the teacher to the loop: the exact inversions z* of the user crops
(computed once), the loss W·‖μ(x_u) − z*‖²/s² on the real crops plus the pixel idempotence at
z₀ = z* (so the loop's latents are the teacher's, and every later encode must return a preimage).

``--size`` is the crop size the loop trains at (64 = the size it is measured at); ``--train
last`` trains only the encoder's last block and output convolution (capacity/which layers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import selfconsist
from selfconsist import objective as obj
from selfconsist.data import load_image_folder
from selfconsist.realimage import cycle_metrics, invert_decoder, psnr_per_image

HERE = Path(__file__).resolve().parent


def crops(x: torch.Tensor, size: int, gen: torch.Generator, n: int,
          z: torch.Tensor | None = None, f: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n random crops of ``size`` px (on the latent grid of factor ``f``), and of ``z`` alike."""
    idx = torch.randint(x.shape[0], (n,), generator=gen)
    if size >= x.shape[-1]:
        return x[idx], None if z is None else z[idx]
    i, j = (int(v) * f for v in torch.randint((x.shape[-1] - size) // f + 1, (2,), generator=gen))
    zc = None if z is None else z[idx, :, i // f : (i + size) // f, j // f : (j + size) // f]
    return x[idx, :, i : i + size, j : j + size], zc


@torch.no_grad()
def probe(vae, base, x: torch.Tensor) -> dict[str, float]:
    """dB lost 1→10 (means), single pass, latent shift and the cycle loss on ``x``."""
    res = cycle_metrics(vae, x, (1, 10), mode="mean")
    s = base.prior.std
    mu_b = base.encode(x).mean.float()
    shift = ((vae.encode(x).mean.float() - mu_b) / s).pow(2).mean().sqrt()
    xd = base.decode(mu_b).float()
    loss = (vae.decode(vae.encode(xd).mean.float()).float() - xd).pow(2).mean()
    return {"db_lost": res.estimates["cycle_db_lost"].value, "psnr": res.estimates["image_psnr"].value,
            "shift": float(shift), "cycle_mse": float(loss)}


@torch.no_grad()
def teacher(base, x: torch.Tensor) -> dict[str, float]:
    """How far the inversion teacher sits from the base encoder, in σ units (RMS over elements)."""
    s = base.prior.std

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b) / s).pow(2).mean().sqrt())

    def db(z: torch.Tensor, ref: torch.Tensor) -> float:
        return float(psnr_per_image(base.decode(z).float().clamp(*base.data_range), ref, base.data_range).mean())

    z1 = base.encode(x).mean.float()
    x1 = base.decode(z1).float().clamp(*base.data_range)
    z_real = invert_decoder(base, x, z1)          # the teacher on the real image
    z2 = base.encode(x1).mean.float()             # what the base encoder does on its own output
    z_dec = invert_decoder(base, x1, z2)          # the teacher on the decoded image
    return {"real: teacher shift from mu_base (sigma)": rms(z_real, z1),
            "real: single pass dB, encoder": db(z1, x), "real: single pass dB, teacher": db(z_real, x),
            "decoded: base encoder step |mu(g(z1)) - z1| (sigma)": rms(z2, z1),
            "decoded: teacher distance from z1 (sigma)": rms(z_dec, z1),
            "decoded: PSNR of g(teacher) vs x1": db(z_dec, x1), "decoded: PSNR of g(mu) vs x1": db(z2, x1)}


def plot(records: list[Path], out: Path) -> None:
    """Per record: the cycle MSE and the dB lost against steps, on the tuning crops and held out."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for rec, colour in zip(records, ("#36c", "#c44", "#2a7", "#a6c"), strict=False):
        d = json.loads(rec.read_text())
        steps = [r["step"] for r in d["probes"]]
        label = rec.stem.replace("_", " ")
        for ax, key in zip(axes, ("cycle_mse", "db_lost"), strict=True):
            for where, ls in (("user", "--"), ("test", "-")):
                v = [r[where][key] for r in d["probes"]]
                ax.plot(steps, [x / v[0] for x in v], ls, c=colour, marker="o", ms=3,
                        label=f"{label}: {'tuning crops' if where == 'user' else 'held-out crops'}")
    axes[0].set_title("one cycle's error |g(μ(g(z₁))) − g(z₁)|², relative to the base")
    axes[1].set_title("dB lost, cycles 1 → 10 (32 crops), relative to the base")
    for ax in axes:
        ax.axhline(0.5, color="#999", lw=0.8, ls=":")
        ax.set_xlabel("tuning step")
        ax.set_yscale("log")  # a run that diverges must not flatten the ones that learn
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("SD-class testbed, pixel idempotence on the user crops: the encoder learns where it "
                 "trains, and less of it carries to held-out photos", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--anchor", type=float, default=0.0)
    ap.add_argument("--train", choices=("all", "last"), default="all")
    ap.add_argument("--images", default="runs/ldm/user")
    ap.add_argument("--test", default="runs/ldm/test")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the step (as the sweep)")
    ap.add_argument("--teacher", action="store_true", help="measure the inversion teacher, no training")
    ap.add_argument("--distill", type=float, default=0.0, help="weight of the inversion teacher")
    ap.add_argument("--plot", type=Path, nargs="+", default=None, help="records to draw into --out (a PNG)")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.out)
        return
    torch.set_num_threads(1)
    if args.teacher:
        base = selfconsist.load(str(HERE / "sdclass-vae"))
        x = load_image_folder(Path(args.test), tuple(base.data_shape), fit="crop", data_range=base.data_range).x[:12]
        res = teacher(base, x)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    base = selfconsist.load(str(HERE / "sdclass-vae"))
    vae = selfconsist.load(str(HERE / "sdclass-vae"))
    shape, rng = tuple(base.data_shape), base.data_range
    xu = load_image_folder(Path(args.images), shape, fit="crop", data_range=rng).x
    xt = load_image_folder(Path(args.test), shape, fit="crop", data_range=rng).x[:32]
    params = list(vae.encoder_parameters())
    if args.train == "last":
        names = dict(vae.model.encoder.named_parameters())  # diffusers: mid block + conv_out
        params = [p for n, p in names.items() if n.startswith(("mid_block", "conv_norm_out", "conv_out"))]
        params += list(vae.model.quant_conv.parameters())
    for p in vae.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.lr)
    s = base.prior.std
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "probes": []}

    def record(step: int) -> None:
        t = time.time()
        row = {"step": step, "test": probe(vae, base, xt), "user": probe(vae, base, xu[:32])}
        log["probes"].append(row)
        print(json.dumps(row), f"({time.time() - t:.0f} s)", flush=True)
        args.out.write_text(json.dumps(log, indent=1))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    z_star = None
    if args.distill > 0:
        cache = args.out.parent / f"teacher_{Path(args.images).name}.pt"
        if cache.exists():
            z_star = torch.load(cache)
        else:
            t = time.time()
            z_star = torch.cat([invert_decoder(base, xu[i : i + 16], base.encode(xu[i : i + 16]).mean.float())
                                for i in range(0, len(xu), 16)])
            torch.save(z_star, cache)
            print(f"teacher latents of {len(xu)} crops: {time.time() - t:.0f} s", flush=True)
    record(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        xb, zb = crops(xu, args.size, gen, args.batch, z_star)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():
                z0 = base.encode(xb).mean.float() if zb is None else zb
                x = vae.decode(z0).float()
            w, target = (args.distill, zb) if zb is not None else (args.anchor, z0)
            inp = torch.cat([x, xb]) if w > 0 else x
            mean = vae.encode(inp).mean.float()
            loss = obj.pixel_idempotence(vae.decode(mean[: len(x)]).float(), x, 1.0).mean()
            if w > 0:  # the anchor (target μ_base) or the teacher (target z*) on the real crops
                loss = loss + w * obj.mean_anchor(mean[len(x):], target, s).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            log["seconds_per_step"] = (time.time() - t0) / step
            record(step)


if __name__ == "__main__":
    main()
