"""The built-in file data set: arrays on a path every worker can read, memory-mapped.

- a directory of ``.npy`` files: ``inputs`` and ``targets`` name two of them (``x`` is
  ``DIR/x.npy``), opened with ``np.load(mmap_mode="r")``;
- an ``.npz`` archive: ``inputs`` and ``targets`` name two members. A member stored
  uncompressed (``np.savez``) is memory-mapped in place; a compressed one
  (``np.savez_compressed``) cannot be, and is read into memory;
- a Parquet file: ``inputs`` names a column (of numbers or fixed-size lists) or a list of
  numeric columns stacked into one feature vector, ``targets`` a column. Parquet is encoded,
  so it cannot be mapped; it is converted once, row group by row group, into ``.npy`` files
  in ``NESTOR_HOME/datasets/parquet-<digest>/`` (keyed by the file's path, size, modification
  time and the columns) and those are memory-mapped.

Without ``val_path`` the last ``val_fraction`` of the rows are the validation set (so a file
should not be sorted by class); the training order is Nestor's own seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np

from .contract import ArrayDataset, Data
from .spec import FileDatasetSpec


def load_files(spec: FileDatasetSpec) -> Data:
    """The data set ``spec`` names, memory-mapped where the format allows."""
    train = _arrays(Path(spec.path), spec)
    if spec.val_path:
        val = _arrays(Path(spec.val_path), spec)
    else:
        n_val = max(1, round(len(train) * spec.val_fraction))
        train, val = train.split(len(train) - n_val)
    classes = None
    if spec.task == "classification":
        classes = max(_max_label(train), _max_label(val)) + 1
    return Data(train, val, spec.task, classes)


def _arrays(path: Path, spec: FileDatasetSpec) -> ArrayDataset:
    if not path.exists():
        raise FileNotFoundError(f"dataset.path: {path} does not exist on this worker")
    if path.is_dir():
        names = spec.inputs if isinstance(spec.inputs, list) else [spec.inputs]
        if len(names) != 1:
            raise ValueError("dataset.inputs: a directory of .npy files takes one array name")
        x = np.load(path / f"{names[0]}.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(path / f"{spec.targets}.npy", mmap_mode="r", allow_pickle=False)
        return ArrayDataset(x, y)
    if path.suffix == ".npz":
        if isinstance(spec.inputs, list):
            raise ValueError("dataset.inputs: an .npz archive takes one member name")
        return ArrayDataset(npz_member(path, spec.inputs), npz_member(path, spec.targets))
    if path.suffix == ".parquet":
        cache = _parquet_as_npy(path, spec)
        x = np.load(cache / "inputs.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(cache / "targets.npy", mmap_mode="r", allow_pickle=False)
        return ArrayDataset(x, y)
    raise ValueError(f"dataset.path: {path} is not a directory, an .npz or a .parquet file")


def npz_member(path: Path, name: str) -> np.ndarray:
    """Member ``name`` of an .npz: memory-mapped when stored uncompressed, else read."""
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(f"{name}.npy")
        except KeyError:
            members = ", ".join(n.removesuffix(".npy") for n in z.namelist())
            raise KeyError(f"{path} has no array {name!r} (it has: {members})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            with z.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        # The member's bytes follow its local header: 30 bytes, then its name and extra field.
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}:{name} holds Python objects, which are never unpickled")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _parquet_as_npy(path: Path, spec: FileDatasetSpec) -> Path:
    import pyarrow.parquet as pq

    from .datasets import nestor_home, share

    stat = path.stat()
    key = json.dumps(
        [str(path.resolve()), stat.st_size, stat.st_mtime_ns, spec.inputs, spec.targets]
    )
    cache = nestor_home() / "datasets" / f"parquet-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (cache / "done").exists():
        return cache
    columns = spec.inputs if isinstance(spec.inputs, list) else [spec.inputs]
    pf = pq.ParquetFile(path)
    missing = [c for c in [*columns, spec.targets] if c not in pf.schema_arrow.names]
    if missing:
        have = ", ".join(pf.schema_arrow.names)
        raise KeyError(f"{path} has no column {missing[0]!r} (it has: {have})")
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    n = pf.metadata.num_rows
    x_out = y_out = None
    row = 0
    for batch in pf.iter_batches(batch_size=65536, columns=[*columns, spec.targets]):
        x = _stack(batch, columns)
        y = batch.column(spec.targets).to_numpy(zero_copy_only=False)
        if x_out is None:
            x_out = np.lib.format.open_memmap(tmp / "inputs.npy", "w+", x.dtype, (n, *x.shape[1:]))
            y_out = np.lib.format.open_memmap(tmp / "targets.npy", "w+", y.dtype, (n,))
        x_out[row : row + len(x)] = x
        y_out[row : row + len(y)] = y
        row += len(x)
    if x_out is None:
        raise ValueError(f"{path} has no rows")
    x_out.flush()
    y_out.flush()
    del x_out, y_out
    (tmp / "done").write_text("")
    share(tmp)
    try:
        os.rename(tmp, cache)  # another worker may have finished first: keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _stack(batch, columns: list[str]) -> np.ndarray:
    if len(columns) == 1:
        col = batch.column(columns[0])
        values = col.to_numpy(zero_copy_only=False)
        if values.dtype == object:  # a list column: one fixed-size vector per row
            return np.stack(values)
        return values
    return np.stack([batch.column(c).to_numpy(zero_copy_only=False) for c in columns], axis=1)


def _max_label(ds: ArrayDataset, chunk: int = 1 << 22) -> int:
    """The largest target, read in chunks (the targets alone, never the inputs)."""
    best = -1
    for lo in range(ds.start, ds.stop, chunk):
        best = max(best, int(np.asarray(ds.targets[lo : min(ds.stop, lo + chunk)]).max()))
        ds.release()
    return best


def load(**kwargs: object) -> Data:
    """The data factory a spec's ``{"path": ...}`` data set stands for."""
    return load_files(FileDatasetSpec.model_validate(kwargs))
