"""The demo pipeline on the embedded default, with no servers to run:

1. make the digits shards (scikit-learn's bundled digits, as PNGs) if missing,
2. pretrain a small ViT on them with Ray Train on a local Ray,
3. load the registered model back from the MLflow registry and classify digits sent to
   it as PNG bytes (as a client of the served model would).

    python pipelines/demo.py          # what `make demo` runs
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

import pretrain  # noqa: E402  (pipelines/pretrain.py, beside this file)


def classify_with_registered_model(model_name: str, count: int = 200) -> float:
    """Accuracy of the newest registered version on digits sent as PNG bytes (the
    sample mixes training and validation images: a check of the serving path, not a
    held-out score)."""
    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    from vit_core.track.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{model_name}'"))
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{latest}")
    digits = load_digits()
    pick = np.random.default_rng(1).choice(len(digits.images), count, replace=False)
    pngs = []
    for i in pick:
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.BICUBIC).save(buf, "PNG")
        pngs.append(buf.getvalue())
    predictions = model.predict(pd.DataFrame({"image": pngs}))
    accuracy = float((predictions["class_name"].astype(int).values == digits.target[pick]).mean())
    print(f"registered model {model_name} v{latest}: {accuracy:.1%} on {count} digits (PNG input)")
    return accuracy


def main() -> int:
    code = pretrain.main([])
    if code != 0:
        return code
    classify_with_registered_model("vit-digits-pretrain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
