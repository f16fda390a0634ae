"""The training loop: one function, read top to bottom, the same on 1 process or N workers.

Per step: lr from the schedule -> this rank's part of the global batch, in micro-batches ->
backward (ZeroOptimizer averages, clips and steps) -> metrics -> eval -> checkpoint.
The distributed parts are a process group (set up by Ray Train, or by a test) and a
``Session`` that says where checkpoints live.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from optimizers import ZeroOptimizer

from . import elastic
from .contract import Data
from .data import (
    Objective,
    SetupError,
    batch_indices,  # noqa: F401  (the batch order is part of the loop's contract)
    build_model,
    fetch,
    load_data,
    micro_batches,
)
from .flops import FlopCounter, peak_tflops, throughput_metrics
from .reporting import Reporter
from .run_dir import CheckpointDir, RunDir
from .schedule import lr_factor
from .spec import TrainSpec


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for ``max_bad_steps`` consecutive steps."""


@dataclass
class Session:
    """Where this worker stands: its rank, its device and the run's directory (checkpoints
    under ``run_dir/checkpoints``, results in ``run_dir``; shared by all workers)."""

    rank: int
    world_size: int
    device: torch.device
    run_dir: Path


def autocast(spec: TrainSpec, device: torch.device):
    """bf16: the forward pass and the loss in bfloat16 where autocast allows (weights,
    gradients and optimizer state stay fp32); fp32: nothing."""
    if spec.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def evaluate(
    model, data: Data, objective: Objective, spec: TrainSpec, session: Session, batch: int
) -> dict[str, float]:
    """Validation loss and accuracy (or bits per character) over the whole validation set,
    each rank taking a share and the sums all-reduced."""
    model.eval()
    n = len(data.val)
    lo, hi = n * session.rank // session.world_size, n * (session.rank + 1) // session.world_size
    sums = torch.zeros(3, dtype=torch.float64, device=session.device)  # loss*count, correct, count
    has_accuracy = True
    for i in range(lo, hi, batch):
        x, y = _to(fetch(data.val, np.arange(i, min(hi, i + batch))), session.device)
        with autocast(spec, session.device):
            outputs = model(x)
            loss = objective(outputs, y)
        count = y.numel()
        sums[0] += loss.double() * count
        correct = objective.correct(outputs, y)
        has_accuracy = has_accuracy and correct is not None
        sums[1] += 0 if correct is None else correct
        sums[2] += count
    if session.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    val_loss = (sums[0] / sums[2]).item()
    out = {"val_loss": val_loss}
    if has_accuracy and data.task != "regression":
        out["val_accuracy"] = (sums[1] / sums[2]).item()
    if data.task == "lm":
        out["val_bits_per_char"] = val_loss / math.log(2)
    return out


# ------------------------------------------------------------------------------ checkpoints
def _checkpoints(run: RunDir) -> list[CheckpointDir]:
    """The run's checkpoint folders, complete or not, oldest first."""
    found = (run.checkpoint_at(d) for d in run.checkpoints.glob(RunDir.CHECKPOINTS))
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> CheckpointDir | None:
    """The newest complete checkpoint (its ``complete.json`` is written last)."""
    complete = [c for c in _checkpoints(RunDir(run_dir)) if c.complete.exists()]
    return complete[-1] if complete else None


def _reported_before(run_dir: Path) -> bool:
    path = RunDir(run_dir).metrics
    return path.exists() and path.stat().st_size > 0


def _save(value: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def save_portable(
    opt: ZeroOptimizer, model: torch.nn.Module, session: Session, where: RunDir | CheckpointDir
) -> None:
    """The portable pair, readable without Nestor at any world size: ``model.pt`` (the
    model's state dict) and ``optimizer.pt`` (the consolidated state dict of the plain
    optimizer ``create_optimizer(model.parameters(), spec)`` builds), written by rank 0.
    A collective (the optimizer state is gathered to rank 0, which briefly holds all of it)."""
    consolidated = opt.consolidated_state_dict()
    if session.rank != 0:
        return
    _save(_cpu(model.state_dict()), where.model)
    consolidated = _cpu(consolidated)
    consolidated["nestor"] = {"optimizer": opt.spec.model_dump(mode="json"), "params": opt.names}
    _save(consolidated, where.optimizer)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and any incomplete one
    older than them)."""
    every = _checkpoints(RunDir(run_dir))
    complete = [c.step for c in every if c.complete.exists()]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for c in every:
        if c.step < oldest_kept:
            shutil.rmtree(c.path, ignore_errors=True)


def save_checkpoint(
    opt: ZeroOptimizer,
    model: torch.nn.Module,
    session: Session,
    step: int,
    best: dict,
    keep: int = 2,
) -> None:
    """A collective: parameters and optimizer slices (ZeroOptimizer, for resuming), the
    portable pair, each rank's RNG state, and on rank 0 the loop's own position. The schedule
    is a function of the step, and so is the data order. Then only the newest ``keep``
    checkpoints stay."""
    d = RunDir(session.run_dir).checkpoint(step)
    opt.save_checkpoint(d.path)
    save_portable(opt, model, session, d)
    torch.save({"torch": torch.get_rng_state()}, d.rng(session.rank))
    if session.world_size > 1:
        dist.barrier()
    if session.rank == 0:
        d.complete.write_text(json.dumps({"step": step, "best": best}))
        prune_checkpoints(session.run_dir, keep)


def load_buffers(model: torch.nn.Module, path: Path) -> None:
    """Restore the model's buffers (BatchNorm's running statistics) from a ``model.pt``;
    the parameters come from the optimizer's checkpoint."""
    if not path.exists():
        return
    saved = torch.load(path, weights_only=True, map_location="cpu")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in saved and saved[name].shape == buf.shape:
                buf.copy_(saved[name])


def load_weights(model: torch.nn.Module, path: Path, source: str) -> None:
    """``init_from``: the model's state from another job's ``model.pt``; a SetupError naming
    the tensors when they do not fit this model."""
    saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    ours = model.state_dict()
    problems = [f"{k} is missing from {source}" for k in ours if k not in saved]
    problems += [f"{k} (from {source}) is not in this model" for k in saved if k not in ours]
    problems += [
        f"{k} is {tuple(saved[k].shape)} in {source}, {tuple(v.shape)} in this model"
        for k, v in ours.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SetupError(
            f"init_from {source}: its weights do not fit this model: "
            + "; ".join(problems[:5])
            + more
        )
    model.load_state_dict(saved)


def load_optimizer_state(opt: ZeroOptimizer, path: Path, source: str) -> None:
    """``init_from`` with ``optimizer_state``: continue another job's optimizer."""
    saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    theirs = saved.get("nestor", {}).get("optimizer", {}).get("name")
    if theirs is not None and theirs != opt.spec.name:
        raise SetupError(
            f"init_from {source}: its optimizer state is {theirs!r}, this job uses "
            f"{opt.spec.name!r}; set optimizer_state to false to start the optimizer afresh"
        )
    try:
        opt.load_consolidated_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise SetupError(f"init_from {source}: cannot continue its optimizer: {e}") from None


def init_source(spec: TrainSpec, session: Session) -> dict[str, Any] | None:
    """Where ``init_from`` points: ``run_dir/init_from.json`` ({"source", "model",
    "optimizer"}), written by the service when it launches the job."""
    if spec.init_from is None:
        return None
    path = RunDir(session.run_dir).init_from
    if not path.exists():
        raise SetupError(
            f"init_from {spec.init_from.describe()}: no init_from.json in the run directory "
            "(init_from needs the Nestor service, which resolves the job's files)"
        )
    return json.loads(path.read_text())


def params_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter's bytes in name order, for bit-for-bit run comparison."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------- device reads
class HostFlag:
    """Whether a device value is finite, copied to the host without waiting for the work
    queued after it: ``start`` after the last forward pass, ``read`` after the backward
    pass is queued, so the device is never left idle while the host waits."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, value: torch.Tensor) -> None:
        self.host.copy_(torch.isfinite(value), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


class Pace:
    """Throughput between reports, timed on the host after the device caught up (a report
    reads values, which waits for the queued steps): step time, samples and tokens per
    second, and, from the FLOPs of one micro-batch counted on this attempt's first
    (``workers.flops``), achieved TFLOP/s and MFU. Evaluation and checkpoints are left out."""

    def __init__(self, spec: TrainSpec, data: Data, world: int, device: torch.device) -> None:
        self.spec, self.world = spec, world
        self.lm = data.task == "lm"
        self.micro_flops: int | None = None
        self.tokens_per_micro: int | None = None
        self.peak = peak_tflops(device, spec.precision)
        self.steps, self.mark = 0, time.perf_counter()

    @contextlib.contextmanager
    def counting(self, y: Any):
        """Count the FLOPs of the first micro-batch's forward and backward passes (and
        its tokens: the targets' count, for a language model)."""
        if self.micro_flops is not None:
            yield
            return
        with FlopCounter() as counter:
            yield
        self.micro_flops = counter.total
        self.tokens_per_micro = int(y.numel()) if self.lm else None

    def stepped(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def excluded(self):
        start = time.perf_counter()
        yield
        self.mark += time.perf_counter() - start

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds, steps = now - self.mark, self.steps
        self.steps, self.mark = 0, now
        per_step = self.spec.accumulation_at(self.world) * self.world  # micro-batches
        tokens = self.tokens_per_micro
        return throughput_metrics(
            step_flops=(self.micro_flops or 0) * per_step,
            world_size=self.world,
            steps=steps,
            seconds=seconds,
            samples_per_step=self.spec.batch_size,
            tokens_per_step=tokens * per_step if tokens is not None else None,
            peak=self.peak,
        )


# ------------------------------------------------------------------------------- the loop
def setup(
    spec: TrainSpec, session: Session, init: dict[str, Any] | None = None
) -> tuple[Data, torch.nn.Module, Objective]:
    """The data, the model on this rank's device (from ``init``'s weights when given) and
    the objective, from the spec's factories. Every rank agrees before training: when one
    fails, all raise, and the failing rank's ``SetupError`` (in
    ``run_dir/setup-error-rank{r}.txt``) is the error."""
    error: SetupError | None = None
    try:
        data = load_data(spec)
        model = build_model(spec, data)
        if init is not None:
            load_weights(model, Path(init["model"]), init["source"])
        model = model.to(session.device)
        objective = Objective(spec, data)
    except SetupError as e:
        error = e
        RunDir(session.run_dir).setup_error(session.rank).write_text(str(e))
    if session.world_size > 1:
        failed = torch.tensor([error is not None], dtype=torch.int32, device=session.device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            first = sorted(session.run_dir.glob(RunDir.SETUP_ERRORS))
            error = SetupError(first[0].read_text() if first else "another rank failed")
    if error is not None:
        raise error
    return data, model, objective


def _world(spec: TrainSpec, session: Session) -> dict[str, Any]:
    """What a status report says of an elastic job's size: the workers it trains on and
    why (the reason ``resize.json`` gives for this size); nothing for a fixed job."""
    if not spec.elastic:
        return {}
    asked = elastic.read_resize(session.run_dir)
    reason = asked.reason if asked and asked.num_workers == session.world_size else None
    return {"world_size": session.world_size, "reason": reason or "started"}


def train(spec: TrainSpec, session: Session, reporter: Reporter | None) -> dict[str, Any]:
    """Train ``spec`` on this rank; returns the final metrics and the parameters' digest.
    Resumes from the run directory's latest checkpoint when there is one."""
    rank, world, device = session.rank, session.world_size, session.device
    spec.check_world(world)
    report = reporter if rank == 0 else None
    # An elastic job's size asked for (rank 0 reads it each step; 0: as now).
    watched = spec.elastic or bool(spec.preemptible)
    resizes = elastic.Watch(session.run_dir) if watched and rank == 0 else None

    resumed = latest_checkpoint(session.run_dir)
    init = None if resumed is not None else init_source(spec, session)
    data, model, objective = setup(spec, session, init)
    opt = ZeroOptimizer(model.named_parameters(), spec.optimizer_spec(), stage=spec.zero_stage)
    # Parameter elements whose optimizer state this rank keeps (its shards, padding aside):
    # the state's bytes over them is the format's own cost, 16 for fp32 Adan, ~4 for int8.
    held = sum(length for s in opt.shard_view.shards for *_, length in s.pieces)
    if spec.overlaps_all_gather(world):
        opt.overlap_with(model)
    peak_lrs = [g["lr"] for g in opt.param_groups]
    if init is not None and init.get("optimizer"):
        load_optimizer_state(opt, Path(init["optimizer"]), init["source"])

    start, best = 0, {}
    if resumed is not None:
        step_done = resumed.step
        opt.load_checkpoint(resumed.path)
        load_buffers(model, resumed.model)
        if resumed.rng(rank).exists():
            torch.set_rng_state(torch.load(resumed.rng(rank), weights_only=True)["torch"])
        else:  # a rank the checkpoint's smaller world did not have
            torch.manual_seed(spec.seed * 1_000_003 + step_done * 1009 + rank)
        best = json.loads(resumed.complete.read_text())["best"]
        start = step_done
        if report:
            report.resume(step_done)
            report.status("running", resumed_from_step=step_done, **_world(spec, session))
    elif report:
        if _reported_before(session.run_dir):
            # A restart without a checkpoint: the crashed attempt's points are discarded
            # (here and in the service), and training reports every step again.
            report.resume(0)
        report.status("running", **_world(spec, session))

    micro, accum = spec.micro_batch_size, spec.accumulation_at(world)
    # Each micro-batch's loss weight, so that the ranks' average (ZeroOptimizer divides by
    # the world size) is the global batch's mean: 1 / accum when every micro-batch holds
    # micro_batch_size samples (a fixed job: the division it always was), else its samples
    # x world / batch_size (an elastic job on a size that does not divide the batch).
    sizes = spec.micro_sizes(rank, world)
    even = sizes == [micro] * accum and micro * accum * world == spec.batch_size
    weights = [None if even else m * world / spec.batch_size for m in sizes]
    n_train = len(data.train)
    batches = micro_batches(data, spec, rank, world, start, device)
    finite = HostFlag(device)
    asked_host = torch.zeros((), dtype=torch.float64, pin_memory=device.type == "cuda")
    pace = Pace(spec, data, world, device)
    bad_steps, metrics, reached = 0, {}, None
    for step in range(start, spec.max_steps):
        t0 = time.perf_counter()
        lr_now = lr_factor(step, spec.max_steps, spec.lr_schedule)
        for group, peak in zip(opt.param_groups, peak_lrs, strict=True):
            group["lr"] = peak * lr_now

        # This rank's distinct part of the global batch, as `accum` micro-batches. The loss
        # stays on the device; only whether it is finite comes to the host, copied once the
        # last forward pass is done, while the last backward pass is already queued.
        # [the loss summed over ranks, the world size asked for]: rank 0 adds the latter,
        # so one all-reduce tells every rank both.
        stats = torch.zeros(2, dtype=torch.float64, device=device)
        loss_sum = stats[0]
        data_time = 0.0
        for i in range(accum):
            t = time.perf_counter()
            x, y = _to(next(batches), device)
            data_time += time.perf_counter() - t
            with pace.counting(y):
                with autocast(spec, device):
                    loss = objective(model(x), y)
                w = weights[i]
                loss_sum += loss.detach().double() / accum if w is None else loss.detach() * w
                if i == accum - 1:
                    if resizes is not None and (asked := resizes.current()) is not None:
                        stats[1] = asked.num_workers or -1  # -1: suspend
                    if world > 1:
                        dist.all_reduce(stats)
                    if watched:  # on the host with the flag, behind the same event
                        asked_host.copy_(stats[1], non_blocking=device.type == "cuda")
                    finite.start(loss_sum)
                (loss / accum if w is None else loss * w).backward()
        t_compute = time.perf_counter()

        if not finite.read():
            bad_steps += 1
            opt.zero_grad()
            pace.stepped()  # its forward and backward passes ran
            train_loss = loss_sum.item() / world  # a bad step: the only one read at once
            if report:
                report.metrics(step + 1, {"train_loss": train_loss, "skipped": 1.0})
            if bad_steps >= spec.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss was non-finite ({train_loss}) for {bad_steps} consecutive steps "
                    f"(at step {step + 1}; max_bad_steps={spec.max_bad_steps}); lower the "
                    f"learning rate or set max_grad_norm"
                )
            continue
        bad_steps = 0
        opt.step()
        opt.zero_grad()
        t_end = time.perf_counter()
        pace.stepped()

        done = step + 1
        evaluates = spec.evaluates_at(done)
        if done % spec.log_every == 0 or done == spec.max_steps or evaluates:
            metrics = {
                # Read here, once per logging interval (nanoGPT's habit): between reports
                # nothing comes from the device and the host runs ahead of it.
                "train_loss": loss_sum.item() / world,
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": float(opt.last_grad_norm),
                # Where this step's host time went: reading the micro-batches; queueing
                # forward, backward (with stage 2's gradient reduce-scatter) and the loss's
                # all-reduce; the optimizer step with its collectives. On a GPU these are
                # host times; step_time and the rates below are the device's.
                "data_time": data_time,
                "compute_time": t_compute - t0 - data_time,
                "optimizer_time": t_end - t_compute,
                "opt_state_bytes": float(opt.state_nbytes()),
                "opt_state_bytes_per_param": opt.state_nbytes() / max(held, 1),
                "epoch": done * spec.batch_size / n_train,
                **pace.report(),  # step_time, samples_per_s (tokens, TFLOP/s, MFU) since last
            }
            if evaluates:
                with pace.excluded():
                    metrics.update(
                        evaluate(model, data, objective, spec, session, max(micro, 1024))
                    )
                if metrics["val_loss"] < best.get("val_loss", math.inf):
                    best = {"val_loss": metrics["val_loss"], "step": done}
                if spec.stop_at is not None and spec.stop_at.reached(metrics):
                    reached = done
            if report:
                report.metrics(done, metrics)
            if reached is not None:
                break  # every rank evaluated the same all-reduced metrics: all stop here
        saved = False
        if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < spec.max_steps:
            with pace.excluded():
                save_checkpoint(opt, model, session, done, best, spec.keep_checkpoints)
            saved = True
        asked = int(asked_host) if watched else 0
        if asked < 0 and done < spec.max_steps:
            # Preempted: checkpoint at this step boundary and give the workers back; the
            # service queues the job again and it resumes here.
            if not saved:
                save_checkpoint(opt, model, session, done, best, spec.keep_checkpoints)
            opt.close()
            if report:
                report.status("suspended", step=done)
            return {"status": "suspended", "steps": done, "world_size": world}
        if asked > 0 and spec.elastic and done < spec.max_steps:
            target = min(max(asked, spec.min_workers), spec.max_workers)
            if target != world:
                # A planned resize: checkpoint at this step boundary and end the segment;
                # the next starts here at the new size, so nothing is recomputed.
                if not saved:
                    save_checkpoint(opt, model, session, done, best, spec.keep_checkpoints)
                opt.close()
                if report:
                    report.status("resizing", step=done, world_size=world, next_world_size=target)
                return {
                    "status": "resized",
                    "steps": done,
                    "world_size": world,
                    "next_world_size": target,
                }

    # The trained model and optimizer: plain state dicts (load with weights_only=True).
    save_portable(opt, model, session, RunDir(session.run_dir))
    result = {
        "status": "succeeded",
        "steps": reached or spec.max_steps,
        "final_metrics": metrics,
        "best": best,
        "params_sha256": params_sha256(model),
        "world_size": world,
    }
    if spec.stop_at is not None:
        result["reached_target_at_step"] = reached
    opt.close()
    if report:
        report.status("succeeded", reached_target_at_step=reached)
    return result
