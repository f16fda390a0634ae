"""Request and response bodies: a schema family per resource (Create / Public / List)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from workers import TrainSpec
from workers.spec import finite_json

from .packages import ID_EXAMPLE

JsonObject = Annotated[dict[str, Any], AfterValidator(finite_json)]


NAME_MAX = 200  # characters in a job's or sweep's name (the column's size)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("job", min_length=1, max_length=NAME_MAX)
    spec: TrainSpec
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")


class JobResize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(ge=1, le=256, description="within the job's elastic range")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    status: str
    spec: dict[str, Any]
    priority: int
    sweep_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    stop_reason: str | None = Field(None, description="why a sweep's early stopping ended it")
    pending_reason: str | None = Field(
        None, description="why a queued job has not started yet (resources, its sweep)"
    )
    last_step: int
    workers: int | None = Field(
        None, description="running: the workers it trains on (an elastic job's current size)"
    )
    progress: float | None = Field(
        None, description="queued or running: last_step / max_steps, from 0 to 1"
    )
    queue_position: int | None = Field(
        None, description="queued: its place in the queue, 1 being next to start"
    )
    steps_per_second: float | None = Field(
        None, description="running: its rate over its last reported steps"
    )
    estimated_start: datetime | None = Field(
        None,
        description="queued: when it should start, from the running jobs' rates and "
        "remaining steps (null when that cannot be known yet)",
    )
    estimated_end: datetime | None = Field(
        None,
        description="running: when its remaining steps should be done at its rate (a job "
        "with a stop_at target may end sooner); null until it has a rate",
    )
    reached_target_at_step: int | None = Field(
        None,
        description="with a stop_at target: the step whose evaluation first reached it "
        "(null while running, or when max_steps ran out first)",
    )
    owner: str | None = Field(None, description="the name of the user who submitted it")
    latest: dict[str, float | None] = Field(
        default_factory=dict, description="train_loss, val_loss, val_accuracy at their last step"
    )


class JobList(BaseModel):
    data: list[JobPublic]
    count: int


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    time: datetime
    status: str
    reason: str | None


class Series(BaseModel):
    step: list[int]
    value: list[float | None]


class MetricsPublic(BaseModel):
    job_id: int
    series: dict[str, Series]


MetricKey = Annotated[str, StringConstraints(min_length=1, max_length=100)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class MetricPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, le=2**31 - 1)
    time: float | None = Field(None, allow_inf_nan=False)
    # Finite numbers or null (JSON has no NaN; a client that sends one gets a 422).
    values: dict[MetricKey, FiniteFloat | None] = Field(max_length=64)


class MetricBatch(BaseModel):
    """What workers send: points for one job, and optionally a status report."""

    model_config = ConfigDict(extra="forbid")

    points: list[MetricPoint] = Field(default_factory=list, max_length=10_000)
    status: str | None = Field(None, pattern="^(running|succeeded|failed)$")
    error: str | None = Field(None, max_length=20_000)
    resume_from_step: int | None = Field(None, ge=0, le=2**31 - 1)
    world_size: int | None = Field(
        None, ge=1, le=256, description="an elastic job's workers, reported when a segment starts"
    )
    world_reason: str | None = Field(None, max_length=300, description="why it has that size")
    reached_target_at_step: int | None = Field(
        None, ge=1, le=2**31 - 1, description="with status succeeded: stop_at's step"
    )


class IngestResult(BaseModel):
    accepted: int


def as_utc(value: datetime) -> datetime:
    """An aware UTC time, whatever the database gave back (SQLite drops the zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class PackageFile(BaseModel):
    name: str = Field(description="path inside the package, relative to its root")
    size: int = Field(description="bytes, uncompressed")


class PackagePublic(BaseModel):
    """A stored code package (POST /v1/packages)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="sha256 of the archive's bytes", examples=[ID_EXAMPLE])
    size: int = Field(description="the archive's bytes")
    files: list[PackageFile]
    created_at: UtcDatetime
    owner: str | None = Field(None, description="the user who first uploaded these bytes")
