"""cifarlab.data: the three layouts, archive safety, download, the cache, bad input, helpers."""

from __future__ import annotations

import contextlib
import http.client
import io
import struct
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import zlib

from pathlib import Path

import numpy as np
import pytest
from conftest import dump_pickle, make_cifar_python, make_image_folders, make_tar, md5_of, run_cli, tiny_arrays
from PIL import Image

from cifarlab import fileio
from cifarlab import CifarlabError, data
from cifarlab.data import (
    ARCHIVE_NAME,
    BATCHES_DIR,
    CLASSES,
    DataError,
    describe,
    download_cifar10,
    find_layout,
    holdout_split,
    load_cifar10,
    mean_image,
    resolve_data_dir,
)

N = 3  # images per class and split: 30 train, 30 test


def load(root, **kwargs):
    return load_cifar10(root, progress=False, download=False, **kwargs)


def assert_arrays(ds, expected):
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        actual = getattr(ds, key)
        assert actual.dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual, expected[key], err_msg=key)
    assert ds.classes == CLASSES


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


# --- layouts ----------------------------------------------------------------------------------


def test_png_image_folders_load_losslessly(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    ds = load(root)
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source, ds.checksum) == ("image-folder", root, data.CHECKSUM_FOLDERS)


@pytest.mark.parametrize("py2_bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_pickles_load_with_bytes_or_str_keys(tmp_path, py2_bytes_keys):
    folder = make_cifar_python(tmp_path / "data", N, py2_bytes_keys=py2_bytes_keys)
    with open(folder / "data_batch_1", "rb") as f:
        assert isinstance(next(iter(pickle.load(f, encoding="bytes"))), bytes) == py2_bytes_keys
    ds = load(tmp_path / "data")
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source, ds.checksum) == ("cifar-python", folder, data.CHECKSUM_PICKLES)


def test_archive_with_matching_md5_is_extracted_and_loaded(tmp_path):
    root = tmp_path / "data"
    archive, md5 = make_tar(root, N)
    ds = load(root, expected_md5=md5)
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source, ds.checksum) == ("tar.gz", archive, "md5 ok")
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE_NAME, BATCHES_DIR])
    # Next time the extracted folder is read, from the cache written by the first load.
    again = load(root, expected_md5=md5)
    assert (again.layout, again.from_cache, again.cache) == ("cifar-python", True, ds.cache)


def test_an_archive_named_by_data_whose_pickles_were_extracted_before_says_they_were_read(tmp_path):
    """--data names the archive, but the pickles extracted beside it earlier are what is read:
    the archive's md5 vouches for the archive, not for them (they may have been changed since)."""
    archive, md5 = make_tar(tmp_path / "data", N)
    assert load(archive, expected_md5=md5).checksum == "md5 ok"  # extracts it
    again = load(archive, expected_md5=md5)
    assert (again.layout, again.source) == ("tar.gz", archive)
    assert again.checksum == (f"md5 ok (archive); read from the {BATCHES_DIR}/ extracted beside it earlier (not checked; "
                              "delete that folder to extract this archive anew)")
    # an archive of one's own (no md5) replaced since: its earlier extraction is what is read, and said
    other, _ = make_tar(tmp_path / "other", N // 2)
    os.replace(other, archive)
    unchecked = load(archive, expected_md5=None)
    assert len(unchecked.train_labels) == len(again.train_labels)
    assert unchecked.checksum.startswith(f"not checked (no md5 given); read from the {BATCHES_DIR}/ extracted beside")


def test_jpeg_image_folders_load(tmp_path):
    root = make_image_folders(tmp_path / "data", N, fmt="jpg")
    ds = load(root)
    expected = tiny_arrays(N)
    np.testing.assert_array_equal(ds.train_labels, expected["train_labels"])
    assert ds.train_images.shape == expected["train_images"].shape
    with Image.open(root / "train" / CLASSES[1] / "0000.jpg") as im:
        np.testing.assert_array_equal(ds.train_images[1], np.asarray(im))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_8_bit_grayscale_palette_and_alpha_images_are_converted_to_rgb(tmp_path, mode):
    root = make_image_folders(tmp_path / "data", N)
    culprit = root / "train" / CLASSES[2] / "0001.png"
    Image.fromarray(tiny_arrays(N)["train_images"][12]).convert(mode).save(culprit)
    with Image.open(culprit) as im:
        assert im.mode == mode
        expected = np.asarray(im.convert("RGB"))
    ds = load(root)
    np.testing.assert_array_equal(ds.train_images[12], expected)


def test_a_palette_image_with_transparency_loads_without_a_warning(tmp_path):
    import warnings

    root = make_image_folders(tmp_path / "data", N)
    culprit = root / "train" / CLASSES[2] / "0001.png"
    palette = Image.fromarray(tiny_arrays(N)["train_images"][12]).convert("P")
    palette.save(culprit, transparency=bytes([0, 128] + [255] * 254))  # byte transparency, as pngquant writes
    with Image.open(culprit) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert im.mode == "P" and isinstance(im.info.get("transparency"), bytes)
        expected = np.asarray(im.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning would not say which file it is about
        ds = load(root, cache=False)
    np.testing.assert_array_equal(ds.train_images[12], expected)


@pytest.mark.parametrize("kind", ["image-folder", "cifar-python", "tar.gz"])
def test_data_may_point_at_the_layout_itself(tmp_path, kind):
    if kind == "image-folder":
        target = make_image_folders(tmp_path / "folders", N)
    elif kind == "cifar-python":
        target = make_cifar_python(tmp_path / "somewhere", N)
    else:
        target, _ = make_tar(tmp_path / "somewhere", N)
    assert find_layout(target) == (kind, target)
    ds = load(target, expected_md5=None)
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source) == (kind, target)


def test_layout_preference_folders_then_pickles_then_archive(tmp_path):
    root = tmp_path / "data"
    assert find_layout(root) is None
    make_tar(root, 1)
    assert find_layout(root) == ("tar.gz", root / ARCHIVE_NAME)
    make_cifar_python(root, 1)
    assert find_layout(root) == ("cifar-python", root / BATCHES_DIR)
    make_image_folders(root, 1)
    assert find_layout(root) == ("image-folder", root)


def test_image_folder_order_keeps_every_class_in_the_holdout_tail(tmp_path):
    ds = load(make_image_folders(tmp_path / "data", 5))
    _, (_, val_labels) = holdout_split(ds.train_images, ds.train_labels, 0.2)
    assert sorted(val_labels) == list(range(10))


def test_process_pool_decoding_matches_and_reports_bad_files(tmp_path, monkeypatch):
    pools = []
    make_pool = data._process_pool
    monkeypatch.setattr(data, "_process_pool", lambda n: pools.append(n) or make_pool(n))
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(data, "_POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(data, "_CHUNK", 7)
    root = make_image_folders(tmp_path / "data", N)
    assert_arrays(load(root, cache=False), tiny_arrays(N))
    assert pools == [2, 2]  # one pool per split
    bad = root / "train" / "dog" / "0002.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        load(root, cache=False)


# --- archive safety ---------------------------------------------------------------------------


def test_archive_with_wrong_md5_is_refused_and_kept(tmp_path):
    root = tmp_path / "data"
    archive, md5 = make_tar(root, N)
    with pytest.raises(DataError, match="md5") as err:
        load(root, expected_md5="0" * 32)
    assert str(archive) in str(err.value) and "delete it" in str(err.value)
    assert md5_of(archive) == md5
    assert files_under(root) == [archive.relative_to(root)]


def test_data_pointing_at_another_file_says_so_and_keeps_it(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    content = photo.read_bytes()
    with pytest.raises(DataError) as err:
        load(photo)
    message = str(err.value)
    assert message.startswith(f"{photo}: ") and "\n" not in message
    assert "--data" in message and "not the CIFAR-10 archive" in message and BATCHES_DIR in message
    assert "download" not in message and "delete" not in message and "corrupt" not in message
    assert photo.read_bytes() == content and sorted(tmp_path.iterdir()) == [photo]


def test_renamed_official_archive_is_read(tmp_path):
    archive, md5 = make_tar(tmp_path / "data", N)
    renamed = archive.rename(tmp_path / "data" / "cifar10.tgz")
    ds = load(renamed, expected_md5=md5)
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source, ds.checksum) == ("tar.gz", renamed, "md5 ok")


def _unsafe_member(kind, tmp_path):
    """A tar member that would write outside the extraction folder or is not a plain file."""
    info = tarfile.TarInfo(f"{BATCHES_DIR}/evil")
    if kind == "dotdot":
        info.name, info.size = f"{BATCHES_DIR}/../../../evil", 4
    elif kind == "absolute":
        info.name, info.size = str(tmp_path / "evil"), 4
    elif kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil")
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, f"{BATCHES_DIR}/readme.txt"
    else:
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_archive_members_are_refused(tmp_path, kind):
    root = tmp_path / "data"
    root.mkdir()
    archive = root / ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        readme = tarfile.TarInfo(f"{BATCHES_DIR}/readme.txt")
        readme.size = 2
        tar.addfile(readme, io.BytesIO(b"hi"))
        evil = _unsafe_member(kind, tmp_path)
        tar.addfile(evil, io.BytesIO(b"evil") if evil.isfile() else None)
    with pytest.raises(DataError, match="refusing") as err:
        load(root, expected_md5=None)
    assert str(archive) in str(err.value)
    assert files_under(tmp_path) == [root.relative_to(tmp_path), archive.relative_to(tmp_path)]


def test_extraction_finished_first_by_a_concurrent_load_is_used(tmp_path, monkeypatch):
    root = tmp_path / "data"
    archive, md5 = make_tar(root, N)
    extract_member = data._extract_member

    def racing(*args):
        if not (root / BATCHES_DIR).exists():
            make_cifar_python(root, N)  # the other load publishes its folder meanwhile
        extract_member(*args)

    monkeypatch.setattr(data, "_extract_member", racing)
    assert_arrays(load(root, expected_md5=md5), tiny_arrays(N))
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE_NAME, BATCHES_DIR])


def test_truncated_archive_leaves_no_partial_folder(tmp_path):
    root = tmp_path / "data"
    archive, _ = make_tar(root, N)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load(root, expected_md5=None)
    assert str(archive) in str(err.value)
    assert files_under(root) == [archive.relative_to(root)]


def test_archive_without_the_batches_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / ARCHIVE_NAME, "w:gz") as tar:
        tar.add(make_image_folders(tmp_path / "other", 1) / "train", arcname="train")
    with pytest.raises(DataError, match=f"no {BATCHES_DIR}"):
        load(root, expected_md5=None)
    assert [p.name for p in root.iterdir()] == [ARCHIVE_NAME]


# --- download ---------------------------------------------------------------------------------


def test_download_from_a_local_url(tmp_path, monkeypatch):
    served, md5 = make_tar(tmp_path / "server", N)
    monkeypatch.setattr(data, "CIFAR10_URL", served.as_uri())
    root = tmp_path / "data"
    ds = load_cifar10(root, progress=False, expected_md5=md5)
    assert_arrays(ds, tiny_arrays(N))
    assert (ds.layout, ds.source, ds.checksum) == ("tar.gz", root / ARCHIVE_NAME, "md5 ok (downloaded)")
    assert md5_of(root / ARCHIVE_NAME) == md5
    assert sorted(p.name for p in root.iterdir()) == sorted([ARCHIVE_NAME, BATCHES_DIR])


class _DyingResponse(io.BytesIO):
    """A response that delivers some bytes and then fails, like a dropped connection."""

    headers = {"Content-Length": "1000000"}

    def __init__(self, error):
        super().__init__(b"x" * 5000)
        self.error = error

    def read(self, size=-1):
        if self.tell() >= 5000:
            raise self.error
        return super().read(min(size, 1000))


@pytest.mark.parametrize(
    "error", [ConnectionResetError("reset by peer"), http.client.IncompleteRead(b""), KeyboardInterrupt()]
)
def test_interrupted_download_leaves_no_archive(tmp_path, monkeypatch, error):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", lambda url, timeout: _DyingResponse(error))
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else DataError):
        download_cifar10(root, progress=False)
    assert files_under(root) == []


def test_a_dropped_connection_is_blamed_on_the_network_not_on_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen",
                        lambda url, timeout: _DyingResponse(ConnectionResetError(104, "Connection reset by peer")))
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        download_cifar10(root, progress=False)
    assert "Connection reset by peer" in str(err.value)
    assert str(root / ARCHIVE_NAME) not in str(err.value)  # the file it never wrote is not the culprit


def test_a_killed_downloads_stale_temporary_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    served, md5 = make_tar(tmp_path / "server", N)
    monkeypatch.setattr(data, "CIFAR10_URL", served.as_uri())
    root = tmp_path / "data"
    root.mkdir()
    stale, live = root / ".tmp-cifar-10-python.tar-dead1234.gz", root / ".tmp-cifar-10-python.tar-live5678.gz"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y" * 1000)
    two_hours_ago = os.stat(stale).st_mtime - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    load_cifar10(root, progress=False, expected_md5=md5)
    assert not stale.exists() and live.exists()


class _ShortResponse(io.BytesIO):
    """A response whose body ends early without an error, as http.client reports a server that
    closed the connection before the Content-Length it announced."""

    headers = {"Content-Length": "1000000"}


def test_a_download_cut_short_is_not_published_even_without_an_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", lambda url, timeout: _ShortResponse(b"x" * 5000))
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        download_cifar10(root, expected_md5=None, progress=False)
    assert "the connection closed after 5,000 of 1,000,000 bytes" in str(err.value)
    assert files_under(root) == []


def test_what_killed_writes_left_is_removed_by_a_later_load_and_a_users_folder_never(tmp_path):
    """A load that neither downloads nor extracts (the archive is there, extracted) still clears a
    killed download's or extraction's leftovers, once an hour old; a folder of a like name that
    is not an extraction of cifarlab's (no marker in it) stays, whatever its age."""
    archive, md5 = make_tar(tmp_path / "data", N)
    root = archive.parent
    load(root, expected_md5=md5)  # extracts it
    download = root / ".tmp-cifar-10-python.tar-dead1234.gz"
    extraction = root / ".tmp-cifarlab-extract-dead5678"
    (extraction / BATCHES_DIR).mkdir(parents=True)
    (extraction / ".cifarlab-extracting").touch()
    users = root / ".tmp-cifarlab-extract-notes"
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    download.write_bytes(b"x" * 1000)
    for path in (download, extraction, users):
        os.utime(path, (os.stat(path).st_mtime - 7200,) * 2)
    fresh = root / ".tmp-cifar-10-python.tar-live0000.gz"
    fresh.write_bytes(b"y")
    assert load(root, expected_md5=md5).layout == "cifar-python"
    assert not download.exists() and not extraction.exists() and fresh.exists()
    assert (users / "thesis.tex").read_text() == "mine"


def test_capitalised_split_folders_are_refused_not_passed_over_for_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    root = make_image_folders(tmp_path / "data", 2)
    for split in ("train", "test"):
        (root / split).rename(root / split.capitalize())
    if (root / "train").is_dir():
        pytest.skip("a case-insensitive file system finds Train/ as train/")
    before = files_under(tmp_path)
    with pytest.raises(DataError) as err:
        load_cifar10(root, progress=False)
    message = str(err.value)
    assert re.fullmatch(rf"{re.escape(str(root))}: holds (Train|Test)/, which is not read as a split \(nothing was "
                        r"downloaded into it\): name the image folders train/ and test/, in lower case", message)
    assert files_under(tmp_path) == before


def test_a_path_that_cannot_be_a_folder_is_said_to_be_wrong_not_blamed_on_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "notes" / "cifar", progress=False)
    assert str(err.value) == (f"cannot make the folder to download CIFAR-10 into: {tmp_path / 'notes' / 'cifar'}: "
                              f"{tmp_path / 'notes'} is a file, not a folder; move it away, or give another path")
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nothere" / BATCHES_DIR, progress=False)
    assert str(err.value).startswith(f"{tmp_path / 'nothere' / BATCHES_DIR}: no such folder; --data (or CIFARLAB_DATA) "
                                     f"names a {BATCHES_DIR}/ folder that is not there (nothing was downloaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_full_disk_while_extracting_says_to_free_space():
    import errno

    line = data._cannot_extract(Path("d") / ARCHIVE_NAME, OSError(errno.ENOSPC, "No space left on device", "d/x"))
    assert line == (f"{Path('d') / ARCHIVE_NAME}: cannot extract it into d: no space left on the device; free some space "
                    f"and run again, or extract it elsewhere and point --data at the {BATCHES_DIR} folder")


@pytest.mark.parametrize("where", ["split", "class", "named-train", "renamed-split"])
def test_data_at_a_split_or_class_folder_is_refused_and_nothing_downloaded(tmp_path, monkeypatch, where):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    root = make_image_folders(tmp_path / "data", 2)
    if where == "renamed-split":  # a split folder by its content, whatever its name
        (root / "test").rename(root / "testing")
    target = {"split": root / "test", "class": root / "test" / "cat", "named-train": tmp_path / "train",
              "renamed-split": root / "testing"}[where]
    target.mkdir(exist_ok=True)
    before = files_under(tmp_path)
    with pytest.raises(DataError) as err:
        load_cifar10(target, progress=False)
    message = str(err.value)
    assert message.startswith(f"{target}: ") and "image-folder layout" in message and "\n" not in message
    assert "train/<class>/ and test/<class>/" in message
    assert files_under(tmp_path) == before


def test_an_unreadable_folder_beside_class_folders_does_not_hide_them_from_the_guard(tmp_path, monkeypatch):
    """A root-only lost+found in a split folder: as root chmod denies nothing, so scandir is made to."""
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    root = make_image_folders(tmp_path / "data", 2)
    target = (root / "test").rename(root / "testing")  # a split folder by its content, not its name
    (target / "lost+found").mkdir()
    before = files_under(tmp_path)
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "lost+found":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        with real_scandir(path) as entries:  # the unreadable folder first, before any class folder
            return contextlib.nullcontext(sorted(entries, key=lambda e: e.name != "lost+found"))

    with monkeypatch.context() as patch, pytest.raises(DataError) as err:
        patch.setattr(os, "scandir", scandir)
        load_cifar10(target, progress=False)
    message = str(err.value)
    assert message.startswith(f"{target}: holds folders of images (") and "image-folder layout" in message
    assert "lost+found" not in message and "\n" not in message
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("failure", ["offline", "interrupted", "wrong-md5"])
def test_failed_download_removes_only_the_folders_it_made(tmp_path, monkeypatch, failure):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    if failure == "offline":
        monkeypatch.setattr(fileio.urllib.request, "urlopen", offline)
    elif failure == "interrupted":
        monkeypatch.setattr(fileio.urllib.request, "urlopen", lambda url, timeout: _DyingResponse(KeyboardInterrupt()))
    else:
        served, _ = make_tar(tmp_path / "server", N)
        monkeypatch.setattr(data, "CIFAR10_URL", served.as_uri())
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    error = KeyboardInterrupt if failure == "interrupted" else DataError
    for root in (tmp_path / "new" / "deeper" / "data", tmp_path / "kept" / "data", tmp_path / "empty"):
        with pytest.raises(error):
            load_cifar10(root, progress=False, expected_md5="0" * 32)
    assert not (tmp_path / "new").exists()
    assert files_under(tmp_path / "kept") == [Path("notes.txt")]
    assert (tmp_path / "empty").is_dir() and files_under(tmp_path / "empty") == []


@pytest.mark.parametrize("name", [ARCHIVE_NAME, "mine.tgz", "cifar.TAR"])
def test_data_naming_a_missing_archive_is_refused_and_nothing_created(tmp_path, monkeypatch, name):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    root = tmp_path / "dl" / name
    with pytest.raises(DataError) as err:
        load_cifar10(root, progress=False)
    message = str(err.value)
    assert message.startswith(f"{root}: no such file; ") and "\n" not in message
    assert "fix the path, or point it at a folder" in message
    assert files_under(tmp_path) == []


def test_download_keeps_an_archive_already_there(tmp_path, monkeypatch):
    archive, md5 = make_tar(tmp_path / "data", N)
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    assert download_cifar10(tmp_path / "data", progress=False) == archive
    assert md5_of(archive) == md5


def test_download_with_wrong_md5_is_discarded(tmp_path):
    served, _ = make_tar(tmp_path / "server", N)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        download_cifar10(root, url=served.as_uri(), expected_md5="0" * 32, progress=False)
    assert files_under(root) == []


def _assert_names_three_ways(message, root):
    assert "\n" not in message
    ways = (ARCHIVE_NAME, BATCHES_DIR, "train/<class>/", "test/<class>/", "--data", "CIFARLAB_DATA")
    for part in (*ways, str(root)):
        assert part in message


def test_offline_error_names_the_three_ways(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fileio.urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_cifar10(root, progress=False)
    _assert_names_three_ways(str(err.value), root)
    assert data.CIFAR10_URL in str(err.value) and "name resolution" in str(err.value)
    assert files_under(root) == []


def test_no_data_and_no_download_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download attempt would fail loudly
    with pytest.raises(DataError) as err:
        load(tmp_path / "empty")
    _assert_names_three_ways(str(err.value), tmp_path / "empty")


# --- cache ------------------------------------------------------------------------------------


def test_second_load_comes_from_the_cache_outside_the_data_dir(tmp_path, isolated_cache):
    root = make_image_folders(tmp_path / "data", N)
    before = files_under(root)
    first, second = load(root), load(root)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.cache == second.cache and first.cache.parent == isolated_cache / "decoded"  # beside weights/
    assert_arrays(second, tiny_arrays(N))
    assert files_under(root) == before


def test_cached_arrays_are_writable_without_touching_the_cache(tmp_path):
    root = make_cifar_python(tmp_path / "data", N)
    load(root)
    hit = load(root)
    assert hit.from_cache
    hit.train_images[:] = 0  # e.g. in-place preprocessing
    assert_arrays(load(root), tiny_arrays(N))


def test_unwritable_cache_warns_in_one_line_and_still_loads(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CIFARLAB_CACHE", str(blocker))
    ds = load(make_image_folders(tmp_path / "data", N))
    assert (ds.cache, ds.from_cache) == (None, False)
    assert_arrays(ds, tiny_arrays(N))
    err = capsys.readouterr().err
    assert err == f"warning: cannot write the decoded cache at {blocker / 'decoded'} (Not a directory); decoding every time\n"
    assert "cache:    could not be written: cannot write the decoded cache at" in describe(ds)
    assert blocker.read_text() == "not a folder"


def test_cli_data_with_an_unwritable_cache_warns_in_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CIFARLAB_CACHE", str(blocker))
    result = run_cli("data", "--data", make_cifar_python(tmp_path / "data", N), "--no-download")
    assert result.returncode == 0
    assert result.stderr.startswith("warning: cannot write the decoded cache at ") and result.stderr.count("\n") == 1
    assert "data.py" not in result.stderr and "Warning" not in result.stderr
    cache_line = next(line for line in result.stdout.splitlines() if line.startswith("cache:"))
    assert "could not be written" in cache_line and str(blocker) in cache_line


def test_cache_defaults_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFARLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = load(make_cifar_python(tmp_path / "data", N))
    assert ds.cache.parent == tmp_path / "xdg" / "cifarlab" / "decoded"


def test_touched_source_file_rebuilds_the_cache(tmp_path, isolated_cache):
    root = make_image_folders(tmp_path / "data", N)
    first = load(root)
    png = root / "test" / "frog" / "0001.png"
    stat = png.stat()
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load(root)
    assert not second.from_cache and second.cache != first.cache
    assert list((isolated_cache / "decoded").glob("*.npz")) == [second.cache]  # the stale one is gone


def test_changes_behind_a_symlinked_class_folder_rebuild_the_cache(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    real = tmp_path / "elsewhere" / "cat"
    real.parent.mkdir()
    shutil.move(root / "train" / "cat", real)
    (root / "train" / "cat").symlink_to(real, target_is_directory=True)
    (root / "train" / "dog" / "up").symlink_to(root, target_is_directory=True)  # a loop: not followed forever
    first = load(root)
    assert_arrays(first, tiny_arrays(N))
    assert load(root).from_cache
    (real / "0000.png").unlink()
    (real / "0001.png").unlink()
    second = load(root)
    assert not second.from_cache
    assert np.bincount(second.train_labels)[CLASSES.index("cat")] == N - 2
    assert load(root).from_cache
    bad = real / "0009.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=re.escape(f"{root / 'train' / 'cat' / bad.name}:")):
        load(root)


def test_a_copy_that_keeps_size_and_mtime_still_rebuilds_the_cache(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    png = root / "train" / CLASSES[0] / "0000.png"
    load(root)
    replacement = tmp_path / "other.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(replacement)
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(png)  # same size as the replacement
    load(root)
    assert png.stat().st_size == replacement.stat().st_size
    before = png.stat()
    shutil.copy2(replacement, png)  # like cp -p: new content, and then the old mtime back
    os.utime(png, ns=(before.st_atime_ns, before.st_mtime_ns))
    ds = load(root)
    assert not ds.from_cache and ds.train_images[0].min() == 200


def test_a_file_name_that_is_not_utf8_is_cached(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    folder = os.fsencode(root / "train" / CLASSES[0])
    os.rename(os.path.join(folder, b"0000.png"), os.path.join(folder, b"caf\xe9.png"))  # a Latin-1 name
    first = load(root)
    assert len(first.train_labels) == 10 * N and first.cache is not None
    assert load(root).from_cache


def test_an_old_cache_that_cannot_be_deleted_does_not_fail_the_load(tmp_path, isolated_cache, monkeypatch):
    root = make_image_folders(tmp_path / "data", N)
    first = load(root)
    (root / "test" / "frog" / "0001.png").touch()
    real_unlink = Path.unlink

    def refuse_the_old_one(self, missing_ok=False):
        if self == first.cache:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_the_old_one)
    second = load(root)
    assert not second.from_cache and second.cache.is_file() and first.cache.is_file()


def test_changed_pixels_are_picked_up(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    load(root)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / CLASSES[0] / "0000.png")
    ds = load(root)
    assert not ds.from_cache
    assert ds.train_images[0].max() == 0


def _npz_bytes(save, **arrays):
    buffer = io.BytesIO()
    save(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign", "compressed"])
def test_unusable_cache_is_rebuilt(tmp_path, damage):
    root = make_cifar_python(tmp_path / "data", N)
    cache = load(root).cache
    content = cache.read_bytes()
    damaged = {
        "garbage": lambda: b"not a zip",
        "truncated": lambda: content[: len(content) // 2],
        "empty": lambda: b"",
        "foreign": lambda: _npz_bytes(np.savez, x=np.zeros(3)),
        "compressed": lambda: _npz_bytes(np.savez_compressed, **tiny_arrays(N), classes=CLASSES),
    }
    cache.write_bytes(damaged[damage]())
    rebuilt = load(root)
    assert not rebuilt.from_cache
    assert_arrays(rebuilt, tiny_arrays(N))
    assert load(root).from_cache


def test_cache_can_be_turned_off(tmp_path, isolated_cache):
    ds = load(make_image_folders(tmp_path / "data", N), cache=False)
    assert (ds.cache, ds.from_cache) == (None, False)
    assert list(isolated_cache.iterdir()) == []


# --- bad input --------------------------------------------------------------------------------


def _pickles(tmp_path):
    return tmp_path, make_cifar_python(tmp_path, N)


def _truncated_pickle(tmp_path):
    root, folder = _pickles(tmp_path)
    culprit = folder / "data_batch_3"
    culprit.write_bytes(culprit.read_bytes()[:1000])
    return root, culprit


def _garbage_pickle(tmp_path):
    root, folder = _pickles(tmp_path)
    (folder / "test_batch").write_bytes(b"this is not a pickle")
    return root, folder / "test_batch"


def _pickle_without_labels(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"data": np.zeros((3, 3072), np.uint8)}, folder / "data_batch_2")
    return root, folder / "data_batch_2"


def _ragged_batch_data(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"data": [[1, 2, 3], [4]], "labels": [0, 1]}, folder / "data_batch_2")
    return root, folder / "data_batch_2"


def _label_names_not_a_list(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"label_names": 10}, folder / "batches.meta")
    return root, folder / "batches.meta"


def _label_names_not_text(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"label_names": [b"\xff\xfe"] * 10}, folder / "batches.meta")
    return root, folder / "batches.meta"


def _label_out_of_range(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}, folder / "data_batch_5")
    return root, folder / "data_batch_5"


def _nine_label_names(tmp_path):
    root, folder = _pickles(tmp_path)
    dump_pickle({"label_names": list(CLASSES[:9])}, folder / "batches.meta")
    return root, folder / "batches.meta"


def _no_test_batch(tmp_path):
    root, folder = _pickles(tmp_path)
    (folder / "test_batch").unlink()
    return root, folder / "test_batch"


def _undecodable_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "train" / "cat" / "0001.png"
    culprit.write_bytes(b"\x89PNG but not really")
    return root, culprit


def _wrong_size_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "test" / "ship" / "0002.png"
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(culprit)
    return root, culprit


def _png_bytes(width, height, bit_depth, color_type, row):
    """A PNG Pillow cannot write (16 bits per colour channel), built from its chunks."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for _ in range(height)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _sixteen_bit_gray_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "train" / "cat" / "h16.png"
    Image.fromarray(np.full((32, 32), 60000, np.uint16)).save(culprit)  # Pillow would clip it to white
    return root, culprit


def _sixteen_bit_rgb_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "test" / "dog" / "rgb48.png"
    culprit.write_bytes(_png_bytes(32, 32, 16, 2, b"\xea\x60" * 3 * 32))
    return root, culprit


def _float_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "train" / "bird" / "float.png"
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(culprit, format="TIFF")  # opened by content
    return root, culprit


def _32_bit_int_image(tmp_path):
    root = make_image_folders(tmp_path, N)
    culprit = root / "train" / "frog" / "int32.png"
    Image.fromarray(np.full((32, 32), 70000, np.int32)).save(culprit, format="TIFF")
    return root, culprit


def _empty_train_class_folder(tmp_path):
    root = make_image_folders(tmp_path, N)
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"hidden, not an image")
    return root, root / "train" / "cat"


def _empty_test_class_folder(tmp_path):
    root = make_image_folders(tmp_path, N)
    shutil.rmtree(root / "test" / "horse")
    (root / "test" / "horse").mkdir()
    return root, root / "test" / "horse"


def _no_test_folder(tmp_path):
    root = make_image_folders(tmp_path, N)
    shutil.rmtree(root / "test")
    return root, root


def _nine_class_folders(tmp_path):
    root = make_image_folders(tmp_path, N)
    for split in ("train", "test"):
        shutil.rmtree(root / split / "truck")
    return root, root / "train"


def _test_classes_differ(tmp_path):
    root = make_image_folders(tmp_path, N)
    (root / "test" / "truck").rename(root / "test" / "lorry")
    return root, root / "test"


BAD_INPUTS = [
    _truncated_pickle,
    _garbage_pickle,
    _pickle_without_labels,
    _label_out_of_range,
    _ragged_batch_data,
    _label_names_not_a_list,
    _label_names_not_text,
    _nine_label_names,
    _no_test_batch,
    _undecodable_image,
    _wrong_size_image,
    _no_test_folder,
    _nine_class_folders,
    _test_classes_differ,
    _sixteen_bit_gray_image,
    _sixteen_bit_rgb_image,
    _float_image,
    _32_bit_int_image,
    _empty_train_class_folder,
    _empty_test_class_folder,
]


@pytest.mark.parametrize("breaker", BAD_INPUTS, ids=[f.__name__.strip("_") for f in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_file(tmp_path, breaker):
    root, culprit = breaker(tmp_path / "data")
    content = culprit.read_bytes() if culprit.is_file() else None
    with pytest.raises(DataError) as err:
        load(root)
    message = str(err.value)
    assert isinstance(err.value, CifarlabError)
    assert f"{culprit}:" in message and "\n" not in message
    assert err.value.__cause__ is None
    if content is not None:
        assert culprit.read_bytes() == content  # never rewritten or deleted


@pytest.mark.parametrize("breaker", [_sixteen_bit_gray_image, _sixteen_bit_rgb_image, _float_image, _32_bit_int_image])
def test_images_deeper_than_8_bits_are_refused(tmp_path, breaker):
    root, culprit = breaker(tmp_path / "data")
    with pytest.raises(DataError, match="8 bits per channel") as err:
        load(root)
    assert str(err.value).startswith(f"{culprit}: image has ") and "convert it to 8-bit RGB" in str(err.value)


@pytest.mark.parametrize(
    "png, expected",
    [
        (_png_bytes(32, 32, 8, 2, b"\x10\x20\x30" * 32), None),
        (_png_bytes(32, 32, 8, 6, b"\x10\x20\x30\xff" * 32), None),
        (_png_bytes(32, 32, 16, 2, b"\xea\x60" * 3 * 32), "16-bit-per-channel"),
        (_png_bytes(32, 32, 16, 6, b"\xea\x60" * 4 * 32), "16-bit-per-channel"),
    ],
    ids=["rgb8", "rgba8", "rgb16", "rgba16"],
)
def test_bit_depth_is_read_from_the_plain_tuple_tiles_of_pillow_before_11(png, expected):
    """Pillow 9 and 10 (which pyproject allows) give im.tile as plain tuples, not named ones."""
    with Image.open(io.BytesIO(png)) as im:
        assert data._deeper_than_8_bits(im) == expected
        im.tile = [tuple(tile) for tile in im.tile]
        assert type(im.tile[0]) is tuple
        assert data._deeper_than_8_bits(im) == expected


def test_cli_refuses_a_16_bit_image_in_one_line(tmp_path):
    root, culprit = _sixteen_bit_gray_image(tmp_path / "data")
    result = run_cli("data", "--data", root, "--no-download")
    assert result.returncode != 0 and result.stdout == ""
    last = result.stderr.splitlines()[-1]  # after the progress bar's
    assert last.startswith(f"error: {culprit}: image has 16-bit pixels") and result.stderr.count("error") == 1


def test_empty_class_folder_is_refused_by_name(tmp_path):
    root, folder = _empty_train_class_folder(tmp_path / "data")
    with pytest.raises(DataError, match=re.escape(f"{folder}: holds no PNG or JPEG images")):
        load(root)


# --- helpers ----------------------------------------------------------------------------------


def test_describe_reports_layout_checksum_cache_and_counts(tmp_path):
    root = make_image_folders(tmp_path / "data", N)
    load(root)
    text = describe(load(root))
    assert "image-folder" in text and str(root) in text and data.CHECKSUM_FOLDERS in text
    assert "(hit)" in text and "30 train, 30 test" in text
    for name in CLASSES:
        assert any(line.split() == [name, str(N), str(N)] for line in text.splitlines())
    assert "cache:    off" in describe(load(root, cache=False))


def test_holdout_split_takes_the_last_fraction_in_order():
    images, labels = np.arange(50).reshape(10, 5), np.arange(10)
    (train_x, train_y), (val_x, val_y) = holdout_split(images, labels, 0.2)
    np.testing.assert_array_equal(train_y, np.arange(8))
    np.testing.assert_array_equal(val_y, [8, 9])
    np.testing.assert_array_equal(val_x, images[8:])
    np.testing.assert_array_equal(train_x, images[:8])
    assert len(holdout_split(np.zeros((50000, 1)), np.zeros(50000), 0.2)[1][1]) == 10000
    assert len(holdout_split(images, labels, 0)[1][1]) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(DataError):
            holdout_split(images, labels, bad)
    for empty_side in (0.99, 0.01):  # 10 images: nothing left to train on, or nothing to validate on
        with pytest.raises(DataError, match="choose a fraction that leaves both"):
            holdout_split(images, labels, empty_side)


def test_mean_image_is_the_float32_per_pixel_mean():
    images = tiny_arrays(2)["train_images"]
    mean = mean_image(images)
    assert mean.dtype == np.float32 and mean.shape == (32, 32, 3)
    np.testing.assert_allclose(mean, images.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(mean_image(np.full((300, 32, 32, 3), 255, np.uint8)), 255)


def test_resolve_data_dir_prefers_flag_then_env_then_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "cifarlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "cifarlab"
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir("~/flag") == tmp_path / "home" / "flag"


def test_failed_writes_name_the_users_file_and_leave_no_temporary(tmp_path):
    """A full disk shows up as torch's or safetensors' own error, or as an OSError of the temporary
    file: each becomes a message naming the file the user would look for."""
    import errno

    import torch

    from cifarlab import CifarlabError

    target = tmp_path / "last.pt"

    def full_disk(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 434752 vs 434640")

    with pytest.raises(CifarlabError, match=r"last.pt: could not be written \(\[enforce fail.*check the free space"):
        fileio.write_with(target, full_disk)

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as caught:
        fileio.write_with(target, no_space)
    assert caught.value.filename == str(target)
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError) as caught:
        fileio.write_text(tmp_path / "folder", "a,b\n")
    assert caught.value.filename == str(tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_an_os_error_at_the_command_line_says_why_and_what_to_do_once(tmp_path):
    """The line main prints for an OSError: the path, the reason in the user's terms, one remedy."""
    import errno

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    denied = fileio.os_error_line(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs")))
    assert denied == f"{tmp_path / 'runs'}: Permission denied; give another path, or change its permissions"
    full = fileio.os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt")))
    assert full == f"{tmp_path / 'x.pt'}: No space left on device; free some space and run it again"
    blocked = fileio.os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", str(blocker / "run")))
    assert blocked == f"{blocker / 'run'}: {blocker} is a file, not a folder; move it away, or give another path"
    assert fileio.os_error_line(OSError(errno.EIO, "Input/output error")) == "Input/output error"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
def test_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """The temporary file is fsynced with what the writer put in it before it takes the real name
    (else a crash soon after can leave the name on an empty file), then the folder is, so that the
    rename itself lasts."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        events.append(("fsync", Path(target).name if not os.path.isdir(target) else "<folder>", size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.write_with(tmp_path / "w.bin", lambda tmp: Path(tmp).write_bytes(b"12345"))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][2] == 5 and events[0][1].startswith(".tmp-w-")
    assert events[1][1] == "w.bin" and events[2][1] == "<folder>"
    assert (tmp_path / "w.bin").read_bytes() == b"12345"


def test_a_long_or_bracketed_file_name_is_written_atomically_and_its_stale_temporaries_found(tmp_path):
    long, bracketed = tmp_path / ("r" * 245 + ".json"), tmp_path / "run[1].json"
    for path in (long, bracketed):
        fileio.write_text(path, "x")  # its temporary's name within the 255-byte limit
        assert path.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    stale = [tmp_path / f"{fileio._temp_prefix(p)}dead{p.suffix}" for p in (long, bracketed)]
    for path in stale:
        path.write_text("")
        os.utime(path, (os.stat(path).st_mtime - 7200,) * 2)
    fileio.remove_stale_temps(long)
    fileio.remove_stale_temps(bracketed)  # "[1]" is a name, not a glob's character class
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("layout", ["cifar-python", "tar.gz"])
def test_decoded_arrays_are_contiguous_whether_or_not_they_came_from_the_cache(tmp_path, layout):
    root = make_cifar_python(tmp_path / "data", N).parent if layout == "cifar-python" else make_tar(tmp_path / "data", N)[0]
    ds = load(root, cache=False, expected_md5=None)
    assert ds.train_images.flags.c_contiguous and ds.test_images.flags.c_contiguous
