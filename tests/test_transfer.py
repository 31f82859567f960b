"""The paper's transfer claim at toy scale (Dosovitskiy et al. 2020, section 4): a ViT
pretrained on one part of a dataset and fine-tuned with the paper's recipe on a small
labelled sample of another part beats the same model trained from scratch on that sample
with the same step budget.

Digits 0-5 (all their images) pretrain a small ViT; 20 images per class of digits 6-9
fine-tune it (head replaced by a zero-initialised linear layer, SGD with momentum, no
weight decay, cosine decay, clipping at 1); the rest of 6-9 is held out. The training
parts are the project's own (create_model, build_optimizer, build_scheduler, TrainStep,
decode_crop), run in one process: the claim is about the model and the recipe, and the
Ray Train path is covered by the pipeline tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_core.config import load_config
from vit_core.data.transforms import TransformSpec, decode_crop, normalize
from vit_core.model import create_model
from vit_core.train.config import TrainConfig
from vit_core.train.optim import build_optimizer, build_scheduler
from vit_core.train.step import TrainStep

SIZE = 32
MODEL = dict(img_size=SIZE, patch_size=8, embed_dim=96, depth=4, num_heads=3)
# Measured on the 2-core development machine, seeds 0, 1, 2 (held-out top-1 on digits 6-9,
# 600 pretraining steps, 100 fine-tuning steps): fine-tuned 0.907, 0.929, 0.931 against
# scratch 0.833, 0.785, 0.803; gaps 0.074 to 0.144. The margin is about half the smallest.
MARGIN = 0.04


def digits_by_class():
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((SIZE, SIZE),
                   Image.BICUBIC))
        for img in digits.images
    ])  # fmt: skip
    return images, digits.target


def batches(images, labels, steps, batch, seed):
    """Random training batches, each image random-resized-cropped (mildly), normalised."""
    rng = np.random.default_rng(seed)
    spec = TransformSpec(SIZE, train=True, num_classes=10, scale=(0.7, 1.0))
    for _ in range(steps):
        pick = rng.choice(len(images), batch, replace=len(images) < batch)
        pixels = np.stack([decode_crop(np.ascontiguousarray(images[i]), spec, rng) for i in pick])
        x = torch.from_numpy(normalize(pixels, [0.5] * 3, [0.5] * 3))
        yield x, torch.from_numpy(labels[pick]).long(), torch.ones(batch, dtype=torch.bool)


def train(model, images, labels, steps, batch, overrides, seed):
    cfg = load_config(TrainConfig, None, overrides)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, steps, cfg.optim)
    step = TrainStep(model, optimizer, scheduler, cfg, accum=1, device=torch.device("cpu"))
    model.train()
    for x, y, valid in batches(images, labels, steps, batch, seed):
        step.micro_step(x, y, valid)
    return model.eval()


def top1(model, images, labels) -> float:
    x = torch.from_numpy(normalize(images.transpose(0, 3, 1, 2) if images.ndim == 4
                                   else np.repeat(images[:, None], 3, 1), [0.5] * 3, [0.5] * 3))
    with torch.no_grad():
        return float((model(x).argmax(-1).numpy() == labels).mean())


PRETRAIN = ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05",
            "optim.warmup_steps=20", "optim.schedule=cosine"]  # fmt: skip
FINETUNE = ["optim.name=sgd", "optim.lr=0.03", "optim.momentum=0.9", "optim.weight_decay=0.0",
            "optim.warmup_steps=10", "optim.schedule=cosine", "optim.clip_grad_norm=1.0"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_pretrained_backbone_beats_scratch_on_a_small_sample(seed):
    torch.manual_seed(seed)
    images, target = digits_by_class()
    source = target <= 5
    rng = np.random.default_rng(seed)
    sample = np.concatenate([rng.choice(np.flatnonzero(target == c), 20, replace=False)
                             for c in range(6, 10)])  # fmt: skip
    held_out = np.setdiff1d(np.flatnonzero(target >= 6), sample)
    relabel = target - 6  # digits 6-9 become classes 0-3

    backbone = train(create_model("vit_ti16", num_classes=6, head="pretrain", **MODEL),
                     images[source], target[source], 600, 64, PRETRAIN, seed)  # fmt: skip
    finetuned = create_model(None, checkpoint=backbone.state_dict(), num_classes=4,
                             replace_head=True, **MODEL)  # fmt: skip
    assert finetuned.config.head == "linear"
    assert torch.count_nonzero(finetuned.head.weight) == 0  # zero-initialised (section 3.2)
    finetuned = train(finetuned, images[sample], relabel[sample], 100, 32, FINETUNE, seed)
    scratch = train(create_model("vit_ti16", num_classes=4, head="linear", **MODEL),
                    images[sample], relabel[sample], 100, 32, FINETUNE, seed)  # fmt: skip

    transfer = top1(finetuned, images[held_out], relabel[held_out])
    baseline = top1(scratch, images[held_out], relabel[held_out])
    print(f"held-out top-1 on digits 6-9: fine-tuned {transfer:.3f}, from scratch {baseline:.3f}")
    assert transfer >= baseline + MARGIN, (transfer, baseline)
