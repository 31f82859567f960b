"""Search a training job's hyperparameters with Ray Tune: every trial is a Ray Train run
of the fine-tuning (or pretraining) job, nested under the search's MLflow run; ASHA stops
weak trials early; the best trial's model is registered with the alias `candidate` for
promote.py.

    python pipelines/tune.py                          # embedded default: the paper's
                                                      # learning-rate grid on digits
    python pipelines/tune.py --set tune.search=tpe --set tune.num_samples=8 \\
        --set 'tune.space={optim.lr: {loguniform: [1.0e-3, 0.1]}}'
    python pipelines/tune.py --config vit_b16_cifar10_384 --config my_space.yaml
    ray job submit --working-dir . -- python pipelines/tune.py --config ...

The search space is the config's `tune.space` (dotted config keys with grid, choice,
uniform, loguniform or int domains; see vit_core/tune/config.py). Submitted again under
the same run_name, a search continues where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.cli import run_cli  # noqa: E402
from vit_core.tune.config import SearchConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import argparse

    from vit_core.tune.search import run_search

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return run_cli(parser, argv, SearchConfig, run_search, ["digits_finetune", "digits_tune"],
                   ROOT / "pipelines" / "configs")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
