"""The search job's config: a training config (pretraining or fine-tuning) plus a `tune`
section with the search space, the search algorithm and the trial scheduler.

The space names config keys by their dotted names, each with one kind of domain:

    tune:
      space:
        optim.lr: {grid: [0.001, 0.003, 0.01, 0.03]}     # every value, in turn
        optim.momentum: {choice: [0.8, 0.9, 0.95]}       # one value drawn per trial
        optim.weight_decay: {loguniform: [1.0e-5, 1.0e-2]}
        data.scale_min: {uniform: [0.5, 1.0]}
        optim.warmup_steps: {int: [0, 100]}              # both ends included

An empty space is the paper's fine-tuning learning-rate grid (Dosovitskiy et al. 2020,
Table 4): {0.003, 0.01, 0.03, 0.06} for ImageNet-sized label sets (1000 classes or more),
{0.001, 0.003, 0.01, 0.03} for the smaller datasets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from vit_core.config import ConfigError, from_dict, set_dotted, to_dict
from vit_core.train.config import TrainConfig

DOMAINS = ("grid", "choice", "uniform", "loguniform", "int")
PAPER_LR_GRID = [0.001, 0.003, 0.01, 0.03]
PAPER_LR_GRID_IMAGENET = [0.003, 0.01, 0.03, 0.06]
# Keys a trial may not change: where runs live and what they are called are the
# search's, and every trial gets the same resources (concurrency is planned from them).
FIXED_SECTIONS = ("run_name", "storage", "tracking", "scaling")


@dataclass
class TuneSection:
    # Dotted config key -> {grid|choice|uniform|loguniform|int: values or [low, high]}.
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    # grid: every combination of the grid values; random: Ray Tune's random sampling;
    # tpe: Optuna's Tree-structured Parzen Estimator through Ray Tune's OptunaSearch.
    search: Literal["grid", "random", "tpe"] = "grid"
    # Trials for random and tpe; for grid, how many times the whole grid runs.
    num_samples: int = 1
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    # asha: asynchronous successive halving (Li et al. 2020) on `metric`, rungs at
    # grace_period * reduction_factor**k optimiser steps; fifo: every trial runs to the end.
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 100  # optimiser steps before a trial can be stopped
    reduction_factor: float = 3.0
    # Trials running at once; 0: as many as the cluster's CPUs (and GPUs) hold.
    max_concurrent_trials: int = 0
    # Times a failed trial is started again (from its checkpoint) before it is recorded
    # as failed; a failed trial never ends the search.
    max_failures: int = 0
    # tpe: trials Optuna's TPESampler draws at random before it models the space
    # (n_startup_trials; Optuna's default is 10). A search of fewer trials than this is
    # random search.
    tpe_startup_trials: int = 10
    seed: int = 0


@dataclass
class SearchConfig(TrainConfig):
    """A training config whose `run_name` names the search; each trial trains as
    `<run_name>-<trial id>` under `<storage>/<run_name>/trials/`."""

    run_name: str = "vit-tune"
    tune: TuneSection = field(default_factory=TuneSection)


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # one of DOMAINS
    values: list  # the grid/choice values, or [low, high]


def train_config(cfg: SearchConfig) -> TrainConfig:
    """The training config every trial starts from (the search's, without `tune`)."""
    data = to_dict(cfg)
    data.pop("tune")
    return from_dict(TrainConfig, data)


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """`base` with the trial's sampled values put in by dotted key. Raises ConfigError
    naming the key when a value does not fit its field."""
    data = copy.deepcopy(to_dict(base))
    for key, value in params.items():
        set_dotted(data, key, value)
    return from_dict(TrainConfig, data)


def dimensions(cfg: SearchConfig, num_classes: int) -> list[Dimension]:
    """The checked search space: every key a field of the training config, every value
    (or range end) of its type, domains the search algorithm can use. An empty space is
    the paper's learning-rate grid for the label set's size. Raises ConfigError naming
    `tune.space.<key>`."""
    tune = cfg.tune
    space = tune.space or {
        "optim.lr": {"grid": PAPER_LR_GRID_IMAGENET if num_classes >= 1000 else PAPER_LR_GRID}
    }
    base = train_config(cfg)
    dims = []
    for key, domain in space.items():
        where = f"tune.space.{key}"
        if key.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(f"{where}: {key.split('.')[0]} is the search's own, not a trial's")
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise ConfigError(f"{where}: give one of {', '.join(DOMAINS)}, e.g. {{grid: [...]}}")
        kind, values = next(iter(domain.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "int"):
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
            low, high = values
            if not low < high:
                raise ConfigError(f"{where}.{kind}: low {low} must be below high {high}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}.loguniform: low must be above 0, got {low}")
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}.int: expected whole numbers, got {values!r}")
        if tune.search == "grid" and kind not in ("grid", "choice"):
            raise ConfigError(f"{where}: a grid search takes listed values (grid or choice), "
                              f"not a {kind} range; use tune.search=random or tpe")  # fmt: skip
        if tune.search == "tpe" and kind == "grid":
            raise ConfigError(f"{where}: Optuna's TPE samples; give choice instead of grid")
        typed = []  # as the config reads them: YAML reads 1e-7 as a string
        for value in values:
            try:
                trial = to_dict(trial_config(base, {key: value}))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            for part in key.split("."):
                trial = trial[part]
            typed.append(trial)
        dims.append(Dimension(key, "grid" if tune.search == "grid" else kind, typed))
    if tune.num_samples < 1:
        raise ConfigError(f"tune.num_samples: expected 1 or more, got {tune.num_samples}")
    if tune.tpe_startup_trials < 0:
        raise ConfigError(
            f"tune.tpe_startup_trials: expected 0 or more, got {tune.tpe_startup_trials}"
        )
    if tune.scheduler == "asha":
        if not cfg.train.eval_every_steps:
            raise ConfigError("tune.scheduler asha compares trials on validation results: set "
                              "train.eval_every_steps (a few times per tune.grace_period)")  # fmt: skip
        if tune.grace_period < cfg.train.eval_every_steps or tune.reduction_factor <= 1:
            raise ConfigError(
                f"tune.grace_period {tune.grace_period} must be at least train.eval_every_steps "
                f"{cfg.train.eval_every_steps}, and tune.reduction_factor above 1"
            )
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's search space for `dims`, keyed by dotted config key."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "int": lambda v: tune.randint(v[0], v[1] + 1),  # Ray's upper end is excluded
    }
    return {d.key: make[d.kind](d.values) for d in dims}


def grid_size(dims: list[Dimension]) -> int:
    size = 1
    for d in dims:
        if d.kind == "grid":
            size *= len(d.values)
    return size
