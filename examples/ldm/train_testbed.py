"""Train the latent-diffusion testbed: a small SD-style ``AutoencoderKL``, from scratch, offline.

SD-like where it matters for self-consistency: 4 latent channels, 4× downsampling, a KL weight
of 1e-6 against a reconstruction loss summed over pixels (so the posterior is nearly a point,
as in SD), and ``scaling_factor`` / ``shift_factor`` set from the latents of its training crops
the way SD's and SD3's were (1/std and mean). It trains on random multi-scale crops (15–100% of
a photo's shorter side, resized to 64 px, random flips) of the TRAIN photos in ``photos.py``;
the HELDOUT photos are never seen.

    python examples/ldm/train_testbed.py --out examples/ldm/testbed-vae

On CPUs with bf16 units the forward/backward runs under bf16 autocast with channels_last
(about 2× fp32 on this project's machine); weights and Adam stay fp32. The committed weights
are stored in fp16 (`training.json` beside them records the command, settings and timings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import SIZE, TRAIN, heldout_crops, photo  # noqa: E402


def build_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32)


def random_crops(imgs: list[torch.Tensor], n: int, g: torch.Generator) -> torch.Tensor:
    """n random square crops (15–100% of the shorter side), resized to SIZE, random h-flips,
    scaled to [−1, 1]."""
    from photos import crop

    out = []
    for _ in range(n):
        img = imgs[int(torch.randint(len(imgs), (1,), generator=g))]
        h, w = img.shape[1:]
        side = max(SIZE // 2, int(min(h, w) * (0.15 + 0.85 * float(torch.rand(1, generator=g)))))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        x = crop(img, top, left, side)
        if float(torch.rand(1, generator=g)) < 0.5:
            x = x.flip(-1)
        out.append(x)
    return torch.stack(out) * 2 - 1


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR for images in [−1, 1] (data range 2)."""
    mse = (x.clamp(-1, 1) - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/ldm/testbed-vae")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    imgs = [photo(n) for n in TRAIN]
    model = build_model().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model.train()
    for step in range(args.steps):
        x = random_crops(imgs, args.batch_size, g).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=args.precision == "bf16"):
            post = model.encode(x).latent_dist
            z = post.sample(generator=None)
            xr = model.decode(z).sample.float()
        d = xr - x
        # L1 + L2 summed over pixels (SD's loss is L1 + perceptual + GAN; we have no LPIPS
        # offline), KL summed over latent elements with a weight of 1e-6, as in SD.
        rec = (d.abs() + d.pow(2)).flatten(1).sum(1).mean()
        kl = post.kl().mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  rec {rec.item():.1f}  kl {kl.item():.0f}  "
                  f"logvar {post.logvar.mean().item():.2f}  {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0

    model.eval()
    with torch.no_grad():
        # Latent statistics of training crops, as SD (1/std) and SD3/FLUX (shift = mean) did.
        zs = torch.cat([model.encode(random_crops(imgs, 64, g)).latent_dist.sample() for _ in range(8)])
        shift, scale = zs.mean().item(), 1.0 / zs.std().item()
        held = torch.stack([x for _, x in heldout_crops()]) * 2 - 1
        held_psnr = psnr(model.decode(model.encode(held).latent_dist.mode()).sample, held)
    model.register_to_config(scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    out = Path(args.out)
    model.to(memory_format=torch.contiguous_format).half().save_pretrained(out)
    record = {
        "command": "python " + " ".join(sys.argv),
        "train_seconds": round(train_s, 1),
        "threads": args.threads,
        "settings": vars(args),
        "train_photos": list(TRAIN),
        "heldout_photos": "see heldout.txt",
        "scaling_factor": round(scale, 5),
        "shift_factor": round(shift, 5),
        "heldout_psnr_db": round(held_psnr.mean().item(), 2),
        "heldout_crops": len(held),
        "posterior_logvar_mean": round(post.logvar.float().mean().item(), 2),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
