"""Nestor's training side: the job spec, datasets, models, the loop, and launching on Ray.

Imports optimizers/; never SQLAlchemy or FastAPI.
"""

from .spec import (
    DatasetSpec,
    FactorySpec,
    FileDatasetSpec,
    LRScalingSpec,
    LRScheduleSpec,
    TrainSpec,
)

__all__ = [
    "DatasetSpec",
    "FactorySpec",
    "FileDatasetSpec",
    "LRScalingSpec",
    "LRScheduleSpec",
    "TrainSpec",
]
