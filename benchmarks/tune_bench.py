"""What ASHA and TPE buy over a plain grid and random search, on the same space and
budget, each search a real run of pipelines/tune.py's driver (every trial a Ray Train
run) on a local Ray, digits at 32 px, a small ViT trained from scratch with AdamW.

    python benchmarks/tune_bench.py                  # about an hour on 2 cores
    python benchmarks/tune_bench.py --searches grid,asha --grid 6 --steps 90

Four searches:
  grid      the learning-rate grid (log-spaced), every trial to the end
  asha-K    the same grid with ASHA (grace period and reduction factor below), once for
            each of --orders random orders of the grid (K: the order's seed)
  random    --trials draws of the learning rate and weight decay (log-uniform)
  tpe       the same space and number of trials with Optuna's TPE
Prints total trial-steps, wall time and the best val/top1 of each, and the ratios
(grid / asha for steps and time; asha - grid and tpe - random for the best metric).

Every trial reads its batches in the same order (data.preserve_order) from the same seeds,
so a learning rate's curve is the same in every search: the grid and ASHA differ only in
which trials ASHA stops. ASHA runs once per order of the grid because its rungs are
asynchronous: the first trials to reach a rung have nothing to be compared with and pass,
so what it spends and finds depends on which rates come first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def search(name: str, work: Path, data: str, args, extra: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    from vit_core.config import load_config
    from vit_core.tune.config import SearchConfig
    from vit_core.tune.search import run_search

    configs = ROOT / "pipelines" / "configs"
    cfg = load_config(SearchConfig, [configs / "digits_tiny.yaml", configs / "digits_tune.yaml"], [
        f"run_name=bench-{name}", f"storage={work / 'runs'}", f"data.location={data}",
        "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "scaling.num_workers=1",
        "data.preserve_order=true",
        f"train.steps={args.steps}", f"train.eval_every_steps={args.eval_every}",
        f"checkpoint.every_steps={args.steps}", "train.log_every_steps=1000",
        "optim.warmup_steps=5", "scaling.max_failures=0", "tracking.register=false",
        f"tracking.experiment=bench-{name}", f"tune.grace_period={args.grace}",
        f"tune.reduction_factor={args.reduction}",
        f"tune.max_concurrent_trials={args.concurrency}", *extra,
    ])  # fmt: skip
    start = time.perf_counter()
    outcome = run_search(cfg)
    wall = time.perf_counter() - start
    metrics = MlflowClient().get_run(outcome.mlflow_run_id).data.metrics
    return {
        "steps": metrics["tune/total_trial_steps"],
        "wall": wall,
        "best": metrics["tune/best_val_top1"],
        "trials": metrics["tune/trials"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=9, help="learning rates in the grid")
    parser.add_argument("--trials", type=int, default=9, help="trials of random and tpe")
    parser.add_argument("--steps", type=int, default=270, help="a trial's step budget")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--grace", type=int, default=10, help="ASHA's grace period (steps)")
    parser.add_argument("--reduction", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--orders", type=int, default=3,
                        help="ASHA searches, each with the grid listed in another random order")  # fmt: skip
    parser.add_argument("--searches", default="grid,asha,random,tpe",
                        help="which of the four to run (comma-separated)")  # fmt: skip
    args = parser.parse_args()

    import numpy as np

    from vit_core.data import make_digits_shards

    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    data = str(work / "digits")
    make_digits_shards(data, image_size=32, progress=False)
    rates = np.logspace(-5, -1, args.grid)

    def lr_grid(order: int) -> str:  # the grid listed in a seeded random order
        values = [float(f"{v:.3g}") for v in np.random.default_rng(order).permutation(rates)]
        return f"tune.space={{optim.lr: {{grid: {values}}}}}"

    wide = ("tune.space={optim.lr: {loguniform: [1.0e-5, 0.1]}, "
            "optim.weight_decay: {loguniform: [1.0e-4, 0.3]}}")  # fmt: skip
    plans = {"grid": [lr_grid(0), "tune.scheduler=fifo"]}
    for order in range(args.orders):
        plans[f"asha-{order}"] = [lr_grid(order), "tune.scheduler=asha"]
    plans["random"] = [wide, "tune.search=random", f"tune.num_samples={args.trials}",
                       "tune.scheduler=fifo"]  # fmt: skip
    plans["tpe"] = [wide, "tune.search=tpe", f"tune.num_samples={args.trials}",
                    "tune.scheduler=fifo"]  # fmt: skip
    chosen = args.searches.split(",")
    results = {
        name: search(name, work, data, args, plan)
        for name, plan in plans.items()
        if name.split("-")[0] in chosen
    }
    print(f"\nspace: grid of {args.grid} rates {[float(f'{v:.3g}') for v in rates]} "
          f"({args.steps} steps a trial); random/tpe: {args.trials} trials, lr and weight "
          "decay log-uniform")  # fmt: skip
    print(f"{'search':8} {'trials':>6} {'trial-steps':>11} {'wall s':>7} {'best val/top1':>13}")
    for name, r in results.items():
        print(f"{name:8} {r['trials']:6.0f} {r['steps']:11.0f} {r['wall']:7.0f} {r['best']:13.4f}")
    ashas = {name: r for name, r in results.items() if name.startswith("asha-")}
    if "grid" in results and ashas:
        g = results["grid"]
        for name, a in ashas.items():
            print(f"grid/{name}: {g['steps'] / a['steps']:.2f}x trial-steps, "
                  f"{g['wall'] / a['wall']:.2f}x wall time; best {name} - grid: "
                  f"{100 * (a['best'] - g['best']):+.1f} points")  # fmt: skip
        mean_steps = sum(a["steps"] for a in ashas.values()) / len(ashas)
        worst = min(a["best"] for a in ashas.values())
        print(f"over {len(ashas)} orders: grid/asha {g['steps'] / mean_steps:.2f}x trial-steps "
              f"on average; worst best asha - grid: {100 * (worst - g['best']):+.1f} points")  # fmt: skip
    if "random" in results and "tpe" in results:
        print(f"best tpe - random after {args.trials} trials: "
              f"{100 * (results['tpe']['best'] - results['random']['best']):+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
