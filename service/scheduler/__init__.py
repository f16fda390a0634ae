"""The scheduler (``core.Scheduler``) and the phases of a pass, one module each."""

from .core import Scheduler
from .launch import job_runtime_env, submission_id
from .reconcile import MAX_REQUEUES

__all__ = ["MAX_REQUEUES", "Scheduler", "job_runtime_env", "submission_id"]
