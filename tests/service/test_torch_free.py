"""The service validates specs, stores jobs and answers the API without torch: the spec
contract (TrainSpec, OptimizerSpec) is torch-free, and optimizers load on first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_the_service_answers_without_ever_importing_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.settings import Settings

        app = create_app(Settings(home={str(tmp_path)!r}, admin_token="nst_x"), scheduler=False)
        spec = {{"model": "mnist1d-mlp", "dataset": {{"name": "mnist1d"}}, "batch_size": 256}}
        answers = []
        with TestClient(app, headers={{"Authorization": "Bearer nst_x"}}) as c:
            for name in ("adan", "lookahead_lamb", "amsgrad"):
                body = {{"spec": {{**spec, "optimizer": {{"name": name, "lr": 0.01}}}}}}
                answers.append(c.post("/v1/jobs", json=body).status_code)
            bad = {{"spec": {{**spec, "optimizer": {{"name": "adam", "lr": 0.01}}}}}}
            answers.append(c.post("/v1/jobs", json=bad).status_code)
            sweep = {{"name": "s", "base": spec, "space": {{"optimizer.lr": [0.1, 0.01]}}}}
            answers.append(c.post("/v1/sweeps", json=sweep).status_code)
            answers.append(c.get("/v1/jobs").status_code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray"))
        print(json.dumps({{"answers": answers, "heavy": heavy[:5]}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["answers"] == [201, 201, 201, 422, 201, 200], found
    assert found["heavy"] == [], found


def test_one_reader_of_nestor_home_per_side():
    """The service reads NESTOR_HOME through its settings only; a job's processes through
    ``workers.datasets.nestor_home`` only; the default is written once (workers.spec)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    reads = re.compile(r"(environ\.get\(|environ\[|getenv\()\s*(\"NESTOR_HOME\"|HOME_VARIABLE)")
    readers, defaults = [], []
    for path in sorted([*(root / "service").rglob("*.py"), *(root / "workers").rglob("*.py")]):
        text = path.read_text()
        name = str(path.relative_to(root))
        if reads.search(text):
            readers.append(name)
        if '"~/.nestor"' in text or '".nestor"' in text:
            defaults.append(name)
    assert readers == ["workers/datasets.py"], readers
    assert defaults == ["workers/spec.py"], defaults
    from service.settings import Settings
    from workers.spec import DEFAULT_HOME

    assert Settings.model_fields["home"].default == Path(DEFAULT_HOME)
    assert Settings.model_config["env_prefix"] + "HOME" == "NESTOR_HOME"
