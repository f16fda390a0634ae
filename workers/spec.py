"""TrainSpec: the JSON document of a training job, the one contract with the service.

The service stores a spec verbatim and never interprets training details; everything a
worker needs to train, checkpoint and resume is here. Every field has a default and a bound,
and unknown fields are rejected, so a typo is an error rather than a silently ignored key.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizers import OptimizerSpec

MAX_BATCH_SIZE = 1 << 20
DEFAULT_SAMPLES = {"mnist1d": 10_000, "digits": 1797, "pystdlib-chars": 20_000}


class _Strict(BaseModel):
    # Unknown fields are typos; non-finite numbers (1e999 parses as infinity) are errors.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DatasetSpec(_Strict):
    """Which registered dataset, and how much of it."""

    name: str = Field("mnist1d", description="mnist1d | digits | pystdlib-chars")
    num_samples: int | None = Field(
        None,
        ge=100,
        le=10_000_000,
        description="samples to generate or use (None: the dataset's default)",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="held-out share")
    seq_len: int = Field(64, ge=8, le=1024, description="context length (text datasets)")

    def total_samples(self) -> int:
        """Samples the dataset will hold (its default size where num_samples is None)."""
        if self.name == "digits":  # scikit-learn ships 1,797 images
            return min(self.num_samples or 1797, 1797)
        return self.num_samples or DEFAULT_SAMPLES[self.name]

    def train_samples(self) -> int:
        n = self.total_samples()
        return n - max(1, round(n * self.val_fraction))

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .datasets import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
        return name


class LRScheduleSpec(_Strict):
    """Warmup then decay, stepped once per optimizer step."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="linear warmup from 0")
    warmup_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="warmup as a share of max_steps (the larger of the two warmups is used), "
        "so one spec warms up for the same share of training at every batch size",
    )

    def warmup(self, total_steps: int) -> int:
        return max(self.warmup_steps, round(self.warmup_fraction * total_steps))

    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr / peak lr")


class LRScalingSpec(_Strict):
    """How the spec's lr scales with batch size: lr * f(batch_size / base_batch_size)."""

    rule: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = Field(256, ge=1, le=MAX_BATCH_SIZE)

    def factor(self, batch_size: int) -> float:
        ratio = batch_size / self.base_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.rule]


class TrainSpec(_Strict):
    """A training job.

    Example::

        {"model": "mnist1d-cnn", "dataset": {"name": "mnist1d", "num_samples": 400000},
         "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
         "batch_size": 32768, "micro_batch_size": 2048, "num_workers": 2, "zero_stage": 2,
         "max_steps": 100, "lr_schedule": {"kind": "cosine", "warmup_steps": 10},
         "lr_scaling": {"rule": "sqrt", "base_batch_size": 1024}, "max_grad_norm": 1.0}
    """

    model: str = Field("mnist1d-mlp", description="a registered model name")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="adan"))
    batch_size: int = Field(1024, ge=1, le=MAX_BATCH_SIZE, description="global batch")
    micro_batch_size: int = Field(256, ge=1, le=MAX_BATCH_SIZE, description="per worker")
    num_workers: int = Field(1, ge=1, le=256, description="data-parallel workers (ranks)")
    zero_stage: int = Field(2, ge=0, le=2, description="0 = plain data parallel")
    max_steps: int = Field(100, ge=1, le=10_000_000, description="optimizer steps")
    epochs: float | None = Field(
        None,
        gt=0.0,
        le=1_000_000.0,
        description="a budget in passes over the training split; when set, max_steps is "
        "derived from it: ceil(epochs x training samples / batch_size)",
    )
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    lr_scaling: LRScalingSpec = Field(default_factory=LRScalingSpec)
    max_grad_norm: float | None = Field(
        None,
        ge=0.0,
        le=1e6,
        description="global gradient clipping (overrides optimizer.max_grad_norm)",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="initialisation, split, data order")
    eval_every: int = Field(10, ge=1, le=10_000_000, description="steps between validation passes")
    log_every: int = Field(1, ge=1, le=10_000_000, description="steps between metric reports")
    checkpoint_every: int = Field(
        0, ge=0, le=10_000_000, description="steps between checkpoints; 0 = never"
    )
    max_bad_steps: int = Field(
        3, ge=1, le=1000, description="consecutive non-finite losses before the job fails"
    )
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); else CPU (gloo)")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from .models import MODELS

        if name not in MODELS:
            raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
        return name

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainSpec:
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            lower = max(per_step, self.batch_size // per_step * per_step)
            upper = (self.batch_size // per_step + 1) * per_step
            raise ValueError(
                f"batch_size ({self.batch_size}) must equal micro_batch_size "
                f"({self.micro_batch_size}) x num_workers ({self.num_workers}) x accumulation "
                f"steps; nearest valid batch_size: {lower} or {upper}"
            )
        if self.epochs is not None:
            # Rounded before the ceiling so float noise (1.1 x 900 / 99 = 10.000000000000002)
            # cannot add a step.
            exact = self.epochs * self.dataset.train_samples() / self.batch_size
            steps = math.ceil(round(exact, 9))
            self.max_steps = max(1, min(steps, 10_000_000))
        from .models import MODELS

        if self.dataset.name not in MODELS[self.model].datasets:
            raise ValueError(
                f"model {self.model!r} does not take dataset {self.dataset.name!r} "
                f"(it takes: {', '.join(MODELS[self.model].datasets)})"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer spec with the job-level settings applied: the lr scaled for the
        batch size (before the schedule) and the job's max_grad_norm."""
        update: dict = {"lr": self.optimizer.lr * self.lr_scaling.factor(self.batch_size)}
        if self.max_grad_norm is not None:
            update["max_grad_norm"] = self.max_grad_norm
        return self.optimizer.model_copy(update=update)
