"""The MLflow model registry as the hand-off between training, evaluation and serving.

Every registered version is an MLflow pyfunc (vit_core/track/classifier_model.py, logged
as code: no pickle) with a signature (an `image` column of encoded bytes), an input
example, and the model folder as its artifact: safetensors weights, config.json and
preprocessing.json (the preprocessing contract). The weights' SHA-256 is recorded at
registration, as a version tag and in the pyfunc's model_config, and checked whenever
the version is loaded.

    version = register_model(client, run_id, model_dir, "vit-digits", tags, alias="candidate")
    path = download_weights("models:/vit-digits@champion")     # the verified model folder
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

MODEL_CODE = Path(__file__).with_name("classifier_model.py")
WEIGHTS_FILE = "model.safetensors"
REGISTRATION_FILE = "registration.json"
SHA_TAG = "weights_sha256"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(RuntimeError):
    """A model URI that names nothing, or a version whose files do not match."""


def check_model_name(name: str) -> None:
    """MLflow's rule for registered model names, checked before any work starts.
    Raises RegistryError."""
    if not name.strip() or "/" in name or ":" in name:
        raise RegistryError(
            f"registered model name {name!r}: MLflow refuses names that are empty or contain "
            "'/' or ':'"
        )


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 (hex) of the model folder's weight file."""
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version).
    Raises RegistryError."""
    m = _URI.match(uri)
    if not m:
        raise RegistryError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def resolve_version(client: MlflowClient, uri: str):
    """The ModelVersion a models:/ URI names now (an alias is read once, so a job keeps
    one version even if the alias moves while it runs). Raises RegistryError."""
    name, alias, version = parse_model_uri(uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{uri}: no such registered model version ({err.message})") from None


def pin(uri: str, client: MlflowClient | None = None) -> tuple[str, object]:
    """(models:/NAME/VERSION, its ModelVersion) for a models:/ URI: an alias is read once,
    so a job, its workers and their restarts all use one version. Raises RegistryError."""
    mv = resolve_version(client or MlflowClient(), uri)
    return f"models:/{mv.name}/{mv.version}", mv


def _example_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def signature():
    """Input: an `image` column of encoded image bytes; output: the class index, its name
    and probability, and the top-k classes and probabilities as JSON-friendly lists."""
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("long", "class_index"),
                ColSpec("string", "class_name"),
                ColSpec("double", "probability"),
                ColSpec("string", "top_k"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", 5)]),
    )


@contextlib.contextmanager
def quiet_mlflow():
    """MLflow's notices while a model is logged and registered (its INFO lines, its
    artifact progress bar, its note that `predict` has no type hints: the signature is
    given) stay off the console; the caller prints one line for the registration."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
            yield
    finally:
        logger.setLevel(level)


def register_model(
    client: MlflowClient,
    run_id: str,
    model_dir: str | Path,
    name: str,
    tags: dict[str, str],
    alias: str | None = None,
) -> str:
    """Log `model_dir` (vit_core's format with preprocessing.json) as a pyfunc of the run
    and register it as a new version of `name`, tagged with `tags` and the weights'
    SHA-256; give it `alias` if set. Returns the version number."""
    import pandas as pd

    import vit_core

    digest = weights_digest(model_dir)
    with quiet_mlflow(), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"model": str(model_dir)},
            code_paths=[str(Path(vit_core.__file__).parent)],
            signature=signature(),
            input_example=pd.DataFrame({"image": [_example_png()]}),
            model_config={SHA_TAG: digest, "registered_model": name},
            # Listed, not inferred: inference would load the model a second time.
            pip_requirements=["torch", "numpy", "pandas", "pillow", "safetensors"],
        )
    with quiet_mlflow():
        registered = mlflow.register_model(info.model_uri, name, tags={**tags, SHA_TAG: digest})
    version = str(registered.version)
    # The served model names its version when its weights fail the check; the version is
    # known only now, so it joins the model's files after registration.
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / REGISTRATION_FILE
        record.write_text(json.dumps({"name": name, "version": version}))
        client.log_model_artifact(info.model_id, str(record))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def download_weights(uri: str, client: MlflowClient | None = None) -> Path:
    """The model folder (weights, config.json, preprocessing.json) of the version a
    models:/ URI names, downloaded once per node into the storage cache and checked
    against the SHA-256 recorded at registration on every call. Raises RegistryError."""
    import shutil

    from vit_core import storage

    # MLflow's per-file progress bars would flood the console of every worker and actor.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = client or MlflowClient()
    mv = resolve_version(client, uri)
    # Keyed by the registry too: two tracking servers can both have "NAME version 1".
    server = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:12]
    target = storage.cache_dir() / "registry" / server / mv.name / str(mv.version)
    expected = mv.tags.get(SHA_TAG)
    for _attempt in ("cached", "fresh"):
        if not target.is_dir():
            _download(mv, target)
        model_dir = model_folder(target)
        if not expected or weights_digest(model_dir) == expected:
            return model_dir
        # A cached copy can be stale (a registry recreated under the same URI): the
        # version's files are fetched once more before they are called changed.
        shutil.rmtree(target, ignore_errors=True)
    raise RegistryError(
        f"registered model {mv.name} version {mv.version}: weights file {WEIGHTS_FILE} "
        "changed after registration (its SHA-256 differs from the one recorded)"
    )


def _download(mv, target: Path) -> None:
    """The version's files into `target`, whole or not at all (also with several
    processes on one node)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(partial)
    )
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process was first


def model_folder(downloaded: Path) -> Path:
    """The weights folder inside a downloaded pyfunc: MLflow keeps a logged folder under
    its own name in artifacts/."""
    found = [p.parent for p in downloaded.glob("artifacts/*/config.json")]
    if len(found) != 1:
        raise RegistryError(f"{downloaded}: expected one model folder under artifacts/")
    return found[0]
