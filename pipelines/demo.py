"""The whole pipeline on the embedded default, with no servers to run:

1. pretrain a small ViT on scikit-learn's digits (made as PNG shards if missing) with
   Ray Train on a local Ray; it is registered as vit-digits-pretrain@backbone,
2. fine-tune it from the registry at a higher resolution (48 px) with the paper's SGD
   recipe; registered as vit-digits@candidate,
3. promote: evaluate candidate and champion on the held-out split with Ray Data batch
   inference and move `champion` if the candidate is better (McNemar's test),
4. serve: load models:/vit-digits@champion as MLflow loads it for serving and classify
   the held-out digits, sent as the PNG bytes a client would send,
5. print a summary: accuracies, versions and aliases, and how to open the MLflow UI.

    python pipelines/demo.py          # what `make demo` runs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

import finetune  # noqa: E402  (pipelines/finetune.py, beside this file)
import pretrain  # noqa: E402
import promote  # noqa: E402

DATA, SPLIT = "data/digits/v1", "val"
BACKBONE, CLASSIFIER = "vit-digits-pretrain", "vit-digits"


def held_out_pngs(location: str, split: str) -> tuple[list[bytes], list[str]]:
    """The split's images exactly as stored (PNG bytes) and their class names."""
    from vit_core.data import read_index
    from vit_core.data.index import open_stream
    from vit_core.data.shards import iter_samples

    index = read_index(location)
    images, labels = [], []
    for shard in index.shards(split):
        with open_stream(index.shard_location(shard)) as stream:
            for sample in iter_samples(stream.read):
                if sample.error is None:
                    images.append(sample.image)
                    labels.append(index.class_names[sample.label])
    return images, labels


def classify_with_champion(name: str) -> float:
    """Top-1 of models:/NAME@champion on the held-out digits sent as PNG bytes."""
    import mlflow
    import pandas as pd

    from vit_core.track.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, labels = held_out_pngs(DATA, SPLIT)
    predictions = model.predict(pd.DataFrame({"image": images}))
    return float((predictions["class_name"] == pd.Series(labels)).mean())


def aliases(name: str) -> str:
    from mlflow.tracking import MlflowClient

    from vit_core.track.runs import tracking_uri

    model = MlflowClient(tracking_uri()).get_registered_model(name)
    return ", ".join(f"{alias}=v{version}" for alias, version in sorted(model.aliases.items()))


def main() -> int:
    start = time.monotonic()
    for job in (pretrain.main, finetune.main):
        code = job([])
        if code != 0:
            return code
    code = promote.main(["--model", CLASSIFIER, "--data", DATA, "--split", SPLIT])
    if code != 0:
        return code
    accuracy = classify_with_champion(CLASSIFIER)
    print(
        "\n== demo summary ==\n"
        f"{CLASSIFIER}@champion on {SPLIT} (held-out) digits sent as PNG: {accuracy:.1%} top-1\n"
        f"{BACKBONE}: {aliases(BACKBONE)}\n"
        f"{CLASSIFIER}: {aliases(CLASSIFIER)}\n"
        f"took {time.monotonic() - start:.0f} s; runs, metrics and pictures: "
        "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
