"""A user's own model, data and loss through the factory path, file data sets read memory-
mapped through the DataLoader, bf16, and the errors a user will hit, on local processes."""

from __future__ import annotations

import json
import pickle
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from workers import TrainSpec
from workers.contract import ArrayDataset
from workers.data import batch_indices, fetch
from workers.files import load_files, npz_member
from workers.launcher import run_local, run_worker
from workers.loop import Session
from workers.spec import FileDatasetSpec

from ..helpers import read_jsonl

USER_MODEL = '''
import torch
from torch import nn
import torch.nn.functional as F


class Quadratic(nn.Module):
    """Not one of Nestor's models: features, their squares, a linear head."""

    def __init__(self, d, classes, width):
        super().__init__()
        self.inner = nn.Linear(2 * d, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.cat([x, x * x], dim=1))))


def build(data, width=32):
    return Quadratic(data.train[0][0].shape[0], 3, width)


def wrong_width(data):
    return nn.Linear(data.train[0][0].shape[0], 7)  # 7 outputs for 3 classes


def loss(outputs, targets):
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def strict_loss(outputs, targets):
    if outputs.shape[1] != 3:
        raise ValueError(f"expected 3 classes, got {outputs.shape[1]}")
    return F.cross_entropy(outputs, targets)
'''

USER_DATA = """
import torch
from torch.utils.data import TensorDataset


def load(n=600, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long())  # 3 classes
    return TensorDataset(x[100:], y[100:]), TensorDataset(x[:100], y[:100])


def broken(**kwargs):
    return helper_that_fails(kwargs)


def helper_that_fails(kwargs):
    raise RuntimeError(f"my data is not there: {kwargs}")
"""


@pytest.fixture
def project(tmp_path):
    """A user project that nothing in Nestor's environment can import by itself."""
    code = tmp_path / "project"
    code.mkdir()
    (code / "usernet.py").write_text(textwrap.dedent(USER_MODEL))
    (code / "userdata.py").write_text(textwrap.dedent(USER_DATA))
    return code


def user_spec(**change) -> TrainSpec:
    spec = {
        "model": {"factory": "usernet:build", "kwargs": {"width": 16}},
        "dataset": {"factory": "userdata:load", "kwargs": {"n": 600}},
        "loss": "usernet:loss",
        "optimizer": {"name": "adan", "lr": 0.01},
        "batch_size": 64,
        "micro_batch_size": 32,
        "num_workers": 1,
        "max_steps": 12,
        "eval_every": 6,
        **change,
    }
    return TrainSpec.model_validate(spec)


def test_a_user_model_trains_and_two_workers_equal_one(project, tmp_path, nestor_home):
    one = run_local(user_spec(), tmp_path / "one", str(project))
    two = run_local(user_spec(num_workers=2), tmp_path / "two", str(project))
    assert one["status"] == two["status"] == "succeeded", (one, two)
    losses = [
        [json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").open()]
        for d in ("one", "two")
    ]
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-5
    assert losses[0][-1] < losses[0][0]
    assert "val_accuracy" in one["final_metrics"]
    p1 = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    p2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-6


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"dataset": {"factory": "userdata:nope"}},
            "dataset.factory: 'userdata' has no attribute 'nope'",
        ),
        ({"model": {"factory": "notthere:build"}}, "model.factory: no module 'notthere'"),
        (
            {"dataset": {"factory": "userdata:broken", "kwargs": {"a": 1}}},
            "RuntimeError: my data is not there: {'a': 1}",
        ),
        (
            {"model": {"factory": "usernet:wrong_width"}, "loss": "usernet:strict_loss"},
            "does not fit the loss (usernet:strict_loss)",
        ),
        ({"batch_size": 1024, "micro_batch_size": 512}, "fewer than one global batch"),
    ],
)
def test_errors_in_user_code_fail_the_job_at_once_naming_the_cause(
    change, expected, project, tmp_path, nestor_home, monkeypatch
):
    monkeypatch.syspath_prepend(str(project))  # in this process: what run_local's workers do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    (tmp_path / "run").mkdir()
    session = Session(0, 1, torch.device("cpu"), tmp_path / "run")
    try:
        result = run_worker(user_spec(**change), session)
    finally:
        dist.destroy_process_group()
    assert result["status"] == "failed"
    assert expected in result["error"]
    status = read_jsonl(tmp_path / "run" / "status.jsonl")
    assert status[-1]["status"] == "failed" and expected in status[-1]["error"]


def test_a_factory_that_raises_reports_the_users_own_traceback(project, tmp_path, nestor_home):
    """On two processes: both ranks fail in setup, agree, and neither waits for the other."""
    spec = user_spec(dataset={"factory": "userdata:broken"}, num_workers=2)
    result = run_local(spec, tmp_path / "run", str(project))
    assert result["status"] == "failed"
    assert 'userdata.py", line' in result["error"]
    assert "in helper_that_fails" in result["error"]


# ------------------------------------------------------------------------- file data sets
@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 40)).astype(np.float32)
    y = rng.integers(0, 10, 500).astype(np.int64)
    return x, y


def _equal(ds: ArrayDataset, x: np.ndarray, y: np.ndarray) -> None:
    idx = np.random.default_rng(1).permutation(len(ds))[:77]  # unordered, as batches are
    bx, by = ds.batch(idx)
    assert np.array_equal(bx.numpy(), x[idx]) and np.array_equal(by.numpy(), y[idx])


def test_npy_npz_and_parquet_read_the_same_rows_memory_mapped(arrays, tmp_path, monkeypatch):
    monkeypatch.setenv("NESTOR_HOME", str(tmp_path / "home"))
    x, y = arrays
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "npy" / "y.npy", y)
    np.savez(tmp_path / "d.npz", feats=x, labels=y)
    np.savez_compressed(tmp_path / "c.npz", feats=x, labels=y)
    table = pa.table({"f": list(x), "label": y})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=128)
    columns = pa.table({**{f"c{i}": x[:, i] for i in range(3)}, "label": y})
    pq.write_table(columns, tmp_path / "cols.parquet")

    cases = [
        ({"path": str(tmp_path / "npy")}, x, True),
        ({"path": str(tmp_path / "d.npz"), "inputs": "feats", "targets": "labels"}, x, True),
        ({"path": str(tmp_path / "c.npz"), "inputs": "feats", "targets": "labels"}, x, False),
        ({"path": str(tmp_path / "d.parquet"), "inputs": "f", "targets": "label"}, x, True),
        (
            {"path": str(tmp_path / "cols.parquet"), "inputs": ["c0", "c1", "c2"]}
            | {"targets": "label"},
            x[:, :3],
            True,
        ),
    ]
    for spec, want_x, mapped in cases:
        data = load_files(FileDatasetSpec(**spec, val_fraction=0.2))
        assert len(data.train) == 400 and len(data.val) == 100, spec
        assert data.num_classes == 10 and data.task == "classification"
        assert isinstance(data.train.inputs, np.memmap) == mapped, spec
        _equal(data.train, want_x[:400], y[:400])
        _equal(data.val, want_x[400:], y[400:])
    # Parquet is converted once, then mapped from the cache.
    assert len(list((tmp_path / "home").glob("datasets/parquet-*/done"))) == 2


def test_npz_member_is_mapped_at_its_offset(arrays, tmp_path):
    x, _ = arrays
    np.savez(tmp_path / "d.npz", a=x[:, :7].copy(), b=x)
    with zipfile.ZipFile(tmp_path / "d.npz") as z:
        assert z.getinfo("b.npy").compress_type == zipfile.ZIP_STORED
    b = npz_member(tmp_path / "d.npz", "b")
    assert isinstance(b, np.memmap) and np.array_equal(np.asarray(b), x)
    with pytest.raises(KeyError, match="has no array 'c' \\(it has: a, b\\)"):
        npz_member(tmp_path / "d.npz", "c")


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_memmap_batches_keep_the_order_and_leave_no_pages_resident(tmp_path, monkeypatch):
    monkeypatch.setattr(ArrayDataset, "MAPPED_BYTES", 16 << 20)  # the targets: 3.2 MB
    rows = 400_000  # 64 MB of inputs, read as training reads them: small random batches
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (rows, 40))
    x[:] = np.arange(rows, dtype=np.float32)[:, None]
    np.save(tmp_path / "y.npy", np.arange(rows, dtype=np.int64))
    del x
    mapped = [np.load(tmp_path / f"{a}.npy", mmap_mode="r") for a in "xy"]
    ds = ArrayDataset(*mapped)
    before = _rss_file_kb()
    for step in range(40):  # 40,000 rows: 10% of the file, scattered over all of it
        idx = batch_indices(step, 1000, rows, seed=3)
        bx, by = fetch(ds, idx)
        assert torch.equal(by, idx) and torch.equal(bx[:, 7].long(), idx)
    assert (_rss_file_kb() - before) / 1024 < 12  # inputs by pread, never through the mapping
    through_mapping = mapped[0][np.sort(batch_indices(0, 40_000, rows, seed=3).numpy())]
    assert (_rss_file_kb() - before) / 1024 > 30  # what the same rows cost through it
    assert through_mapping.shape == (40_000, 40)
    # A DataLoader started with "spawn" pickles the data set: the file's name, not its rows.
    blob = pickle.dumps(ds.split(300_000)[1])
    assert len(blob) < 2000
    again = pickle.loads(blob)
    assert torch.equal(again.batch([0, 5])[1], torch.tensor([300_000, 300_005]))
    with pytest.raises(IndexError):
        again.batch([100_000])


def test_a_file_data_set_trains_the_same_with_and_without_loader_processes(
    arrays, tmp_path, nestor_home
):
    x, y = arrays
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    np.save(tmp_path / "npy" / "y.npy", y)
    base = {
        "model": "mnist1d-mlp",
        "dataset": {"path": str(tmp_path / "npy")},
        "batch_size": 128,
        "micro_batch_size": 64,
        "max_steps": 8,
        "eval_every": 4,
    }
    digests = set()
    for loaders in (0, 2):
        spec = TrainSpec.model_validate({**base, "loader_workers": loaders})
        result = run_local(spec, tmp_path / f"run{loaders}")
        assert result["status"] == "succeeded", result
        digests.add(result["params_sha256"])
    assert len(digests) == 1


# ------------------------------------------------------------------------------------ bf16
BF16_TOLERANCE = 0.05  # |train_loss(bf16) - train_loss(fp32)| at every step (README)


def test_bf16_loss_curve_stays_close_to_fp32(tmp_path, nestor_home):
    base = {
        "model": "mnist1d-mlp",
        "dataset": {"name": "mnist1d", "num_samples": 4000},
        "optimizer": {"name": "adan", "lr": 0.01},
        "batch_size": 256,
        "micro_batch_size": 128,
        "max_steps": 40,
        "eval_every": 20,
    }
    curves = {}
    for precision in ("fp32", "bf16"):
        spec = TrainSpec.model_validate({**base, "precision": precision})
        result = run_local(spec, tmp_path / precision)
        assert result["status"] == "succeeded", result
        lines = (tmp_path / precision / "metrics.jsonl").read_text().splitlines()
        curves[precision] = [json.loads(line)["train_loss"] for line in lines]
        weights = torch.load(tmp_path / precision / "model.pt", weights_only=True)
        assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
        curves[precision + "-result"] = result
    gap = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True))
    assert 0 < gap < BF16_TOLERANCE  # bf16 did change the arithmetic, and only a little
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.5
    fp32, bf16 = curves["fp32-result"], curves["bf16-result"]
    assert fp32["params_sha256"] != bf16["params_sha256"]
    assert abs(fp32["final_metrics"]["val_accuracy"] - bf16["final_metrics"]["val_accuracy"]) < 0.05
