"""The Ray job entrypoint the service submits: one driver per Nestor job.

    python -m workers.driver --job-id 7 --run-dir RUN --api-url URL --token-file FILE

Reads RUN/spec.json, trains on the Ray cluster it runs in, reports to the service.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .launcher import run_on_ray
from .logs import capture
from .run_dir import RunDir
from .spec import TrainSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument(
        "--max-failures", type=int, default=None, help="default: the spec's max_restarts"
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    with capture(run_dir, "driver", last=True):
        spec = TrainSpec.model_validate_json(RunDir(run_dir).spec.read_text())
        http = {"api_url": args.api_url, "job_id": args.job_id, "token_file": args.token_file}
        failures = spec.max_restarts if args.max_failures is None else args.max_failures
        # A Ray job's driver: RAY_ADDRESS names the cluster the job was submitted to.
        result = run_on_ray(
            spec, run_dir, ray_address="auto", max_failures=failures, http=http, warm=True
        )
        print(json.dumps({k: result.get(k) for k in ("status", "params_sha256", "error")}))
    # Suspended (preempted, to resume later) is not a failure of the Ray job.
    return 0 if result["status"] in ("succeeded", "suspended") else 1


if __name__ == "__main__":
    raise SystemExit(main())
