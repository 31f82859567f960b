"""Registering a trained model: a pyfunc version of the registered model, with tags."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

MODEL_CODE = Path(__file__).with_name("classifier_model.py")


def register_model(
    client: MlflowClient,
    run_id: str,
    model_dir: str | Path,
    name: str,
    preprocessing: dict,
    tags: dict[str, str],
) -> str:
    """Log `model_dir` (vit_core's safetensors format) as a pyfunc and register it.

    Returns the new version number.
    """
    import vit_core

    with tempfile.TemporaryDirectory() as tmp:
        pre_file = Path(tmp) / "preprocessing.json"
        pre_file.write_text(json.dumps(preprocessing, indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"model": str(model_dir), "preprocessing": str(pre_file)},
                code_paths=[str(Path(vit_core.__file__).parent)],
                # Listed, not inferred: inference would load the model a second time.
                pip_requirements=["torch", "numpy", "pandas", "pillow", "safetensors"],
            )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return str(version.version)
