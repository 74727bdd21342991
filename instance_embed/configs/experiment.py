"""The experiment configuration: one dataclass tree that fully describes a run.

Each part of the library owns the dataclass that configures it (`InputConfig` in
`data/pipeline.py`, `ModelConfig` in `model/config.py`, `LossConfig` in
`losses/config.py`, `InferenceConfig` in `inference/config.py`); this module composes
them with the dataset and training settings into `ExperimentConfig`, which `train_main`
fills from flags (`configs/flags.py`) and writes to `model_dir/config.json`, so that a
run can be reproduced and later programs (`eval_main`, `export_main`) rebuild exactly
the same model. The similarity thresholds live in one place, `model.taus`: the
classification head has one slice per tau, and the losses and the inference read them
there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from instance_embed.data import pipeline
from instance_embed.inference.config import InferenceConfig
from instance_embed.losses.config import LossConfig
from instance_embed.model.config import ModelConfig

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
CONFIG_FILENAME = "config.json"


@dataclasses.dataclass
class DatasetConfig:
    """Which dataset a run reads.

    Attributes:
      name: a name registered in `instance_embed.data.DATASETS`.
      data_dir: TFDS data directory (prepared datasets are cached there).
      manual_dir: directory holding the raw files, for datasets that read them.
      builder_config: name of a TFDS builder config (None = the builder's default).
      train_split: split to train on.
      eval_split: split to evaluate on.
    """

    name: str = "synthetic_shapes"
    data_dir: str | None = "data"
    manual_dir: str | None = None
    builder_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, logging and distribution settings of a training run.

    Attributes:
      batch_size: global batch size (split evenly across replicas).
      train_steps: total number of optimizer steps; a resumed run stops there too.
      learning_rate: peak learning rate of the heads (Adam).
      warmup_steps: linear learning-rate warm-up from 0.
      decay: "cosine" (to `final_lr_fraction` of the peak at `train_steps`) or "constant".
      final_lr_fraction: cosine decay floor, as a fraction of the peak.
      backbone_lr_multiplier: backbone learning rate = this x the heads' (paper 3.5).
      weight_decay: decoupled weight decay (AdamW); 0 disables it.
      gradient_clip_norm: global-norm clipping of each optimizer's gradients; 0 disables it.
      seed: seeds data order, augmentation, point sampling and initialisation.
      strategy: one of `STRATEGIES`.
      tpu: TPU address for `strategy="tpu"`.
      checkpoint_every: steps between checkpoints (one is always written at the end).
      max_checkpoints: checkpoints kept in `model_dir/ckpt/`.
      log_every: steps between console lines and scalar summaries.
      summary_every: steps between image summaries and the embedding projector.
      eval_every: steps between evaluations on the eval split (0 = only at the end, if
        `eval_at_end`).
      eval_at_end: evaluate on the eval split when training finishes.
      eval_max_examples: cap on evaluated examples (0 = whole split).
      time_budget_minutes: fit the run into this much wall-clock time on this machine
        (None: no budget). A run that starts from step 0 times a few dozen steps (and
        revises the plan every `log_every` steps through the first half of the run), and
        if `train_steps` would not fit, plans fewer steps and compresses everything
        counted in steps (learning-rate warm-up and decay, the classification loss'
        warm-up and ramp) in proportion, so the shorter run follows the full run's
        schedule. It never plans more than `train_steps`. The plan is checkpointed, so
        a resumed run keeps it; a run resumed without a plan ignores the budget.
    """

    batch_size: int = 8
    train_steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay: str = "cosine"
    final_lr_fraction: float = 0.05
    backbone_lr_multiplier: float = 0.1
    weight_decay: float = 0.0
    gradient_clip_norm: float = 10.0
    seed: int = 0
    strategy: str = "default"
    tpu: str | None = None
    checkpoint_every: int = 500
    max_checkpoints: int = 3
    log_every: int = 10
    summary_every: int = 200
    eval_every: int = 0
    eval_at_end: bool = True
    eval_max_examples: int = 0
    time_budget_minutes: float | None = None

    def __post_init__(self):
        _require(self.batch_size > 0, "batch_size", self.batch_size, "must be positive")
        _require(self.train_steps >= 0, "train_steps", self.train_steps, "must be >= 0")
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.decay in ("cosine", "constant"), "decay", self.decay,
                 "must be 'cosine' or 'constant'")
        _require(self.backbone_lr_multiplier >= 0, "backbone_lr_multiplier",
                 self.backbone_lr_multiplier, "must be >= 0")
        _require(self.strategy in STRATEGIES, "strategy", self.strategy,
                 f"must be one of {', '.join(STRATEGIES)}")
        for name in ("checkpoint_every", "log_every", "summary_every", "max_checkpoints"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        _require(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        _require(self.time_budget_minutes is None or (
            math.isfinite(self.time_budget_minutes) and self.time_budget_minutes > 0),
            "time_budget_minutes", self.time_budget_minutes,
            "must be positive (or None: no budget)")


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that defines a run; serialised to `model_dir/config.json`."""

    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    input: pipeline.InputConfig = dataclasses.field(default_factory=pipeline.InputConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return from_dict(cls, json.loads(text))

    def save(self, model_dir: str) -> str:
        os.makedirs(model_dir, exist_ok=True)
        path = os.path.join(model_dir, CONFIG_FILENAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)  # Atomic, so a killed run never leaves half a config.
        return path

    @classmethod
    def load(cls, model_dir: str) -> "ExperimentConfig":
        path = os.path.join(model_dir, CONFIG_FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: is {model_dir!r} a model_dir written by train_main?")
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: {why}")


def from_dict(cls: type, values: dict) -> Any:
    """Builds dataclass `cls` from a nested dict (as written by `dataclasses.asdict`).

    Unknown keys are an error, so a typo in a hand-edited config is not silently dropped;
    lists become tuples where the field is annotated as a tuple.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value)
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if hint is tuple or origin is tuple:
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_convert(inner, v) for v in value)
    return value
