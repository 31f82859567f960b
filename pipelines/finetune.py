"""Fine-tune a Vision Transformer on Ray Train: the training job with a fine-tuning
preset (paper section 3.2 and Table 4): the pretraining head replaced by a zero-
initialised linear layer, position embeddings interpolated to the new resolution, SGD
with momentum 0.9, no weight decay, cosine decay after a short warmup, clipping at 1,
batch 512, a step budget.

    python pipelines/finetune.py                       # embedded default: digits, from
                                                       # models:/vit-digits-pretrain@backbone
    python pipelines/finetune.py --config vit_b16_cifar10_384 \\
        --set model.init_from=models:/vit-b16-pretrain@backbone
    python pipelines/finetune.py --set model.init_from=s3://bucket/ViT-B_16.npz
    ray job submit --working-dir . -- python pipelines/finetune.py --config vit_b16_i1k_384

Starting weights (model.init_from): models:/NAME@ALIAS or models:/NAME/VERSION, a
training run's checkpoint or best_model URI, or a timm / transformers / JAX .npz file.
The new version is registered with the alias `candidate` for promote.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.train.job import training_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return training_cli(__doc__, argv, "digits_finetune", ROOT / "pipelines" / "configs")


if __name__ == "__main__":
    sys.exit(main())
