"""``nestor train``: a job spec trained here and now, on Ray (a private local cluster or
``--ray-address``) or in local processes (``--local``), with no service.

Only workers/ (and tqdm) on the path to training: ``nestor train --local --out DIR`` runs
where pydantic-settings and SQLAlchemy are not installed, so every other import is lazy.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers.run_dir import RunDir
from workers.spec import optimizer_label

from .errors import fail
from .specs import load_spec_file


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``nestor`` parser."""
    train = sub.add_parser("train", help="train a job spec now (embedded Ray by default)")
    train.add_argument("spec", help="TrainSpec JSON file (see examples/)")
    train.add_argument("--workers", type=int, help="override num_workers")
    train.add_argument(
        "--ray-address",
        help="an existing Ray cluster: host:port, or 'auto' for the one this machine started "
        "last (default: a private local Ray for this run)",
    )
    train.add_argument("--out", help="run directory (default: NESTOR_HOME/runs/NAME-TIME)")
    train.add_argument(
        "--code",
        metavar="DIR",
        help="your project directory, importable by the spec's factories (zipped as "
        "`nestor submit --code` would, and shipped as Ray's working_dir)",
    )
    train.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="worker-group restarts from the latest checkpoint (default: the spec's max_restarts)",
    )
    train.add_argument(
        "--local", action="store_true", help="local processes instead of Ray (debugging)"
    )
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the spec; print a JSON summary; 0 when the run succeeded, 1 otherwise."""
    overrides = {"num_workers": args.workers} if args.workers else {}
    spec = load_spec_file(args.spec, overrides)
    if args.out:
        run_dir = Path(args.out)
    else:  # pydantic-settings only here: `--local --out` runs where only workers/ can
        from ..settings import Settings

        run_dir = Settings().run_root / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if RunDir(run_dir).result.exists():
        fail(f"{run_dir} already holds a finished run; choose another --out")
    runtime_env, code_dir = None, None
    if args.code:
        spec, code_dir, runtime_env = _local_package(spec, args.code, run_dir)
    elif spec.code:
        fail(
            f"{args.spec}: the spec names code package {spec.code}; give --code DIR to "
            f"train it here"
        )
    elif spec.requirements:
        runtime_env = {"pip": spec.requirements}
    where = ""
    if args.local:  # the devices are checked before any process starts
        from workers.launcher import (
            LocalDevicesError,
            cuda_device_count,
            local_devices,
            on_this_machine,
        )

        cuda_count = cuda_device_count()
        spec = on_this_machine(spec, cuda_count)
        try:
            backend, devices = local_devices(spec, cuda_count)
        except LocalDevicesError as e:
            fail(str(e))
        where = f" on {', '.join(dict.fromkeys(devices))} ({backend})"
    workers = f"{spec.min_workers}-{spec.max_workers}" if spec.elastic else str(spec.num_workers)
    print(
        f"nestor: training {spec.describe()} with {optimizer_label(spec.model_dump())}, "
        f"batch {spec.batch_size} over {workers} worker(s){where}, "
        f"ZeRO-{spec.zero_stage}; output in {run_dir}",
        file=sys.stderr,
    )
    done = threading.Event()
    bar = threading.Thread(target=_progress, args=(run_dir, spec.max_steps, done), daemon=True)
    bar.start()
    try:
        if args.local:
            from workers.launcher import run_local

            result = run_local(spec, run_dir, code_dir)
        else:
            from workers.launcher import run_on_ray

            result = run_on_ray(
                spec,
                run_dir,
                ray_address=args.ray_address,
                max_failures=spec.max_restarts if args.max_failures is None else args.max_failures,
                runtime_env=runtime_env,
                warm=True,
            )
    except ConnectionError as e:
        fail(str(e))
    finally:
        done.set()
        bar.join()
    print(json.dumps(_summary(result), indent=1))
    return 0 if result["status"] == "succeeded" else 1


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What ``nestor train`` prints of a run's result: its status, final losses, the step it
    reached its target at, the parameters' digest and the error."""
    final = result.get("final_metrics", {})
    return {
        "status": result["status"],
        **{k: final[k] for k in ("train_loss", "val_loss", "val_accuracy") if k in final},
        **(
            {"reached_target_at_step": result["reached_target_at_step"]}
            if "reached_target_at_step" in result
            else {}
        ),
        "params_sha256": result.get("params_sha256"),
        "error": result.get("error"),
    }


def _local_package(spec, directory: str, run_dir: Path):
    """``nestor train --code DIR``: the same package the service would store (``DIR`` zipped,
    what .gitignore ignores left out), as Ray's working_dir, or unpacked for --local."""
    import zipfile

    from ..package_pack import pack_dir, package_id

    if not Path(directory).is_dir():
        fail(f"--code {directory}: not a directory")
    data = pack_dir(Path(directory))
    spec = spec.model_copy(update={"code": package_id(data)})
    run_dir.mkdir(parents=True, exist_ok=True)
    archive = run_dir / "code.zip"
    archive.write_bytes(data)
    code_dir = run_dir / "code"
    with zipfile.ZipFile(archive) as z:
        z.extractall(code_dir)
    env: dict[str, Any] = {"working_dir": str(archive)}
    if spec.requirements:
        env["pip"] = spec.requirements
    return spec, str(code_dir), env


def _progress(run_dir: Path, total: int, done: threading.Event) -> None:
    """Follow metrics.jsonl with a progress bar until ``done``."""
    from tqdm import tqdm

    path = RunDir(run_dir).metrics
    with tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
        pos = 0
        while True:
            finished = done.is_set()
            if path.exists():
                with open(path) as f:
                    f.seek(pos)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        pos += len(line)
                        try:
                            rec = json.loads(line)
                        except ValueError:  # a line torn by a crashed attempt
                            continue
                        bar.n = min(total, rec["step"])
                        post = {"loss": rec.get("train_loss")}
                        if rec.get("samples_per_s"):
                            post["samples/s"] = f"{rec['samples_per_s']:.0f}"
                        if rec.get("val_accuracy") is not None:
                            post["val_acc"] = f"{rec['val_accuracy']:.3f}"
                        bar.set_postfix(post, refresh=False)
                        bar.refresh()
            if finished:
                return
            time.sleep(0.5)
