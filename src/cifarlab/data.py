"""CIFAR-10 from disk to uint8 arrays.

Finds the data in one of three layouts (image folders, the extracted official pickles, the
official archive), downloads the archive when nothing is there, and caches the decoded arrays
outside the data folder so that a second load takes well under a second. Every problem a user
can fix is raised as one-line `DataError` naming the file and what to do.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import http.client
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageMode
from tqdm import tqdm

from cifarlab import CifarlabError
from cifarlab.fileio import (atomic_path, cache_root, os_error_line, remove_stale_temps, stream_url, user_cache_root,
                             write_with)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Names of files tarfile reads: --data naming a missing one is a wrong path, not a folder to make.
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
# An extraction in progress: a folder of this prefix beside the archive, holding the marker file
# (the marker lets a later load remove a killed one's, and only those: never a user's folder)
_EXTRACT_PREFIX, _EXTRACT_MARKER = ".tmp-cifarlab-extract-", ".cifarlab-extracting"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10

CHECKSUM_FOLDERS = "not applicable (image folders)"
CHECKSUM_PICKLES = "not checked (extracted pickles)"

_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
# Bumped whenever the arrays a source decodes to change (e.g. image order), to retire old caches.
_CACHE_FORMAT = 1
# Below this many images a process pool costs more to start than it saves.
_POOL_MIN_IMAGES = 2000
_CHUNK = 500


class DataError(CifarlabError):
    """The data is missing, corrupt or in an unexpected form; the message says what to do."""


@dataclass
class Cifar10:
    """The arrays, plus where they came from (for `describe` and the run records)."""

    train_images: np.ndarray  # uint8, (N, 32, 32, 3), HWC RGB
    train_labels: np.ndarray  # int64, (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    layout: str  # "tar.gz" | "cifar-python" | "image-folder"
    source: Path  # the file or folder it was read from
    checksum: str
    cache: Path | None  # the cache file used or written; None if caching was off or failed
    from_cache: bool
    cache_error: str | None = None  # why the cache could not be written (then `cache` is None)


# --- where things live ------------------------------------------------------------------------


def default_data_dir() -> Path:
    """$CIFARLAB_DATA, else the user cache folder, so the data is shared by every project."""
    env = os.environ.get("CIFARLAB_DATA")
    return Path(env).expanduser() if env else user_cache_root()


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """An explicit --data wins over $CIFARLAB_DATA and the user cache."""
    return Path(data).expanduser() if data else default_data_dir()


def _cache_dir() -> Path:
    """Decoded arrays go outside the data folder, which may be read-only or shared."""
    return cache_root() / "decoded"


def _is_batches_dir(path: Path) -> bool:
    return (path.name == BATCHES_DIR and path.is_dir()) or any(
        (path / name).is_file() for name in (META_FILE, TEST_BATCH, *TRAIN_BATCHES)
    )


def find_layout(root: Path) -> tuple[str, Path] | None:
    """Which layout `root` holds or is, preferring the one that needs the least work to read.

    A file is taken to be the archive, whatever its name: its md5 check then says if it is not
    (for another name, that --data names the wrong file).
    """
    root = Path(root)
    if root.is_file():
        return "tar.gz", root
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "image-folder", root
    if _is_batches_dir(root):
        return "cifar-python", root
    if (root / BATCHES_DIR).is_dir():
        return "cifar-python", root / BATCHES_DIR
    if (root / ARCHIVE_NAME).is_file():
        return "tar.gz", root / ARCHIVE_NAME
    return None


# --- loading ----------------------------------------------------------------------------------


def load_cifar10(
    data: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    cache: bool = True,
    expected_md5: str | None = CIFAR10_MD5,
) -> Cifar10:
    """Load CIFAR-10 from `data` (see resolve_data_dir), downloading it there if absent.

    `expected_md5=None` skips the archive check (for archives you built yourself). An archive's
    cache is keyed on the folder it extracts to, since later loads find and read that folder.
    """
    layout, source, checksum = _locate(resolve_data_dir(data), download, expected_md5, progress)
    if layout == "image-folder":
        folder, tops = source, [source / "train", source / "test"]
        read = functools.partial(_read_image_folders, source, progress)
    else:
        if layout == "tar.gz" and (source.parent / BATCHES_DIR).is_dir():  # what is read is not what was checked
            checksum = (f"{'md5 ok (archive)' if checksum.startswith('md5 ok') else checksum}; read from the "
                        f"{BATCHES_DIR}/ extracted beside it earlier (not checked; delete that folder to extract "
                        "this archive anew)")
        folder = _extract(source) if layout == "tar.gz" else source
        tops, read = [folder], functools.partial(_read_batches, folder)
    if cache:
        # The loader reads train/<class>/<file> of image folders and <folder>/<file> of pickles.
        depth = 2 if layout == "image-folder" else 1
        arrays, cache_file, from_cache, cache_error = _load_cached(folder, tops, depth, read)
    else:
        arrays, cache_file, from_cache, cache_error = read(), None, False, None
    return Cifar10(
        **arrays, layout=layout, source=source, checksum=checksum, cache=cache_file,
        from_cache=from_cache, cache_error=cache_error,
    )


def _locate(
    root: Path, download: bool, expected_md5: str | None, progress: bool
) -> tuple[str, Path, str]:
    """(layout, source, checksum state): an archive is md5-checked; if nothing is there, download."""
    found = find_layout(root)
    _remove_killed_writes(root if root.is_dir() else root.parent)
    if found is None:
        if not root.exists() and (root.name.lower().endswith(_ARCHIVE_SUFFIXES) or root.name == BATCHES_DIR):
            what = ("no such file; --data (or CIFARLAB_DATA) names an archive" if root.name != BATCHES_DIR
                    else f"no such folder; --data (or CIFARLAB_DATA) names a {BATCHES_DIR}/ folder")
            raise DataError(
                f"{root}: {what} that is not there (nothing was downloaded or created): fix the path, "
                f"or point it at a folder to download {ARCHIVE_NAME} into"
            )
        misnamed = _misnamed_split(root)
        if misnamed:
            raise DataError(
                f"{root}: holds {misnamed}/, which is not read as a split (nothing was downloaded into "
                f"it): name the image folders train/ and test/, in lower case"
            )
        inside = _inside_image_folders(root)
        if inside:  # downloading there would mix the archive into the user's image folders
            raise DataError(
                f"{root}: {inside}, so it looks like part of an image-folder layout, not a CIFAR-10 "
                f"folder (nothing was downloaded into it); point --data at the folder that holds "
                f"train/<class>/ and test/<class>/"
            )
        if not download:
            raise DataError(_how_to_provide(root, f"no CIFAR-10 data in {root} and downloading is off"))
        # CIFAR10_URL is read at call time so that tests can point it at a local file.
        archive = download_cifar10(root, url=CIFAR10_URL, expected_md5=expected_md5, progress=progress)
        return "tar.gz", archive, "md5 ok (downloaded)" if expected_md5 else "not checked (no md5 given)"
    layout, source = found
    if layout == "tar.gz":
        return layout, source, _check_archive(source, expected_md5)
    return layout, source, CHECKSUM_FOLDERS if layout == "image-folder" else CHECKSUM_PICKLES


def _remove_killed_writes(folder: Path) -> None:
    """What a killed download or extraction left in the data folder (up to 170 MB), once it has
    been untouched for an hour: on every load, as a later load may never download or extract."""
    remove_stale_temps(folder / ARCHIVE_NAME)
    remove_stale_temps(folder / ARCHIVE_NAME, prefix=_EXTRACT_PREFIX, marker=_EXTRACT_MARKER)


def _misnamed_split(root: Path) -> str | None:
    """A folder in `root` that a user meant as a split but is not named train or test: Train,
    TEST, training... (on a case-sensitive file system; elsewhere train/ finds Train/)."""
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.lower() in ("train", "test", "training", "testing") and entry.is_dir():
                    return entry.name
    except OSError:  # not a folder, or unreadable: the load's own error says so
        return None
    return None


def _inside_image_folders(root: Path) -> str | None:
    """Why `root` looks like a split or class folder of an image-folder layout (None if not): it is
    named train/test, or it or a folder in it holds images."""
    if not root.is_dir():
        return None
    if root.name in ("train", "test"):
        return f"is named {root.name}/"
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                        return f"holds images ({entry.name})"
                    if entry.is_dir() and _image_files(Path(entry.path)):
                        return f"holds folders of images ({entry.name}/)"
                except OSError:  # one unreadable entry (a root-only lost+found, say): look at the rest
                    continue
    except OSError:  # `root` itself unreadable: the load's own error says so
        return None
    return None


def _how_to_provide(root: Path, why: str, url: str = CIFAR10_URL) -> str:
    return (
        f"{why}. Provide CIFAR-10 in one of three ways: put {ARCHIVE_NAME}, an extracted "
        f"{BATCHES_DIR}/ folder, or train/<class>/ + test/<class>/ image folders in {root}, "
        f"or point --data or CIFARLAB_DATA at one of them (the archive is at {url})"
    )


# --- download and archive ---------------------------------------------------------------------


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_archive(archive: Path, expected_md5: str | None) -> str:
    """Refuse a damaged or foreign archive before unpickling anything from it; never delete it.

    A file of another name than the archive's that --data named is read if it is a renamed
    official archive (its md5 matches); any other such file is the wrong one, not the user's to delete.
    """
    if not expected_md5:
        return "not checked (no md5 given)"
    actual = _md5_file(archive)
    if actual == expected_md5.lower():
        return "md5 ok"
    if archive.name != ARCHIVE_NAME:
        raise DataError(
            f"{archive}: --data (or CIFARLAB_DATA) points at a file that is not the CIFAR-10 archive "
            f"{ARCHIVE_NAME}; point it at that archive, at an extracted {BATCHES_DIR}/ folder, at a "
            "folder of train/<class>/ + test/<class>/ images, or at a folder holding one of them"
        )
    raise DataError(
        f"{archive}: md5 is {actual}, expected {expected_md5}; the archive is corrupt or not "
        "the official one (it was left in place): delete it and run again to re-download"
    )


def download_cifar10(
    root: Path,
    *,
    url: str = CIFAR10_URL,
    expected_md5: str | None = CIFAR10_MD5,
    progress: bool = True,
) -> Path:
    """Download the official archive into `root` and return its path (an existing one is kept).

    It streams to a temporary name and is renamed only once complete and md5-checked, so a
    failed download never leaves a file that looks like the archive.
    """
    root = Path(root)
    archive = root / ARCHIVE_NAME
    if archive.exists():
        return archive
    created: list[Path] = []  # the folders this call made, to remove again if it fails
    try:
        try:
            _make_folders(root, created)
        except OSError as err:  # a file where a folder must be, say: the path is wrong, not the network
            raise DataError(f"cannot make the folder to download CIFAR-10 into: {os_error_line(err)}") from None
        _remove_killed_writes(root)
        try:
            with atomic_path(archive) as tmp:
                actual = stream_url(url, tmp, "md5", "download CIFAR-10", progress)
                if expected_md5 and actual != expected_md5.lower():
                    raise DataError(
                        f"the download from {url} has md5 {actual}, expected {expected_md5}; "
                        "it was discarded: run again, or download the archive yourself into " + str(root)
                    )
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise DataError(_how_to_provide(root, f"could not download {url} ({err})", url)) from None
    except BaseException:  # interrupted too: leave no empty folder behind
        for folder in reversed(created):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        raise
    return archive


def _make_folders(folder: Path, created: list[Path]) -> None:
    """mkdir -p `folder`, appending each folder this call itself made to `created`, outermost first
    (one that appears meanwhile, made by someone else, is not added)."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)


def _extract(archive: Path) -> Path:
    """Extract the archive beside itself, once: into a temporary folder, then renamed into place,
    so an interrupted extraction never looks like a complete cifar-10-batches-py/."""
    target = archive.parent / BATCHES_DIR
    if target.is_dir():
        return target
    try:
        staging = Path(tempfile.mkdtemp(prefix=_EXTRACT_PREFIX, dir=archive.parent)).resolve()
    except OSError as err:
        raise DataError(_cannot_extract(archive, err)) from None
    try:
        (staging / _EXTRACT_MARKER).touch()
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _extract_member(tar, member, staging, archive)
        if not (staging / BATCHES_DIR).is_dir():
            raise DataError(
                f"{archive}: has no {BATCHES_DIR}/ folder; it is not the CIFAR-10 python archive"
            )
        try:
            os.replace(staging / BATCHES_DIR, target)
        except OSError:
            if not target.is_dir():  # else a concurrent load extracted it first: use that
                raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(
            f"{archive}: cannot read the archive ({err}); it is truncated or corrupt: "
            "delete it and run again to re-download"
        ) from None
    except OSError as err:
        raise DataError(_cannot_extract(archive, err)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _cannot_extract(archive: Path, err: OSError) -> str:
    if err.errno == errno.ENOSPC:  # CIFAR-10 takes 180 MB extracted
        return (f"{archive}: cannot extract it into {archive.parent}: no space left on the device; free some "
                f"space and run again, or extract it elsewhere and point --data at the {BATCHES_DIR} folder")
    return (
        f"{archive}: cannot extract it into {archive.parent} ({err}); extract it somewhere "
        f"writable and point --data at the {BATCHES_DIR} folder"
    )


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, archive: Path) -> None:
    """Write one regular file or folder; refuse anything that could write outside `staging`
    (an absolute, resolved path)."""
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive}: refusing member {member.name!r}: links and special files are not part of "
            "CIFAR-10; delete the archive and run again to re-download"
        )
    dest = (staging / member.name).resolve()
    if not dest.is_relative_to(staging):
        raise DataError(
            f"{archive}: refusing member {member.name!r}: its path leads outside the folder; "
            "delete the archive and run again to re-download"
        )
    if member.isdir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with tar.extractfile(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        # As tarfile's "data" filter: the member's mode without special or group/other-write bits.
        os.chmod(tmp, (member.mode & 0o755) | 0o600)


# --- the pickle layout ------------------------------------------------------------------------


def _read_pickle(path: Path) -> dict:
    """Unpickle a batch file into a dict with str keys, whether written by Python 2 or 3."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing, so {path.parent} is incomplete: re-extract the archive "
            f"(or delete that folder and run again to extract {ARCHIVE_NAME} anew)"
        )
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except Exception as err:  # a damaged pickle can fail with almost any exception type
        raise DataError(
            f"{path}: cannot unpickle it ({type(err).__name__}: {err}); it is truncated or "
            "corrupt: re-extract the archive"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: holds a {type(raw).__name__}, not a CIFAR-10 batch: re-extract the archive"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _entry(batch: dict, key: str, path: Path):
    try:
        return batch[key]
    except KeyError:
        raise DataError(
            f"{path}: has no {key!r} entry, so it is not a CIFAR-10 batch: re-extract the archive"
        ) from None


def _read_label_names(path: Path) -> tuple[str, ...]:
    names = _entry(_read_pickle(path), "label_names", path)
    try:
        classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    except (TypeError, UnicodeDecodeError) as err:  # not a list, or names that are not text
        raise DataError(
            f"{path}: 'label_names' is not a list of class names ({err}): re-extract the archive"
        ) from None
    if len(classes) != NUM_CLASSES:
        raise DataError(
            f"{path}: lists {len(classes)} classes, CIFAR-10 has {NUM_CLASSES}: re-extract the archive"
        )
    return classes


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch as HWC images and labels; the pickles hold CHW-planar rows of 3072 bytes."""
    batch = _read_pickle(path)
    try:
        data = np.asarray(_entry(batch, "data", path))
        labels = np.asarray(_entry(batch, "labels", path))
    except (TypeError, ValueError) as err:  # ragged lists, say
        raise DataError(f"{path}: 'data' or 'labels' is not an array ({err}): re-extract the archive") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072): "
            "re-extract the archive"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: 'labels' is {labels.dtype} {labels.shape}, expected {len(data)} integers: "
            "re-extract the archive"
        )
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise DataError(f"{path}: label {bad[0]} is outside 0..{NUM_CLASSES - 1}: re-extract the archive")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _read_batches(folder: Path) -> dict:
    classes = _read_label_names(folder / META_FILE)
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / TEST_BATCH)
    return {
        "train_images": np.ascontiguousarray(np.concatenate([images for images, _ in train])),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": np.ascontiguousarray(test_images),
        "test_labels": test_labels,
        "classes": classes,
    }


# --- the image-folder layout ------------------------------------------------------------------


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """PNG/JPEG files in name order; hidden ones (e.g. macOS "._x.png" shadows) are not images."""
    with os.scandir(folder) as entries:
        return sorted(
            e.path
            for e in entries
            if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".") and e.is_file()
        )


def _list_split(split_dir: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Image files of one split, classes interleaved round-robin (1st of each class, 2nd of each...).

    Interleaving makes any contiguous slice class-balanced, as in the official batches, so that
    holdout_split's last-fraction validation set holds every class, not just the last two.
    """
    paths, labels, ranks = [], [], []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if not files:
            raise DataError(
                f"{split_dir / name}: holds no PNG or JPEG images (hidden files are skipped); every "
                "class needs images in both train/ and test/: put this class's images there"
            )
        paths += files
        labels += [label] * len(files)
        ranks += range(len(files))
    order = np.lexsort((labels, ranks))
    return [paths[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def _deeper_than_8_bits(im: Image.Image) -> str | None:
    """What an image's pixels are if not 8 bits per channel ("16-bit", ...), else None.

    Pillow opens 16-bit grayscale as mode I;16 and 32-bit or float images as I or F, which
    convert("RGB") clips to 0..255 (a 16-bit image turns white); 16-bit colour PNGs it opens as RGB(A)
    but reads with a ";16" raw mode. Grayscale, palette and alpha images of 8 bits (or fewer) are fine.
    """
    kind = ImageMode.getmode(im.mode).typestr[1:]  # "u1", "b1" (mode 1), "u2", "i4", "f4"
    if kind in ("u1", "b1"):
        # A tile is (codec, extents, offset, args): a named tuple from Pillow 11, a plain one before.
        args = im.tile[0][3] if im.tile else None
        rawmode = args if isinstance(args, str) else args[0] if args and isinstance(args[0], str) else ""
        return "16-bit-per-channel" if ";16" in rawmode else None
    what = {"f": "floating-point", "i": "integer"}.get(kind[0], "")
    return f"{int(kind[1:]) * 8}-bit {what}".strip()


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            size = im.size  # from the header: a huge image is refused before it is decoded
            deep = _deeper_than_8_bits(im)
            if deep is None and size == IMAGE_SHAPE[1::-1]:
                if im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")  # P -> RGB directly warns (without the file's name)
                pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as err:  # Pillow raises many exception types for damaged files
        raise DataError(f"{path}: cannot decode the image ({err}): replace or remove it") from None
    if deep is not None:
        raise DataError(
            f"{path}: image has {deep} pixels (Pillow mode {im.mode}), cifarlab reads 8 bits per "
            "channel only: convert it to 8-bit RGB or remove it"
        )
    if size != IMAGE_SHAPE[1::-1]:
        width, height = size
        raise DataError(
            f"{path}: image is {width}x{height}, CIFAR-10 images are 32x32: resize or remove it"
        )
    return pixels


def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Decode a run of files in one worker, returning one array to keep inter-process traffic low."""
    out = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
    for i, path in enumerate(paths):
        out[i] = _decode(path)
    return out


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """fork on Linux, as torch's DataLoader does: spawn would re-run a calling script that lacks an
    `if __name__ == "__main__"` guard. Elsewhere fork is unsafe, so spawn."""
    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_ignore_ctrl_c)


def _ignore_ctrl_c() -> None:
    """In a decode worker: Ctrl-C reaches every process of the terminal's group; the caller alone
    handles it (and cancels the work), else workers dying mid-task can leave the pool hanging."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _usable_cpus() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on macOS or Windows
        return os.cpu_count() or 1


def _decode_all(paths: list[str], desc: str, progress: bool) -> np.ndarray:
    """Decode with a process pool: Pillow parses headers in Python, so threads would hold the GIL."""
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(_usable_cpus(), len(chunks))
    use_pool = len(paths) >= _POOL_MIN_IMAGES and workers > 1
    pool = _process_pool(workers) if use_pool else None
    out = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
    start = 0
    try:
        # Submit (and so fork the workers) before tqdm starts its monitor thread.
        blocks = pool.map(_decode_chunk, chunks) if pool else map(_decode_chunk, chunks)
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            for block in blocks:
                out[start : start + len(block)] = block
                start += len(block)
                bar.update(len(block))
    except BaseException:
        if pool is not None:  # Ctrl-C or an error: stop the workers, whatever state the pool is in
            for worker in list((getattr(pool, "_processes", None) or {}).values()):
                worker.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown()
    return out


def _read_image_folders(root: Path, progress: bool) -> dict:
    """root/{train,test}/<class>/*.png|jpg; classes are the sorted folder names of train/."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root}: no {split}/ folder; the image-folder layout needs train/<class>/ and "
                "test/<class>/ folders of images"
            )
    classes = _class_folders(root / "train")
    if len(classes) != NUM_CLASSES:
        raise DataError(
            f"{root / 'train'}: has {len(classes)} class folders ({', '.join(classes)}), "
            f"CIFAR-10 needs {NUM_CLASSES}: one folder per class"
        )
    if _class_folders(root / "test") != classes:
        raise DataError(
            f"{root / 'test'}: its class folders ({', '.join(_class_folders(root / 'test'))}) "
            f"differ from those in train/ ({', '.join(classes)}): give both splits the same classes"
        )
    arrays: dict = {"classes": tuple(classes)}
    for split in ("train", "test"):
        paths, labels = _list_split(root / split, classes)
        arrays[f"{split}_images"] = _decode_all(paths, f"decode {split}", progress)
        arrays[f"{split}_labels"] = labels
    return arrays


# --- the decoded-array cache ------------------------------------------------------------------


def _file_stats(top: Path, depth: int) -> list[str]:
    """Path (below top's parent), size and mtime_ns of every file, and the path of every folder,
    under `top` down to `depth` levels (files in top are level 1).

    Symlinked folders and files are followed, as the loader follows them (a class folder may be a
    link): the stats are those of the files it reads. `depth` is as deep as the loader reads, which
    also keeps a link to a folder above from looping. os.scandir and string slicing, not
    rglob/relpath: this runs on every load, over 60k files.
    """
    label, skip = top.name, len(os.fspath(top)) + 1
    stats, pending = [], [(os.fspath(top), 1)]
    while pending:
        folder, level = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    if level < depth:
                        stats.append(f"{label}/{entry.path[skip:]}/")
                        pending.append((entry.path, level + 1))
                elif entry.is_file():
                    # ctime and inode too: a copy that keeps size and mtime (cp -p, rsync -a)
                    # still changes the ctime (nobody can set it back), a new file's inode too
                    st = entry.stat()
                    stats.append(f"{label}/{entry.path[skip:]}\0{st.st_size}\0{st.st_mtime_ns}"
                                 f"\0{st.st_ctime_ns}\0{st.st_dev}:{st.st_ino}")
    return stats


def _cache_file(folder: Path, tops: list[Path], depth: int) -> Path:
    """Name the cache by source path and fingerprint, so any change to the source misses it."""
    stats = sorted(line for top in tops if top.is_dir() for line in _file_stats(top.absolute(), depth))
    # os.fsencode: a file name that is not UTF-8 comes back from the OS as surrogate escapes
    fingerprint = hashlib.sha256(os.fsencode("\n".join([f"format {_CACHE_FORMAT}", *stats]))).hexdigest()
    where = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()
    return _cache_dir() / f"cifar10-{where[:16]}-{fingerprint[:16]}.npz"


def _map_npz(path: Path) -> dict[str, np.ndarray]:
    """Map each array of an uncompressed .npz straight from the file (copy-on-write).

    np.load would copy and CRC-check 180 MB; mapping makes a cache hit cost little more than the
    fingerprint, and pages are read when first used.
    """
    arrays = {}
    with zipfile.ZipFile(path) as npz, open(path, "rb") as f:
        for info in npz.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{info.filename} is compressed")
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<26xHH", f.read(30))  # the member's local header
            f.seek(info.header_offset + 30 + name_len + extra_len)
            npy = np.lib.format
            version = npy.read_magic(f)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{info.filename} holds Python objects")
            mapped = np.memmap(path, dtype, "c", f.tell(), shape, "F" if fortran else "C")
            arrays[info.filename.removesuffix(".npy")] = np.asarray(mapped)
    return arrays


def _read_cache(path: Path) -> dict | None:
    """The cached arrays, or None if the file is absent or unusable (it is then rebuilt)."""
    try:
        mapped = _map_npz(path)
        arrays = {key: mapped[key] for key in _ARRAY_KEYS}
        arrays["classes"] = tuple(str(c) for c in mapped["classes"])
    except Exception:  # missing, truncated, not a zip, missing keys: all mean "rebuild"
        return None
    shapes_ok = all(
        arrays[f"{s}_images"].dtype == np.uint8
        and arrays[f"{s}_images"].shape[1:] == IMAGE_SHAPE
        and arrays[f"{s}_labels"].dtype == np.int64
        and arrays[f"{s}_labels"].shape == arrays[f"{s}_images"].shape[:1]
        for s in ("train", "test")
    )
    return arrays if shapes_ok and len(arrays["classes"]) == NUM_CLASSES else None


def _write_cache(path: Path, arrays: dict) -> str | None:
    """Write the cache (uncompressed: loading must be fast) and drop older ones of the same source.

    Returns None, or why it could not be written, after printing that as one warning line
    (the load goes on without a cache).
    """
    source_prefix = path.name.rsplit("-", 1)[0]
    remove_stale_temps(path, prefix=f".tmp-{source_prefix}-")
    try:
        write_with(path, lambda tmp: np.savez(tmp, **{**arrays, "classes": np.array(arrays["classes"])}))
    except OSError as err:
        reason = err.strerror or str(err)
        if err.filename and os.fspath(err.filename) != os.fspath(path.parent):
            reason = f"{reason}: {os.fspath(err.filename)}"
        why = f"cannot write the decoded cache at {path.parent} ({reason})"
        print(f"warning: {why}; decoding every time", file=sys.stderr)
        return why
    for old in path.parent.glob(f"{source_prefix}-*.npz"):
        if old != path:
            try:
                old.unlink(missing_ok=True)
            except OSError:  # another user's, in a shared cache folder: only a stale file left
                pass
    return None


def _load_cached(
    folder: Path, tops: list[Path], depth: int, read: Callable[[], dict]
) -> tuple[dict, Path | None, bool, str | None]:
    """(arrays, cache file or None if it could not be written, whether they came from it, why it
    could not be written or None)."""
    path = _cache_file(folder, tops, depth)
    arrays = _read_cache(path)
    if arrays is not None:
        return arrays, path, True, None
    arrays = read()
    error = _write_cache(path, arrays)
    return arrays, (None if error else path), False, error


# --- reporting and simple transforms ----------------------------------------------------------


def describe(ds: Cifar10) -> str:
    """What `cifarlab data` prints: where the data came from and how much of each class."""
    if ds.cache is None:
        cache = f"could not be written: {ds.cache_error}; decoded every time" if ds.cache_error else "off"
    else:
        cache = f"{ds.cache} ({'hit' if ds.from_cache else 'miss: decoded and written'})"
    train = np.bincount(ds.train_labels, minlength=len(ds.classes))
    test = np.bincount(ds.test_labels, minlength=len(ds.classes))
    width = max(len("class"), *(len(c) for c in ds.classes))
    lines = [
        f"layout:   {ds.layout}",
        f"source:   {ds.source}",
        f"checksum: {ds.checksum}",
        f"cache:    {cache}",
        f"images:   {len(ds.train_labels)} train, {len(ds.test_labels)} test",
        f"{'class':<{width}}  {'train':>6}  {'test':>6}",
        *(f"{name:<{width}}  {train[i]:>6}  {test[i]:>6}" for i, name in enumerate(ds.classes)),
    ]
    return "\n".join(lines)


def data_digest(data: Cifar10) -> str:
    """A short fingerprint of the images themselves (labels and a spread sample of pixels), the
    same wherever the data lies: a run resumed on other images is refused by it."""
    h = hashlib.sha256()
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(images[:: max(1, len(images) // 64)]).tobytes())
    return h.hexdigest()[:16]


def holdout_split(
    images: np.ndarray, labels: np.ndarray, fraction: float
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, validation): the last `fraction` of the samples, in order, as the Siamese study does."""
    if not 0 <= fraction < 1:
        raise DataError(f"the validation fraction must be at least 0 and below 1, got {fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    cut = len(labels) - int(round(len(labels) * fraction))
    if fraction > 0 and not 0 < cut < len(labels):
        raise DataError(f"a validation fraction of {fraction:g} of {len(labels)} training images leaves "
                        f"{cut} to train on and {len(labels) - cut} to validate on; choose a fraction that leaves both")
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def mean_image(train_images: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the training images (float32, HWC), for mean subtraction."""
    return train_images.mean(axis=0, dtype=np.float64).astype(np.float32)
