"""How far the bf16 tune step's gradients are from bf16 autocast's and from fp32's, on one batch.

For a built-in MLP (``--model``, a .safetensors) at tune's resolved settings for it, computes
one step's loss, terms and encoder gradients three ways on the same z₀ and draws: the
hand-derived bf16 step (``mlp_step.MLPTuneStep``, what ``tune --precision bf16`` runs on CPU),
``posthoc_terms`` with autograd under bf16 autocast, and the same in fp32. Prints whether loss
and terms equal autocast's bit for bit and, per gradient tensor, max |a − b| / max |a| and the
cosine between the two.

    python benchmarks/bf16_grads.py --model runs/cm/vae.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import selfconsist
from selfconsist import mlp_step
from selfconsist.posthoc import avae_loss, posthoc_terms
from selfconsist.tune import TuneConfig, resolve_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    vae = selfconsist.load(args.model)
    cfg = resolve_config(vae, TuneConfig(device="cpu", precision="bf16")).config
    vae.freeze_decoder()
    vae.set_encoder_mode(False)
    z0 = vae.sample_prior(args.batch, torch.Generator().manual_seed(3))
    enc = list(vae.encoder_parameters())

    def step(kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        for q in enc:
            q.grad = None
        gen = torch.Generator().manual_seed(7)
        if kind == "hand":
            loss, terms = mlp_step.MLPTuneStep(vae, cfg, "bf16")(z0, vae.obs_var, gen)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
                terms = posthoc_terms(vae, z0, cfg, vae.obs_var, gen)
            loss = avae_loss(terms, cfg)
            loss.backward()
        return loss.detach(), {k: v.detach() for k, v in terms.items()}, [q.grad.clone() for q in enc]

    (la, ta, ga), (lh, th, gh), (_, _, g32) = step("autocast"), step("hand"), step("fp32")
    cos = torch.nn.functional.cosine_similarity

    def diff(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        return {"relmax": round(((ref - x).abs().max() / ref.abs().max()).item(), 4),
                "cos": round(cos(ref.flatten(), x.flatten(), dim=0).item(), 6)}

    print(json.dumps({"settings": {k: getattr(cfg, k) for k in ("rho", "lambda_rec", "sample_noise")},
                      "batch": args.batch, "loss_equal": torch.equal(la, lh),
                      "terms_equal": all(torch.equal(ta[k], th[k]) for k in ta)}))
    for i, (a, h, f) in enumerate(zip(ga, gh, g32, strict=True)):
        print(json.dumps({"tensor": i, "shape": list(a.shape), "hand_vs_autocast": diff(a, h),
                          "autocast_vs_fp32": diff(f, a), "hand_vs_fp32": diff(f, h)}))


if __name__ == "__main__":
    main()
