"""Where the ``selfconsist train`` step's time goes, against its gemm floor.

For the side-by-side comparison's model (ColorMNIST MLP 4×200, latent 64, batch 64, VAE and
AVAE) this times, in one process on one thread:

* ``step``: the whole train step as ``selfconsist train`` runs it (the built-in MLP's
  hand-derived step, ``selfconsist/mlp_step.py``, and fused Adam), and the autograd step it
  replaced (``--steps``);
* ``products``: every matrix product that step runs (recorded by a dispatch mode on a real
  step, so nothing is listed by hand), each timed alone at its own shapes and strides, best of
  ``--reps``: what the products cost when nothing else runs;
* ``products_in_order``: the same products run back to back once each, in the step's order,
  each on its own copy of its inputs (so a weight read by two products is read from two places:
  a pessimistic replay, more cache misses than the step has);
* ``products_in_step``: the products timed where they run, inside real steps (a dispatch mode
  times each call; median over ``--reps`` × 10 steps of their sum per step). The mode's own
  Python between the ops evicts some cache lines, so this is an upper bound on their cost in the
  step, and the closest of the three to it;
* ``adam``: the fused Adam update alone, on the same parameters with fixed gradients;
* ``rest``: step − products − adam (the elementwise ops, the loss, data indexing, autograd and
  Python), and ``rest_in_step`` with the products as timed in the step.

``--official-steps-per-s`` (a paired steady-state rate of the official code on the same core,
from ``bench_vs_official.py``) adds the budget a given speed-up leaves: at ``--target`` × the
official rate the step must take 1000 / (target · rate) ms, and that minus products and Adam is
what everything else may cost.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/step_floor.py --official-steps-per-s 48.3 36.6
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm.out,
            torch.ops.mkldnn._linear_pointwise.default}


class RecordProducts(TorchDispatchMode):
    """Records each matrix product's op and inputs (cloned, with their strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in PRODUCTS:  # copies with the same strides: a transposed view stays transposed
            saved = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
                          if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((func, saved, kwargs))
        return func(*args, **kwargs)


class TimeProducts(TorchDispatchMode):
    """Adds up the wall time of each matrix product of the steps run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func not in PRODUCTS:
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - t0
        return out


def best_ms(fn, reps: int, inner: int = 20) -> float:
    """Best mean time of ``inner`` calls over ``reps`` tries, in ms."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def make_train_step(objective: str, hand: bool, precision: str = "fp32"):
    """The ``selfconsist train`` step (batch 64) and its parameters and optimiser: the built-in
    MLP's hand-derived step (``hand``, what ``train`` runs) or the autograd one, in
    ``precision`` (``train --precision``)."""
    from selfconsist.models import ModelConfig
    from selfconsist.runtime import adam
    from selfconsist.train import new_model, train_step

    vae = new_model(ModelConfig(data_shape=(3, 28, 28), latent_dim=64, hidden=200), seed=0)
    params = list(vae.encoder_parameters()) + list(vae.decoder_parameters())
    opt = adam(params, 1e-3, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(1000, 3, 28, 28, generator=gen)
    step_fn = train_step(vae, 0.975 if objective == "avae" else None, hand=hand, precision=precision)

    def step() -> None:
        idx = torch.randint(1000, (64,), generator=gen)
        loss, _ = step_fn(x_all.index_select(0, idx), gen)
        loss.item()  # train's per-step NaN check
        opt.step()

    return step, params, opt


def measure(objective: str, reps: int, hand: bool, precision: str = "fp32") -> dict[str, float]:
    step, params, opt = make_train_step(objective, hand, precision)
    for _ in range(30):
        step()
    step_ms = statistics.median(best_ms(step, 1, 50) for _ in range(reps))

    rec = RecordProducts()
    with rec:
        step()
    products_ms = 0.0
    macs = 0
    for func, args, kwargs in rec.calls:
        products_ms += best_ms(lambda f=func, a=args, k=kwargs: f(*a, **k), reps)
        mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
        m, k = mats[0].shape
        n = mats[1].shape[0] if func is torch.ops.mkldnn._linear_pointwise.default else mats[1].shape[1]
        macs += m * k * n

    # The same products run once each in the step's order: their inputs no longer stay in cache
    # between calls, as in the step itself.
    def replay() -> None:
        for func, args, kwargs in rec.calls:
            func(*args, **kwargs)

    replay_ms = best_ms(replay, reps, inner=5)

    in_step = []
    for _ in range(10 * reps):
        with TimeProducts() as timer:
            step()
        in_step.append(timer.seconds * 1e3)
    in_step_ms = statistics.median(in_step)

    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adam_ms = best_ms(opt.step, reps)
    return {"step_ms": step_ms, "products_ms": products_ms, "products_in_order_ms": replay_ms,
            "products_in_step_ms": in_step_ms, "adam_ms": adam_ms,
            "rest_ms": step_ms - products_ms - adam_ms,
            "rest_in_step_ms": step_ms - in_step_ms - adam_ms, "products": len(rec.calls),
            "gflop": 2 * macs / 1e9, "products_gflops": 2 * macs / products_ms / 1e6}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--objectives", default="vae,avae")
    p.add_argument("--official-steps-per-s", type=float, nargs="*", default=None,
                   help="the official code's steady steps/s, one per objective, same order")
    p.add_argument("--target", type=float, default=1.2, help="the speed-up to budget for")
    p.add_argument("--steps", default="hand,autograd",
                   help="which train steps: hand (the built-in MLP's, what train runs), autograd, "
                   "hand16 (the hand-derived step in bf16, train --precision bf16)")
    args = p.parse_args(argv)
    from selfconsist.models import ONEDNN_LINEAR
    from selfconsist.runtime import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory(torch.device("cpu"))
    print(json.dumps({"threads": torch.get_num_threads(), "onednn_linear": ONEDNN_LINEAR["on"],
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    for (i, objective), kind in itertools.product(enumerate(args.objectives.split(",")),
                                                  args.steps.split(",")):
        r = {"objective": objective, "step": kind,
             **{k: round(v, 3) for k, v in measure(objective, args.reps, kind.startswith("hand"),
                                                    "bf16" if kind == "hand16" else "fp32").items()}}
        if args.official_steps_per_s:
            official = args.official_steps_per_s[i]
            budget = 1e3 / (args.target * official)
            r.update({"official_ms": round(1e3 / official, 3), f"budget_ms_at_{args.target}x": round(budget, 3),
                      "budget_left_for_rest_ms": round(budget - r["products_ms"] - r["adam_ms"], 3),
                      "budget_left_for_rest_in_step_ms": round(
                          budget - r["products_in_step_ms"] - r["adam_ms"], 3),
                      "best_possible_ratio_if_rest_were_0": round(
                          1e3 / official / (r["products_ms"] + r["adam_ms"]), 3)})
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
