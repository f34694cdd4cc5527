"""Model passes per step and steps/s of ``tune`` on a latent-diffusion VAE, per recipe.

Builds the tune run as ``selfconsist tune`` does (``TuneRecipe.setup``, the family's defaults
plus the given settings), skips the before/after measurement, and runs ``--steps`` optimiser
steps. Every encoder and decoder call of the tuned model and of the frozen base copy is counted
in units of one batch (an encoder call on 2B images counts 2), forward passes only, split into
calls with and without gradient; the backward passes come on top of the ones with gradient.

Recipes: ``diffusers`` (the family's defaults: the cycle objective, pixel space, refine 2 with
each refined draw used in about 2 batches, iterates 0–3, anchor 10 on perturbed samples),
``fresh``, ``reuse2`` and ``reuse4`` (the same with ``--refine-reuse`` 1, 2 and 4: refined
prior draws made afresh every step, or each used in about 2 or 4 batches), ``norefine`` (the
same with ``--prior-refine 0``: what the refinement costs) and ``avae`` (the AVAE recipe:
``--objective avae`` with the generic λ_rec 5, no refinement, no anchor). The untimed warm-up
step fills a pool of refined draws, once a run.

With ``--rounds N`` the recipes run N times, alternated, and the last line gives each recipe's
steps/s over the first recipe's, the median of the N paired ratios (the machine's speed drifts;
a ratio within a round does not).

    OMP_NUM_THREADS=1 python benchmarks/bench_ldm_step.py examples/ldm/sdclass-vae --steps 20
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_ldm_step.py --recipes fresh,reuse4 --steps 6 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from typing import Any

import torch

RECIPES: dict[str, dict[str, Any]] = {
    "diffusers": {},
    "fresh": {"refine_reuse": 1},
    "reuse2": {"refine_reuse": 2},
    "reuse4": {"refine_reuse": 4},
    "norefine": {"prior_refine": 0},
    "avae": {"objective": "avae", "prior_refine": 0, "anchor": 0.0, "lambda_rec": 5.0},
}


def count_passes(adapter: Any, name: str, counter: Counter, batch: int) -> None:
    """Wrap ``adapter.encode``/``decode`` so each call adds its batch share to ``counter``."""
    for kind in ("encode", "decode"):
        inner = getattr(adapter, kind)

        def wrapped(t, _inner=inner, _kind=kind):
            grad = "grad" if torch.is_grad_enabled() else "no grad"
            counter[f"{name} {_kind} ({grad})"] += t.shape[0] / batch
            return _inner(t)

        setattr(adapter, kind, wrapped)


def run(model: str, recipe: str, steps: int, image_size: int | None, precision: str) -> dict[str, Any]:
    import selfconsist
    from selfconsist.tune import TuneConfig, TuneRecipe, adapted_obs_var, resolve_config

    vae = selfconsist.load(model, image_size=image_size) if image_size else selfconsist.load(model)
    cfg = TuneConfig(device="cpu", precision=precision, steps=steps, **RECIPES[recipe])
    settings = resolve_config(vae, cfg)
    r = TuneRecipe(vae, settings, None, resume=False, overwrite=False, progress=False, metadata=None)
    r.setup()
    # begin() would measure the base model first (minutes at SD size) and set v from it; the
    # step's passes and speed do not depend on v, so tune's rule without the measurement (the
    # given --obs-var, else the model's own) stands in for it here.
    r.obs_var = adapted_obs_var(settings.config, vae, before={})
    counter: Counter = Counter()
    batch = settings.config.batch_size
    count_passes(r.vae, "tuned", counter, batch)
    if r.base is not None:
        count_passes(r.base, "base", counter, batch)
    r.train_step()  # warm-up (not timed, not counted)
    counter.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        r.train_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    passes = {k: round(v / steps, 2) for k, v in sorted(counter.items())}
    return {"recipe": recipe, "objective": settings.config.objective, "batch": batch,
            "image_size": list(vae.image_size) if hasattr(vae, "image_size") else None,
            "precision": r.precision, "steps": steps, "passes_per_step": passes,
            "forward_passes_per_step": round(sum(passes.values()), 2),
            "with_grad_per_step": round(sum(v for k, v in passes.items() if "(grad)" in k), 2),
            "steps_per_s": round(steps / wall, 3), "steps_per_cpu_s": round(steps / cpu, 3),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="examples/ldm/sdclass-vae")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--recipes", default="diffusers,avae")
    p.add_argument("--rounds", type=int, default=1, help="run the recipes this many times, alternated")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    rows = []
    for _ in range(args.rounds):
        for recipe in recipes:
            rows.append(run(args.model, recipe, args.steps, args.image_size, args.precision))
            print(json.dumps(rows[-1]), flush=True)
    if args.rounds > 1 and len(recipes) > 1:
        rate = [{r["recipe"]: r["steps_per_s"] for r in rows[i:i + len(recipes)]}
                for i in range(0, len(rows), len(recipes))]
        ratios = {name: sorted(rd[name] / rd[recipes[0]] for rd in rate) for name in recipes[1:]}
        print(json.dumps({"steps_per_s_over": recipes[0], "rounds": args.rounds,
                          "paired_median": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
                          "range": {k: [round(v[0], 3), round(v[-1], 3)] for k, v in ratios.items()}}))
    return rows


if __name__ == "__main__":
    main()
