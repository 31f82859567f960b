"""The trainer's parts, each alone on one CPU process: batch plan, train step with
gradient accumulation, layer-wise learning-rate decay, frozen backbone, classification
metrics, and the MLflow metric writer's exactly-once replay."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from vit_core.config import ConfigError, load_config
from vit_core.eval.metrics import ClassificationMetrics
from vit_core.model import create_model
from vit_core.track.runs import MetricWriter, reachable
from vit_core.train.config import ModelSection, TrainConfig
from vit_core.train.model_setup import build_model
from vit_core.train.optim import build_optimizer, build_scheduler
from vit_core.train.scaling import format_workers, scaling_config, worker_range
from vit_core.train.step import BatchPlan, TrainStep

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2)


def tiny(classes: int = 3):
    torch.manual_seed(0)
    model = create_model("vit_ti16", num_classes=classes, **TINY)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return model


def test_batch_plan_reaches_the_global_batch_and_the_step_budget():
    cfg = load_config(TrainConfig, None, ["train.global_batch_size=512",
                                          "train.micro_batch_size=32", "train.epochs=3"])  # fmt: skip
    plan = BatchPlan.of(cfg, num_train=10_000, world=4)
    assert (plan.accum, plan.steps_per_epoch, plan.total_steps) == (4, 19, 57)
    budget = load_config(TrainConfig, None, ["train.steps=500", "train.global_batch_size=512",
                                             "train.micro_batch_size=32"])  # fmt: skip
    assert BatchPlan.of(budget, 10_000, world=4).total_steps == 500


def test_an_elastic_worker_range_keeps_the_global_batch_and_the_budget():
    cfg = load_config(TrainConfig, None, ["scaling.num_workers=2..4", "train.epochs=3",
                                          "train.global_batch_size=512",
                                          "train.micro_batch_size=32"])  # fmt: skip
    assert worker_range(cfg) == (2, 4) and format_workers(cfg) == "2..4"
    assert scaling_config(cfg).num_workers == (2, 4)
    cfg.scaling.elastic_resize_monitor_interval_s = 5.0  # how soon a returned node is used
    assert scaling_config(cfg).elastic_resize_monitor_interval_s == 5.0
    # The driver fixes the budget for the largest group; a smaller one accumulates more.
    budget = BatchPlan.of(cfg, 10_000, world=4).total_steps
    smaller = BatchPlan.of(cfg, 10_000, world=2, total_steps=budget)
    assert (smaller.accum, smaller.steps_per_epoch, smaller.total_steps) == (8, 19, 57)
    assert smaller.micro * smaller.accum * 2 == 512
    fixed = load_config(TrainConfig, None, ["scaling.num_workers=3"])
    assert worker_range(fixed) == (3, 3) and scaling_config(fixed).num_workers == 3
    for bad in ("4..2", "0..2", "two", "1-3"):
        cfg.scaling.num_workers = bad
        with pytest.raises(ConfigError, match=f"scaling.num_workers: '{bad}'"):
            worker_range(cfg)


def test_accumulated_micro_batches_step_like_one_batch():
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    valid = torch.ones(8, dtype=torch.bool)
    cfg = load_config(TrainConfig, None, ["optim.name=sgd", "optim.lr=0.1",
                                          "optim.weight_decay=0", "optim.clip_grad_norm=0"])  # fmt: skip
    results = []
    for accum, chunks in ((1, 1), (4, 4)):
        model = tiny()
        optimizer = build_optimizer(model, cfg.optim)
        step = TrainStep(model, optimizer, build_scheduler(optimizer, 10, cfg.optim), cfg,
                         accum=accum, device=torch.device("cpu"))  # fmt: skip
        outs = [step.micro_step(xc, yc, vc) for xc, yc, vc in
                zip(x.chunk(chunks), y.chunk(chunks), valid.chunk(chunks), strict=True)]  # fmt: skip
        assert [o is not None for o in outs] == [False] * (chunks - 1) + [True]
        results.append(model.head.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_layer_decay_scales_learning_rates_by_depth():
    cfg = load_config(TrainConfig, None, ["optim.lr=1.0", "optim.layer_decay=0.5"])
    model = tiny()
    optimizer = build_optimizer(model, cfg.optim)

    def lr(param) -> float:
        return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))

    # depth 3: head and final norm 1, block 2: 0.5, block 1: 0.25, block 0: 0.125,
    # the embeddings 0.0625 (BEiT's layer-wise decay)
    assert lr(model.head.weight) == lr(model.norm.weight) == 1.0
    assert [lr(b.attn.qkv.weight) for b in model.blocks] == [0.125, 0.25, 0.5]
    assert lr(model.pos_embed) == lr(model.patch_embed.proj.weight) == 0.0625


def test_frozen_backbone_trains_the_head_only(tmp_path):
    from vit_core.model import save_model

    save_model(tiny(), tmp_path / "backbone")
    section = ModelSection(name=None, img_size=24, head="linear", replace_head=True,
                           freeze_backbone=True)  # fmt: skip
    model = build_model(section, num_classes=5, weights=tmp_path / "backbone")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"]
    assert model.config.img_size == 24 and model.head.out_features == 5
    assert torch.count_nonzero(model.head.weight) == 0  # the paper's zero-initialised head
    cfg = load_config(TrainConfig, None, ["model.freeze_backbone=true"])
    optimizer = build_optimizer(model, cfg.optim)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def test_classification_metrics_sum_and_calibration():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    a, b = ClassificationMetrics(3), ClassificationMetrics(3)
    a.update(logits[:2], labels[:2])
    b.update(logits[2:], labels[2:])
    merged = ClassificationMetrics(3).load_tensor(a.to_tensor() + b.to_tensor())
    out = merged.compute()
    assert out["top1"] == 0.5 and out["count"] == 4
    confidence = float(torch.softmax(logits[0], -1).max())
    assert out["ece"] == pytest.approx(abs(0.5 - confidence))  # one bin: acc 0.5 vs conf
    assert merged.confusion.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
    np.testing.assert_allclose(merged.per_class_accuracy(), [0.5, 1.0, 0.0])


def test_metric_writer_replays_only_what_mlflow_lacks(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment(f"writer-{uuid.uuid4().hex[:6]}"))
    writer = MetricWriter(mlflow_server.uri, run.info.run_id)
    for step in (2, 4, 6):
        writer.stage({"train/loss": 1.0 / step}, step)
    segment = writer.staged()
    writer.commit()
    assert writer.flush(30)
    # A resumed run replays the segment its checkpoint carries: nothing is doubled...
    assert writer.replay(segment) == 0
    # ...and what a killed process never sent arrives.
    lost = [["train/loss", 0.125, 0, 8]]
    assert writer.replay(segment + lost) == 1
    assert writer.close(30) == 0
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [2, 4, 6, 8]


def test_an_outage_longer_than_the_writer_holds_is_reported_not_fatal(capsys):
    from infra.local.stack import free_port

    # Nothing answers at this address: the writer holds 5 metrics, drops the oldest
    # beyond them, and says at the end how many never left; no call raises.
    writer = MetricWriter(f"http://127.0.0.1:{free_port()}", "no-such-run", max_pending=5)
    for step in range(1, 9):
        writer.log({"train/loss": 1.0 / step}, step)
    assert writer.dropped == 3
    assert writer.close(timeout=1) == 8
    assert "warning: 8 metrics never reached MLflow run no-such-run" in capsys.readouterr().out


def test_the_writer_asks_whether_a_tracking_server_answers_at_all(mlflow_server):
    from infra.local.stack import free_port

    # Before each batch: a server that answers (any status) is reachable, a closed port is
    # not, and a tracking URI that is not a server always is.
    assert reachable(mlflow_server.uri) and reachable(f"{mlflow_server.uri}/no-such-path")
    assert not reachable(f"http://127.0.0.1:{free_port()}", timeout=2)
    assert reachable("sqlite:///mlflow.db") and reachable("file:///tmp/mlruns")
