"""The per-worker training function that Ray Train runs on every worker, shared by
pretraining and fine-tuning (and, through them, tuning).

It reads its dataset shard, steps, validates, checkpoints and reports; each of those
is a part with its own module: model_setup (build, wrap), step (TrainStep, BatchPlan),
evaluator (validate), checkpoint (Checkpointer), metrics (TrainLogger). The driver
hands it a typed WorkerSpec (vit_core.train.job builds it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch

from vit_core.cluster import quiet_console_logger
from vit_core.data import iter_train_batches, mixup_fn
from vit_core.data.preprocessing import Preprocessing
from vit_core.train.checkpoint import Checkpointer, Progress
from vit_core.train.config import TrainConfig
from vit_core.train.distributed import all_gather, all_reduce_sum
from vit_core.train.evaluator import Validation, validate
from vit_core.train.metrics import StepTimer, TrainLogger, timed
from vit_core.train.model_setup import build_model, fetch_weights, full_cpu_model, wrap_model
from vit_core.train.optim import build_optimizer, build_scheduler
from vit_core.train.scaling import check_data_cpus
from vit_core.train.step import BatchPlan, TrainStep


@dataclass
class WorkerSpec:
    """What the driver resolved before any worker starts."""

    cfg: TrainConfig
    num_classes: int
    class_names: list[str]
    num_train: int
    total_steps: int  # the step budget, fixed on the driver for the largest worker group
    run_location: str  # <storage>/<run_name>: checkpoints and best_model/
    init_weights: str | None = None  # resolved starting weights (models:/NAME/VERSION, URI)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def train_loop_per_worker(config: dict) -> None:
    spec: WorkerSpec = config["spec"]
    cfg = spec.cfg
    # Ray Train logs its reports through loggers of its own files' names, so its
    # LoggingConfig misses them: they stay in the worker's log file, off the console.
    quiet_console_logger("")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)
    # A worker group restarted on a smaller cluster must still leave Ray Data its CPUs.
    check_data_cpus(cfg, world)
    # Accumulation to the recipe's global batch for this group's size; the budget (and
    # so the schedule) is the driver's, whatever size an elastic run has now.
    plan = BatchPlan.of(cfg, spec.num_train, world, spec.total_steps)
    if rank == 0:
        print(f"{world} worker{'s' if world != 1 else ''}: {plan.accum} micro-batch"
              f"{'es' if plan.accum != 1 else ''} of {plan.micro} per worker per step (global "
              f"batch {plan.micro * plan.accum * world})", flush=True)  # fmt: skip

    if spec.tracking_uri:  # a models:/ starting point is read from the driver's registry
        from vit_core.track.runs import set_tracking

        set_tracking(spec.tracking_uri)
    model = build_model(cfg.model, spec.num_classes, fetch_weights(spec.init_weights))
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay)
        )
        if cfg.optim.ema_decay > 0
        else None
    )
    model = wrap_model(model, cfg, device)
    if ema is not None:
        ema.to(device)  # averaged from, and validated on, the trainer's device
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, plan.total_steps, cfg.optim)
    checkpointer = Checkpointer(spec.run_location, rank, model, optimizer, scheduler, ema,
                                Preprocessing.from_data_config(cfg.data, spec.class_names))
    # A fresh job, a resubmitted one and a restarted worker group all start here.
    progress, restored = checkpointer.restore()
    logger = TrainLogger(rank, world, plan.total_steps, cfg.train.log_every_steps,
                         spec.tracking_uri, spec.mlflow_run_id)  # fmt: skip
    # Tags, not params: a restarted worker group may land on other nodes.
    node_ids = all_gather(ray.get_runtime_context().get_node_id())
    logger.tag("cluster.worker_nodes", ",".join(node_ids))
    # What actually wraps the model: DistributedDataParallel, FSDP<Model>, or the model.
    logger.tag("train.model_wrapper", type(model).__name__)
    if restored:
        logger.resumed(progress.step, restored, checkpointer.restored_metrics)

    step = TrainStep(model, optimizer, scheduler, cfg, plan.accum, device, ema,
                     mixup_fn(cfg.data, spec.num_classes))  # fmt: skip
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    timer = StepTimer()
    # With Polyak averaging the averaged weights are the ones validated, kept and served.
    evaluated = ema.module if ema is not None else model
    validation: Validation | None = None
    bad = 0  # bad samples seen since the last checkpoint
    model.train()
    while progress.step < plan.total_steps:
        epoch_end = min((progress.step // plan.steps_per_epoch + 1) * plan.steps_per_epoch,
                        plan.total_steps)  # fmt: skip
        step.reset()
        timer.reset()
        batches = iter_train_batches(train_shard, plan.micro, device, train=True,
                                     epoch=progress.epoch)  # fmt: skip
        progress.epoch += 1
        for images, labels, valid in timed(batches, timer):
            bad += int((~valid.bool()).sum())
            timer.images += int(valid.sum())
            result = step.micro_step(images, labels, valid)
            if result is None:
                continue
            progress.step += 1
            logger.step(progress.step, result.loss, scheduler.get_last_lr()[0],
                        result.grad_norm, timer)  # fmt: skip
            if progress.step >= epoch_end:
                break
            if cfg.train.eval_every_steps and progress.step % cfg.train.eval_every_steps == 0:
                validation = run_validation(evaluated, val_shard, spec, device)
                save(checkpointer, logger, progress, bad, device, validation)
                bad = 0
            elif progress.step % cfg.checkpoint.every_steps == 0:
                save(checkpointer, logger, progress, bad, device, None)
                bad = 0
        if progress.step >= epoch_end:
            validation = run_validation(evaluated, val_shard, spec, device)
            save(checkpointer, logger, progress, bad, device, validation)
    # Every rank takes part in gathering the weights; rank 0 draws the pictures.
    picture_model = full_cpu_model(evaluated) if spec.mlflow_run_id else None
    logger.finish(cfg.run_name, validation, spec.class_names, picture_model,
                  cfg.data.mean, cfg.data.std)  # fmt: skip


def run_validation(model, val_shard, spec: WorkerSpec, device) -> Validation:
    cfg = spec.cfg
    return validate(model, val_shard, spec.num_classes, cfg.train.micro_batch_size, device,
                    cfg.train.precision)  # fmt: skip


def save(
    checkpointer: Checkpointer, logger: TrainLogger, progress: Progress, bad: int,
    device: torch.device, validation: Validation | None,
) -> None:  # fmt: skip
    """Checkpoint and report; the metrics staged so far leave for MLflow once the
    checkpoint is on storage. The best model by val/top1 is kept as best_model/."""
    progress.bad_samples += int(all_reduce_sum([bad], device)[0])
    scalars = validation.scalars() if validation else {}
    best = scalars.get("val/top1", -1.0) > progress.best_top1
    if best:
        progress.best_top1 = scalars["val/top1"]
    metrics = {"epoch": progress.epoch, "bad_samples": progress.bad_samples, **scalars}
    segment = logger.stage(progress.step, {k: float(v) for k, v in metrics.items()})
    checkpointer.save(progress, {"step": progress.step, **metrics}, best, segment)
    logger.commit()

