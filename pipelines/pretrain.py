"""Pretrain a Vision Transformer on Ray Train.

    python pipelines/pretrain.py                      # embedded default: digits, local Ray
    python pipelines/pretrain.py --config vit_b16_i21k --set scaling.num_workers=64
    ray job submit --working-dir . -- python pipelines/pretrain.py --config vit_b16_i1k

Services are found through the standard variables: RAY_ADDRESS, MLFLOW_TRACKING_URI,
AWS_ENDPOINT_URL_S3 / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. With none set, Ray
starts locally and MLflow writes to ./mlflow.db. Submitting again under the same
run_name resumes from the run's latest checkpoint; a finished run is not trained again.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.train.job import training_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return training_cli(__doc__, argv, "digits_tiny", ROOT / "pipelines" / "configs")


if __name__ == "__main__":
    sys.exit(main())
