"""Early stopping for sweeps: asynchronous successive halving (ASHA), as implemented by
Optuna's SuccessiveHalvingPruner. Each sweep is an Optuna study and each trial job an Optuna
trial; the scheduler feeds the trial the metric points its job reported and stops the job
when the pruner says so. Optuna keeps its own tables in its own database (NESTOR_HOME/
optuna.db by default), so Alembic's schema stays Nestor's alone."""

from __future__ import annotations

import optuna
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Job, Metric, Sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)


class EarlyStopper:
    def __init__(self, storage_url: str) -> None:
        self.storage = optuna.storages.RDBStorage(storage_url)
        self._studies: dict[int, optuna.Study] = {}  # loaded once per sweep, not per pass

    def _study(self, sweep: Sweep) -> optuna.Study:
        if sweep.id in self._studies:
            return self._studies[sweep.id]
        es = sweep.spec["early_stopping"]
        self._studies[sweep.id] = optuna.create_study(
            study_name=f"nestor-sweep-{sweep.id}",
            storage=self.storage,
            load_if_exists=True,
            direction="minimize" if es["mode"] == "min" else "maximize",
            pruner=optuna.pruners.SuccessiveHalvingPruner(
                min_resource=es["grace_period"], reduction_factor=es["reduction_factor"]
            ),
        )
        return self._studies[sweep.id]

    def _trial(self, study: optuna.Study, job: Job) -> optuna.trial.Trial:
        for frozen in study.get_trials(deepcopy=False):
            if frozen.user_attrs.get("job_id") == job.id:
                return optuna.trial.Trial(study, frozen._trial_id)
        trial = study.ask()
        trial.set_user_attr("job_id", job.id)
        return trial

    def should_stop(self, db: Session, sweep: Sweep, job: Job) -> str | None:
        """Report the job's new points of the sweep's metric; the reason to stop, or None."""
        es = sweep.spec["early_stopping"]
        metric = es["metric"]
        study = self._study(sweep)
        trial = self._trial(study, job)
        seen = self.storage.get_trial(trial._trial_id).intermediate_values
        rows = db.execute(
            select(Metric.step, Metric.value)
            .where(Metric.job_id == job.id, Metric.key == metric)
            .order_by(Metric.step)
        ).all()
        last_seen = max(seen, default=0)
        for step, value in rows:
            if value is None or step in seen:
                continue
            trial.report(value, step)
            # Ask at the first point on or past each rung, so a batch of points arriving at
            # once is judged rung by rung with the value at that rung, as ASHA defines it.
            rung = _crosses_rung(last_seen, step, es["grace_period"], es["reduction_factor"])
            if rung and trial.should_prune():
                return (
                    f"stopped early by ASHA at step {step}: {metric}={value:.4g} not in "
                    f"the top 1/{es['reduction_factor']} of its rung"
                )
            last_seen = step
        return None

    def finish(self, sweep: Sweep, job: Job) -> None:
        """Close the job's trial once the job has ended."""
        study = self._study(sweep)
        trial = self._trial(study, job)
        state = self.storage.get_trial(trial._trial_id).state
        if state.is_finished():
            return
        values = self.storage.get_trial(trial._trial_id).intermediate_values
        if job.status == "stopped_early":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif job.status == "succeeded" and values:
            study.tell(trial, values[max(values)])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _crosses_rung(previous: int, step: int, grace_period: int, reduction_factor: int) -> bool:
    """Whether a rung (grace_period * reduction_factor**k steps) lies in (previous, step]."""
    rung = grace_period
    while rung <= step:
        if rung > previous:
            return True
        rung *= reduction_factor
    return False
