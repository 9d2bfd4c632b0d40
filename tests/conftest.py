"""Shared test helpers: tiny, deterministic CIFAR-10-shaped data in every on-disk layout, and
the command line run in-process (`run_cli`).

`tiny_arrays(n)` gives exactly the arrays `cifarlab.data.load_cifar10` returns for data written by
`make_image_folders(root, n)` (PNG is lossless), `make_cifar_python(root, n)` or `make_tar(root, n)`
with the same `n`: n images per class and split, classes interleaved (sample i has class i % 10).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data import ARCHIVE_NAME, BATCHES_DIR, CLASSES, META_FILE, TEST_BATCH, TRAIN_BATCHES


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Point every cache and default data folder at fresh temporary folders: no test may read or
    write the user's real ~/.cache. Returns the CIFARLAB_CACHE folder."""
    cache = tmp_path_factory.mktemp("cifarlab-cache")
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    return cache


@pytest.fixture(autouse=True)
def ctrl_c_as_at_a_terminal():
    """Python's own Ctrl-C handler during every test, as a program started at a terminal has it:
    a suite started in the background (`make test &`, or by a CI runner that does) inherits
    SIGINT ignored, and cifarlab, rightly, leaves an ignored Ctrl-C ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigterm_caught():
    """SIGTERM's default would end pytest itself: while a test runs, the signals that reach the
    process's own handler (none should, while cifarlab handles SIGTERM) are listed instead."""
    import signal

    reached = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: reached.append(signum))
    yield reached
    signal.signal(signal.SIGTERM, previous)


def tiny_arrays(n_per_class: int, seed: int = 0) -> dict:
    """Random but reproducible images; labels cycle through the 10 classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        n = n_per_class * len(CLASSES)
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n, dtype=np.int64) % len(CLASSES)
    return arrays


def make_image_folders(root: Path, n_per_class: int, fmt: str = "png") -> Path:
    """root/{train,test}/<class>/NNNN.<fmt>; returns root."""
    root = Path(root)
    arrays = tiny_arrays(n_per_class)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"])):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i // len(CLASSES):04d}.{fmt}")
    return root


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings, as the official batches hold them: loading with
    encoding="bytes" then gives bytes keys (b"data"), as with the real files."""

    def __init__(self, f):
        super().__init__(f, protocol=2)

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def dump_pickle(obj, path: Path, py2_bytes_keys: bool = True) -> None:
    with open(path, "wb") as f:
        if py2_bytes_keys:
            Py2Pickler(f).dump(obj)
        else:
            pickle.dump(obj, f)


def make_cifar_python(root: Path, n_per_class: int, py2_bytes_keys: bool = True) -> Path:
    """root/cifar-10-batches-py/ as in the official archive (CHW rows); returns that folder."""
    return write_cifar_python(root, tiny_arrays(n_per_class), py2_bytes_keys)


def write_cifar_python(root: Path, arrays, py2_bytes_keys: bool = True) -> Path:
    """`arrays` (a dict, or a Cifar10 data set, with train/test images NHWC and labels) written as
    root/cifar-10-batches-py/; returns that folder."""
    if not isinstance(arrays, dict):
        arrays = {key: getattr(arrays, key) for key in ("train_images", "train_labels", "test_images", "test_labels")}
    folder = Path(root) / BATCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    train_parts = np.array_split(np.arange(len(arrays["train_labels"])), len(TRAIN_BATCHES))
    batches = {
        "train": dict(zip(TRAIN_BATCHES, train_parts)),
        "test": {TEST_BATCH: np.arange(len(arrays["test_labels"]))},
    }
    for split, names in batches.items():
        rows = arrays[f"{split}_images"].transpose(0, 3, 1, 2).reshape(-1, 3072)
        for name, idx in names.items():
            batch = {
                "batch_label": name,
                "labels": [int(y) for y in arrays[f"{split}_labels"][idx]],
                "data": rows[idx],
                "filenames": [f"{name}_{i}.png" for i in idx],
            }
            dump_pickle(batch, folder / name, py2_bytes_keys)
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": 10000, "num_vis": 3072}
    dump_pickle(meta, folder / META_FILE, py2_bytes_keys)
    return folder


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_tar(root: Path, n_per_class: int) -> tuple[Path, str]:
    """root/cifar-10-python.tar.gz holding only cifar-10-batches-py/; returns (path, md5)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE_NAME
    with tempfile.TemporaryDirectory() as staging:
        folder = make_cifar_python(Path(staging), n_per_class)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=BATCHES_DIR)
    return archive, md5_of(archive)


def logged_rows(run_path, split: str) -> list[dict]:
    """metrics.csv's rows of one split, read as plain CSV (not through the code under test),
    with step an int and loss and accuracy floats."""
    import csv

    with open(Path(run_path) / "metrics.csv", newline="") as fh:
        return [{**r, "step": int(r["step"]), "loss": float(r["loss"]), "accuracy": float(r["accuracy"])}
                for r in csv.DictReader(fh) if r["split"] == split]


def wrap_built_tasks(monkeypatch, wrapper):
    """Make train() see wrapper(task) for every task it builds; returns the undo (a resume in the
    same test may need the plain task)."""
    import cifarlab.train as train_module

    build = train_module.build_task
    monkeypatch.setattr(train_module, "build_task", lambda *a, **k: wrapper(build(*a, **k)))
    return lambda: monkeypatch.setattr(train_module, "build_task", build)


def run_cli(*args) -> subprocess.CompletedProcess:
    """`cifarlab ARGS` through its entry point (`cli.main`) in this process, with its output and
    exit status captured as a fresh process would give them; a fresh process would spend seconds
    importing torch again for every call. Python warnings go to the captured stderr under the
    filters a fresh process has (pytest would otherwise collect them silently)."""
    from cifarlab.cli import main

    out, err = io.StringIO(), io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    argv, sys.argv = sys.argv, ["cifarlab", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # then Python's own defaults for a script
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def calibrated_lite0(seed: int = 0):
    """A random EfficientNet-Lite0 (eval mode) whose BatchNorm statistics are those of one batch
    of CIFAR-like pixels, so that its pool5 features are of order 1. With the default statistics
    (mean 0, variance 1) a random Lite0's features are ~1e-9: any two computations of them agree
    and every loss on them is ln 10, so a test of them could not fail."""
    import torch

    from cifarlab.backbones import EfficientNetLite0

    torch.manual_seed(seed)
    model = EfficientNetLite0()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0  # the running statistics become this batch's
    pixels = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float()
    with torch.no_grad():
        model.train()((pixels - 127) / 128)  # Lite0's input scaling
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def save_lite0_file(model, path: Path) -> Path:
    """`model` as an EfficientNet-PyTorch state dict file, with a 1000-class classifier as the real one."""
    import torch

    torch.save({**model.state_dict(), "_fc.weight": torch.randn(1000, 1280), "_fc.bias": torch.zeros(1000)}, path)
    return path


@contextmanager
def run_locked_by_another_process(path):
    """`path`'s run-folder lock (RunDir.hold_lock) held by another process for the block, as a
    second training of the run would hold it."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
