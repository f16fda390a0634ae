"""TrainSpec: the JSON document of a training job, the one contract with the service.

The service stores a spec verbatim and never interprets training details; everything a
worker needs to train, checkpoint and resume is here. Every field has a default and a bound,
and unknown fields are rejected, so a typo is an error rather than a silently ignored key.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from optimizers.spec import OptimizerSpec

MAX_BATCH_SIZE = 1 << 20
# Where Nestor keeps its database, runs and data set caches. The service reads the variable
# through its settings (service.settings.Settings.home) and hands the resolved path to each
# job's environment; a job's processes read it with workers.datasets.nestor_home().
HOME_VARIABLE, DEFAULT_HOME = "NESTOR_HOME", "~/.nestor"
DEFAULT_SAMPLES = {"mnist1d": 10_000, "digits": 1797, "pystdlib-chars": 20_000}

# The built-in models and data sets are ordinary factories of Nestor's own package, reached
# by the same import path as a user's; these names are aliases for them. A table, not an
# import, so that validating a spec needs neither torch nor anybody's code.
BUILTIN_DATASETS = {
    "mnist1d": "workers.datasets:mnist1d",
    "digits": "workers.datasets:digits",
    "pystdlib-chars": "workers.datasets:pystdlib_chars",
}
BUILTIN_MODELS = {  # alias: (factory, the built-in data sets it takes, description)
    "mnist1d-mlp": ("workers.models:mnist1d_mlp", ("mnist1d",), "2-hidden-layer MLP (77k)"),
    "mnist1d-cnn": ("workers.models:mnist1d_cnn", ("mnist1d",), "3-layer 1-D CNN (9k params)"),
    "digits-mlp": ("workers.models:digits_mlp", ("digits",), "1-hidden-layer MLP"),
    "char-transformer": (
        "workers.models:char_transformer",
        ("pystdlib-chars",),
        "2-layer byte-level GPT (d=128)",
    ),
}
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_PATTERN = rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$"
PACKAGE_PATTERN = r"^sha256:[0-9a-f]{64}$"


def optimizer_label(spec: dict[str, Any]) -> str:
    """A job spec's optimizer in a few characters, for tables and plots: ``adan``,
    ``lookahead(adamw)``, ``adan (int8)`` (state kept below fp32: another cell of a study)."""
    opt = spec["optimizer"]
    label = f"lookahead({opt['name']})" if opt.get("lookahead") else opt["name"]
    precision = opt.get("state_precision") or "fp32"
    return label if precision == "fp32" else f"{label} ({precision})"


def finite_json(value: Any, path: str = "") -> Any:
    """``value`` unchanged if every number in it is finite (JSON has no NaN or infinity, and
    PostgreSQL refuses to store them; Python's parser reads 1e999 as infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path or 'value'}: {value} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            finite_json(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            finite_json(v, f"{path}[{i}]")
    return value


def _import_path(value: str) -> str:
    if not re.fullmatch(FACTORY_PATTERN, value):
        raise ValueError(
            f"{value!r} is not an import path 'package.module:callable' (Python identifiers "
            f"separated by dots, one colon)"
        )
    return value


Kwargs = Annotated[dict[str, Any], AfterValidator(lambda v: finite_json(v, "kwargs"))]
FactoryPath = Annotated[
    str,
    AfterValidator(_import_path),
    Field(
        max_length=300,
        description="import path of a callable: 'package.module:name'",
        examples=["mynet:build"],
    ),
]


class _Strict(BaseModel):
    # Unknown fields are typos; non-finite numbers (1e999 parses as infinity) are errors.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FactorySpec(_Strict):
    """A callable by import path inside the job's code package (or any module the workers
    can import), and the keyword arguments it is called with. The contract each kind of
    factory follows is ``workers.contract``."""

    factory: FactoryPath
    kwargs: Kwargs = Field(default_factory=dict, description="JSON keyword arguments")


class FileDatasetSpec(_Strict):
    """Arrays from files the workers can read, memory-mapped, never copied whole into a
    worker: a directory of ``.npy`` files, an ``.npz`` archive, or a Parquet file."""

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="a directory of .npy files, an .npz file or a .parquet file, on a path "
        "every worker can read",
    )
    inputs: str | list[str] = Field(
        "x",
        description="the inputs' array (.npy file stem or .npz member) or Parquet column; "
        "a list of Parquet columns is stacked into one feature vector",
    )
    targets: str = Field("y", description="the targets' array or Parquet column")
    val_path: str | None = Field(
        None, max_length=4096, description="a validation set in the same layout; else split"
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="held-out share (no val_path)")
    task: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: cross-entropy and accuracy; regression: mean squared error",
    )

    @field_validator("inputs")
    @classmethod
    def _some_inputs(cls, inputs: str | list[str]) -> str | list[str]:
        if isinstance(inputs, list) and not inputs:
            raise ValueError("inputs: name at least one column")
        return inputs


def _dataset_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "factory" if "factory" in value else "file" if "path" in value else "builtin"
    return (
        "factory"
        if hasattr(value, "factory")
        else "file"
        if hasattr(value, "path")
        else ("builtin")
    )


class DatasetSpec(_Strict):
    """A built-in data set by name, and how much of it."""

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
        if name not in BUILTIN_DATASETS:
            known = ", ".join(sorted(BUILTIN_DATASETS))
            raise ValueError(
                f"unknown dataset {name!r} (built-in: {known}; for your own data give "
                f'"factory" or "path")'
            )
        return name

    def factory_spec(self, seed: int) -> FactorySpec:
        """This data set as the factory call it stands for."""
        kwargs = self.model_dump()
        del kwargs["name"]
        return FactorySpec(factory=BUILTIN_DATASETS[self.name], kwargs={**kwargs, "seed": seed})


AnyDataset = Annotated[
    Annotated[DatasetSpec, Tag("builtin")]
    | Annotated[FactorySpec, Tag("factory")]
    | Annotated[FileDatasetSpec, Tag("file")],
    Discriminator(_dataset_kind),
]


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


class InitFromSpec(_Strict):
    """Start from another job's trained weights (its ``model.pt``, or a checkpoint's), at any
    world size and ZeRO stage; ``optimizer_state`` also continues its optimizer (moments and
    step count; the hyperparameters are this spec's)."""

    job: int = Field(..., ge=1, le=2**31 - 1, description="the job whose weights to start from")
    step: int | None = Field(
        None, ge=1, le=10_000_000, description="a checkpoint's step; default: the final state"
    )
    optimizer_state: bool = Field(False, description="continue the optimizer's state too")

    def describe(self) -> str:
        return f"job {self.job}" + (f" step {self.step}" if self.step else "")


EVAL_METRICS = {  # what an evaluation reports, and which way is better
    "val_loss": "min",
    "val_accuracy": "max",
    "val_bits_per_char": "min",
}


class StopAtSpec(_Strict):
    """End the job, succeeded, the first time an evaluation reaches a target value: the
    measure of "steps to a target" (Shallue et al., 2019). The job's result records the step
    in ``reached_target_at_step`` (null when ``max_steps`` ran out first).

    While a target is set, the loop also evaluates on a geometric cadence: after an
    evaluation at step ``a``, the next is at ``max(a + 1, floor(a / (1 - resolution)))``, the
    furthest step ``b`` with ``b - a <= resolution x b``. The step reported therefore
    overshoots the first step that reached the target by at most ``resolution`` of it (5% by
    default: every step up to 20, then about 20 evaluations per e-fold of steps)."""

    metric: str = Field(
        "val_accuracy", description="an evaluation metric: " + ", ".join(EVAL_METRICS)
    )
    mode: Literal["min", "max"] | None = Field(
        None,
        description="max: reached when metric >= value; min: when <=; default: the "
        "metric's own direction",
    )
    value: float = Field(..., description="the target")
    resolution: float = Field(
        0.05, gt=0.0, le=1.0, description="largest gap between evaluations, as a share of the step"
    )

    @field_validator("metric")
    @classmethod
    def _evaluated(cls, metric: str) -> str:
        if metric not in EVAL_METRICS:
            raise ValueError(
                f"stop_at.metric {metric!r} is not an evaluation metric (one of: "
                f"{', '.join(EVAL_METRICS)})"
            )
        return metric

    @model_validator(mode="after")
    def _direction(self) -> StopAtSpec:
        if self.mode is None:
            self.mode = EVAL_METRICS[self.metric]  # type: ignore[assignment]
        return self

    def reached(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.mode == "max" else value <= self.value

    def evaluates_at(self, step: int) -> bool:
        """Whether the target's cadence evaluates after ``step`` (1-based)."""
        return step in _geometric_steps(self.resolution, step)


@functools.lru_cache(maxsize=16)
def _cadence(resolution: float, upto: int) -> frozenset[int]:
    steps, a = [1], 1
    while a < upto:
        a = max(a + 1, math.floor(a / (1 - resolution)))
        steps.append(a)
    return frozenset(steps)


def _geometric_steps(resolution: float, step: int) -> frozenset[int]:
    """The cadence's steps up to at least ``step``, computed once per power of two."""
    return _cadence(resolution, 1 << max(step - 1, 1).bit_length())


class WorkerRange(_Strict):
    """An elastic job's world size: it starts once ``min`` workers fit, grows up to ``max``
    as capacity frees, and shrinks (never below ``min``) when a worker is lost or taken."""

    min: int = Field(ge=1, le=256, description="the fewest workers it trains on")
    max: int = Field(ge=1, le=256, description="the most workers it grows to")

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class TrainSpec(_Strict):
    """A training job.

    Example::

        {"model": "mnist1d-cnn", "dataset": {"name": "mnist1d", "num_samples": 400000},
         "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
         "batch_size": 32768, "micro_batch_size": 2048, "num_workers": 2, "zero_stage": 2,
         "max_steps": 100, "lr_schedule": {"kind": "cosine", "warmup_steps": 10},
         "lr_scaling": {"rule": "sqrt", "base_batch_size": 1024}, "max_grad_norm": 1.0}
    """

    code: str | None = Field(
        None,
        pattern=PACKAGE_PATTERN,
        description="a code package's id (POST /v1/packages): the factories' modules are "
        "imported from it, on the workers only",
    )
    requirements: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=100,
        description="pip requirements installed for the job by Ray's runtime environment "
        "(needs the cluster to reach a package index)",
    )
    model: str | FactorySpec = Field(
        "mnist1d-mlp",
        description="a built-in model's name, or {factory: 'module:callable', kwargs}: "
        "callable(data, **kwargs) -> torch.nn.Module",
    )
    dataset: AnyDataset = Field(
        default_factory=DatasetSpec,
        description="a built-in data set {name}, your own {factory, kwargs} or files {path}",
    )
    loss: FactoryPath | None = Field(
        None,
        description="callable(outputs, targets) -> scalar loss tensor; default: cross-entropy "
        "(mean squared error for a regression file data set)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast forward and loss in bfloat16, fp32 weights, gradients "
        "and optimizer state",
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        le=32,
        description="DataLoader worker processes per rank; default 0 for the built-in "
        "in-memory data sets, 1 otherwise",
    )
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="adan"))
    batch_size: int = Field(1024, ge=1, le=MAX_BATCH_SIZE, description="global batch")
    micro_batch_size: int = Field(256, ge=1, le=MAX_BATCH_SIZE, description="per worker")
    num_workers: Annotated[int, Field(ge=1, le=256)] | WorkerRange = Field(
        1,
        description="data-parallel workers (ranks): a number, or an elastic range "
        '{"min": 2, "max": 8} (the global batch stays the same at every size; each '
        "worker's share of it and its micro-batches are recomputed)",
    )
    zero_stage: int = Field(2, ge=0, le=2, description="0 = plain data parallel")
    overlap_all_gather: bool | None = Field(
        None,
        description="at ZeRO stages 1 and 2, let the parameter all-gather after a step run "
        "on while the next forward pass starts (each module waits for its own parameters); "
        "default: on for built-in models on GPUs; off on CPUs, where gloo's threads and the "
        "forward pass compete for the same cores (measured slower, bench/zero.py), and for a "
        "user's model factory, which may read another module's parameters before that "
        "module runs",
    )
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
    stop_at: StopAtSpec | None = Field(
        None,
        description='end as succeeded when an evaluation reaches a target, e.g. {"metric": '
        '"val_accuracy", "value": 0.9}; the result says at which step',
    )
    log_every: int = Field(1, ge=1, le=10_000_000, description="steps between metric reports")
    checkpoint_every: int = Field(
        0, ge=0, le=10_000_000, description="steps between checkpoints; 0 = never"
    )
    max_bad_steps: int = Field(
        3, ge=1, le=1000, description="consecutive non-finite losses before the job fails"
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="the newest checkpoints kept (older ones are deleted)"
    )
    preemptible: bool | None = Field(
        None,
        description="a queued job of higher priority that cannot fit may take this job's "
        "workers: an elastic job shrinks to its min, and below it (or a fixed job) it "
        "checkpoints at its next step and returns to the queue, to resume there; default: "
        "true for a sweep's trials, false otherwise",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="times the worker group is restarted (from the latest checkpoint) after "
        "a worker dies or raises; 0 = fail at the first error",
    )
    init_from: InitFromSpec | None = Field(
        None, description="start from another job's weights (and optimizer state)"
    )
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); else CPU (gloo)")

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str | FactorySpec) -> str | FactorySpec:
        if isinstance(model, str) and model not in BUILTIN_MODELS:
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise ValueError(
                f'unknown model {model!r} (built-in: {known}; for your own give {{"factory": '
                f'"module:callable"}})'
            )
        return model

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainSpec:
        if self.elastic and self.batch_size < self.max_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be at least num_workers.max "
                f"({self.max_workers}): every worker needs a sample of each global batch"
            )
        for world in range(self.min_workers, self.max_workers + 1) if self.elastic else ():
            if self.batch_size // world < self.accumulation_at(world):
                raise ValueError(
                    f"batch_size ({self.batch_size}) on {world} workers leaves a worker fewer "
                    f"samples than micro-batches ({self.accumulation_at(world)} of at most "
                    f"micro_batch_size {self.micro_batch_size}); raise micro_batch_size"
                )
        per_step = self.micro_batch_size * self.min_workers
        if not self.elastic and self.batch_size % per_step:
            lower = max(per_step, self.batch_size // per_step * per_step)
            upper = (self.batch_size // per_step + 1) * per_step
            raise ValueError(
                f"batch_size ({self.batch_size}) must equal micro_batch_size "
                f"({self.micro_batch_size}) x num_workers ({self.num_workers}) x accumulation "
                f"steps; nearest valid batch_size: {lower} or {upper}"
            )
        builtin = isinstance(self.dataset, DatasetSpec)
        if self.epochs is not None:
            if not builtin:
                raise ValueError(
                    "epochs needs a built-in data set, whose size is known at submit; give "
                    "max_steps for a dataset.factory or dataset.path"
                )
            # Rounded before the ceiling so float noise (1.1 x 900 / 99 = 10.000000000000002)
            # cannot add a step.
            exact = self.epochs * self.dataset.train_samples() / self.batch_size
            steps = math.ceil(round(exact, 9))
            self.max_steps = max(1, min(steps, 10_000_000))
        if builtin and isinstance(self.model, str):
            takes = BUILTIN_MODELS[self.model][1]
            if self.dataset.name not in takes:
                raise ValueError(
                    f"model {self.model!r} does not take dataset {self.dataset.name!r} "
                    f"(it takes: {', '.join(takes)})"
                )
        return self

    def overlaps_all_gather(self, world: int | None = None) -> bool:
        """Whether the loop overlaps the parameter all-gather with the next forward pass
        (``world``: the workers it runs on, for an elastic job)."""
        if self.zero_stage == 0 or (world or self.min_workers) == 1:
            return False
        if self.overlap_all_gather is not None:
            return self.overlap_all_gather
        return self.use_gpu and isinstance(self.model, str)

    def evaluates_at(self, step: int) -> bool:
        """Whether the loop runs a validation pass after ``step`` (1-based): every
        ``eval_every`` steps, at the end, and on ``stop_at``'s own cadence."""
        return (
            step % self.eval_every == 0
            or step == self.max_steps
            or (self.stop_at is not None and self.stop_at.evaluates_at(step))
        )

    def model_factory(self) -> FactorySpec:
        """The model as a factory call (a built-in name stands for one of Nestor's own)."""
        if isinstance(self.model, str):
            return FactorySpec(factory=BUILTIN_MODELS[self.model][0])
        return self.model

    def own_code(self) -> list[str]:
        """The fields through which this job runs the submitter's own code or reads their
        files rather than Nestor's built-ins: any import path can name any module the
        workers can import (``os:system`` included), and requirements install anything. A
        job with one of them needs a token allowed to ship code."""
        fields = []
        if self.code is not None:
            fields.append("code")
        if self.requirements:
            fields.append("requirements")
        if not isinstance(self.model, str):
            fields.append("model.factory")
        if not isinstance(self.dataset, DatasetSpec):
            fields.append("dataset.factory" if hasattr(self.dataset, "factory") else "dataset.path")
        if self.loss is not None:
            fields.append("loss")
        return fields

    def describe(self) -> str:
        """'mnist1d-mlp on mnist1d', 'mynet:build on mydata:load': for logs and titles."""
        model = self.model if isinstance(self.model, str) else self.model.factory
        d = self.dataset
        data = d.name if isinstance(d, DatasetSpec) else getattr(d, "factory", None) or d.path
        return f"{model} on {data}"

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return (
            self.num_workers.min if isinstance(self.num_workers, WorkerRange) else self.num_workers
        )

    @property
    def max_workers(self) -> int:
        return (
            self.num_workers.max if isinstance(self.num_workers, WorkerRange) else self.num_workers
        )

    def check_world(self, world: int) -> None:
        """Raise unless the job may train on ``world`` workers."""
        if not self.min_workers <= world <= self.max_workers:
            asked = (
                f"{self.min_workers} to {self.max_workers}" if self.elastic else self.num_workers
            )
            raise ValueError(f"spec asks for {asked} workers, running on {world}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per worker per step at the spec's own (smallest) world size."""
        return self.accumulation_at(self.min_workers)

    def accumulation_at(self, world: int) -> int:
        """Micro-batches per worker per step on ``world`` workers: enough that none holds
        more than ``micro_batch_size`` samples (every rank runs as many, for its
        collectives). A fixed job's batch divides evenly: batch / (micro x workers)."""
        share = -(-self.batch_size // world)  # the largest rank's share
        return -(-share // self.micro_batch_size)

    def micro_sizes(self, rank: int, world: int) -> list[int]:
        """The samples of each of ``rank``'s micro-batches on ``world`` workers. Rank r's
        share of the global batch is samples [r B / w, (r + 1) B / w) (floors), split into
        ``accumulation_at(world)`` micro-batches as evenly as possible, larger first: a
        fixed job's are all ``micro_batch_size``."""
        share = (rank + 1) * self.batch_size // world - rank * self.batch_size // world
        accum = self.accumulation_at(world)
        return [share // accum + (1 if j < share % accum else 0) for j in range(accum)]

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer spec with the job-level settings applied: the lr scaled for the
        batch size (before the schedule) and the job's max_grad_norm."""
        update: dict = {"lr": self.optimizer.lr * self.lr_scaling.factor(self.batch_size)}
        if self.max_grad_norm is not None:
            update["max_grad_norm"] = self.max_grad_norm
        return self.optimizer.model_copy(update=update)
