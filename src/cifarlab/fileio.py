"""Atomic file writes: every file cifarlab writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _naming(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """An OSError about no file or about the temporary one (`tmp`; any file while it is being
    made, tmp None) becomes one about `path`: the file the user knows."""
    try:
        yield
    except OSError as err:
        about_ours = err.filename is None or tmp is None or str(err.filename) == str(tmp)
        if err.errno is None or not about_ours:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


# How torch and safetensors word a write that failed (a full disk, say)
_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed", "IoError", "No space left")


def _temp_prefix(path: Path) -> str:
    """How atomic_path's temporaries of `path` begin: ".tmp-<stem>-", the stem cut short so that
    a long file name's temporary stays within the usual 255-byte limit."""
    return f".tmp-{path.stem[:80]}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real suffix stays last: np.savez and savefig choose their format from it.
    with _naming(path):  # a read-only folder, say
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(path, tmp_path):
            yield tmp_path
            # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file): give the
            # published file the usual permissions
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            _flush_to_disk(tmp_path)
            os.replace(tmp_path, path)  # fails if `path` is a folder, say
            _flush_to_disk(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _flush_to_disk(path: Path) -> None:
    """fsync `path` (a file, or a folder to make a rename in it last): without it a crash soon
    after the rename can leave the new name on an empty file on some file systems. Writers such
    as torch.save and savefig close their files themselves, hence reopening by name. Folders
    cannot be opened on Windows and some file systems refuse fsync on them: a best effort."""
    is_dir = path.is_dir()
    if is_dir and os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY if os.name != "nt" else os.O_RDWR)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:  # a full disk is an error; a file system that cannot fsync (some FUSE, SMB) is not
        if not is_dir and err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike, prefix: str | None = None, older_than: float = 3600,
                       marker: str | None = None) -> None:
    """Remove what a killed writer of `path` left: its temporaries (atomic_path's names, or
    `prefix`*, files or folders) untouched for `older_than` seconds. A live writer keeps its
    temporary's mtime fresh; those of big downloads and caches would otherwise stay for good.
    A folder is removed only if it holds a file named `marker`: a user's own folder whose name
    happens to match is never."""
    path = Path(path)
    pattern = glob.escape(prefix or _temp_prefix(path)) + "*" + ("" if prefix else glob.escape(path.suffix))
    now = time.time()
    for stale in path.parent.glob(pattern):
        try:
            if now - stale.lstat().st_mtime < older_than:
                continue
            if stale.is_dir() and not stale.is_symlink():
                if marker is None or not (stale / marker).is_file():
                    continue
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:  # another user's, or gone meanwhile
            continue


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable (records that may not exist yet)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def why_unwritable(path: str | os.PathLike, err: OSError) -> str:
    """Why `path` could not be written, in the user's terms: a file where a folder must be (which
    mkdir words as "File exists"), the path itself a folder, or the system's own reason."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    if err.errno == errno.EEXIST and path.exists():  # mkdir of a folder whose name a file has
        return "it is a file, not a folder"
    for parent in path.parents:
        if parent.exists():
            return f"{parent} is a file, not a folder" if not parent.is_dir() else (err.strerror or str(err))
    return err.strerror or str(err)


def os_error_line(err: OSError) -> str:
    """An OSError that reached the command line, as one line: the path, why in the user's terms,
    and what to do."""
    if not err.filename:
        return str(err.strerror or err)
    why = why_unwritable(err.filename, err)
    if err.errno == errno.ENOSPC:
        todo = "free some space and run it again"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "give another path, or change its permissions"
    elif "not a folder" in why or why == "it is a folder":
        todo = "move it away, or give another path"
    else:
        todo = "check the path"
    return f"{err.filename}: {why}; {todo}"


@contextlib.contextmanager
def writing_user_path(flag: str, path: str | os.PathLike) -> Iterator[None]:
    """An OSError while writing the path the user gave with `flag` becomes one line that names
    the flag, the path and why."""
    from cifarlab import CifarlabError

    try:
        yield
    except OSError as err:
        raise CifarlabError(f"{flag} {path}: cannot write it: {why_unwritable(path, err)}; give another path") from None


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call writer(tmp_path) (e.g. np.savez, torch.save, fig.savefig) and publish atomically.

    torch and safetensors report a failed write (a full disk, say) as their own errors: those
    become one line naming `path`."""
    with atomic_path(path) as tmp:
        try:
            writer(tmp)
        except Exception as err:
            known = isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"
            if not (known and any(marker in str(err) for marker in _WRITE_FAILURES)):
                raise
            from cifarlab import CifarlabError

            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CifarlabError(f"{path}: could not be written ({first}); check the free space there") from err


def user_cache_root() -> Path:
    """The per-user cache folder ($XDG_CACHE_HOME/cifarlab or ~/.cache/cifarlab), shared by every project."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifarlab"


def cache_root() -> Path:
    """Where cifarlab keeps what it can rebuild or download again (decoded/, weights/):
    $CIFARLAB_CACHE, else the user cache folder."""
    env = os.environ.get("CIFARLAB_CACHE")
    return Path(env).expanduser() if env else user_cache_root()


class NetworkError(OSError):
    """The connection failed (not the disk): no errno, so atomic_path does not pin it on the file."""


@contextlib.contextmanager
def _network(url: str) -> Iterator[None]:
    try:
        yield
    except (OSError, http.client.HTTPException) as err:
        # URLError wraps the socket's error; an HTTPError says its status itself ("HTTP Error 404: ...")
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        raise NetworkError(str(reason) or type(err).__name__) from err


def stream_url(url: str, dest: Path, hash_name: str, desc: str, progress: bool) -> str:
    """Copy `url` to `dest` with a progress bar; return the hex digest (`hash_name`) of what arrived.

    Callers pass a temporary `dest` from atomic_path and check the digest before it is renamed.
    A failed connection raises NetworkError; a failed write, an OSError about `dest`.
    """
    from tqdm import tqdm

    digest = hashlib.new(hash_name)
    with _network(url):
        response = urllib.request.urlopen(url, timeout=60)
    with response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            while True:
                with _network(url):
                    block = response.read(1 << 20)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                got += len(block)
                bar.update(len(block))
    if total is not None and got < total:  # http.client ends a cut-short body as if it were complete
        raise NetworkError(f"the connection closed after {got:,} of {total:,} bytes")
    return digest.hexdigest()
