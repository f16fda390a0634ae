"""All service settings in one place: NESTOR_* environment variables (pydantic-settings),
overridden by `nestor serve` flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.spec import DEFAULT_HOME


class Settings(BaseSettings):
    """Embedded defaults (one command, one machine) unless told otherwise."""

    model_config = SettingsConfigDict(env_prefix="NESTOR_", extra="ignore")

    home: Path = Field(Path(DEFAULT_HOME), description="SQLite file, runs, datasets, tokens")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///HOME/nestor.db (WAL)"
    )
    ray_address: str | None = Field(
        None, description="existing Ray cluster; default: start a local one"
    )
    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8000, ge=1, le=65535)
    admin_token: str | None = Field(
        None, description="use this admin token instead of generating one on first start"
    )
    public_url: str | None = Field(
        None, description="URL workers use to reach the API; default http://HOST:PORT"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size limit")
    max_package_bytes: int = Field(
        100 << 20, ge=1024, description="code package upload limit (POST /v1/packages)"
    )
    max_package_entries: int = Field(
        10_000, ge=1, le=65_535, description="files and directories in one code package"
    )
    max_package_unpacked_bytes: int = Field(
        1 << 30,
        ge=1024,
        le=(1 << 32) - 1,
        description="a code package's files together, uncompressed",
    )
    max_streams_per_token: int = Field(
        32, ge=1, le=100_000, description="live event streams one token may hold open"
    )
    stream_poll_seconds: float = Field(
        0.5, gt=0, le=60, description="how often a watched job's new points are read"
    )
    sse_ping_seconds: float = Field(
        15, gt=0, le=300, description="keep-alive comment interval on idle event streams"
    )
    scheduler_interval: float = Field(1.0, gt=0, description="seconds between scheduling passes")
    backfill: bool = Field(
        True,
        description="at a job's end, store points from its metrics.jsonl that the live path "
        "never delivered (off only to test the live path alone)",
    )
    runs_dir: Path | None = Field(None, description="run directories; default HOME/runs")
    warm_workers: int = Field(
        4,
        ge=0,
        le=1024,
        description="warm worker processes kept per job environment between jobs (torch "
        "imported, ready to train the next job of the same environment); 0: every job starts "
        "its workers with Ray Train",
    )
    warm_idle_seconds: float = Field(
        600, gt=0, description="seconds a warm worker waits for a job before it exits"
    )
    max_log_bytes: int = Field(
        10 * 2**20,
        ge=4096,
        description="bytes of log kept per job (the oldest lines are dropped past it)",
    )
    isolation: Literal["auto", "on", "off"] = Field(
        "auto",
        description="sandbox each job's processes (bubblewrap; as a uid of the job's own when "
        "the service is root) so that a job's code cannot reach the service's database, keys, "
        "tokens or other runs. auto: on the Ray cluster the service starts itself, where "
        "bubblewrap runs; on: also on an embedded cluster it is given, and refuse to start "
        "without it; off: never",
    )
    optuna_url: str | None = Field(
        None, description="Optuna storage for sweep early stopping; default HOME/optuna.db"
    )
    webhook_timeout_seconds: float = Field(
        10, gt=0, le=300, description="a webhook delivery's connect and read timeout"
    )
    webhook_retry_base_seconds: float = Field(
        10,
        gt=0,
        le=86_400,
        description="a failed webhook delivery is tried again after this, doubled after each "
        "further failure (10 s, 20 s, 40 s, ...)",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="attempts before a webhook delivery is marked failed"
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="how often the webhook sender looks for due deliveries"
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'nestor.db'}"

    @property
    def optuna_db_url(self) -> str:
        return self.optuna_url or f"sqlite:///{self.home_dir / 'optuna.db'}"

    @property
    def packages_dir(self) -> Path:
        return self.home_dir / "packages"

    @property
    def run_root(self) -> Path:
        return (self.runs_dir or self.home_dir / "runs").expanduser()

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return self.public_url or f"http://{host}:{self.port}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
