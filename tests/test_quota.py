"""The disk accounting: inotify (DiskQuota), and the fork server's full counts; real files in a temp dir, no kernels."""

import io
import os

import pytest

from sagecell_tw.files.quota import DiskQuota
from sagecell_tw.files.store import TooLarge, store_body
from sagecell_tw.worker.forkserver import deleted_usage, dir_usage

MiB = 1 << 20


def write(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def test_total_follows_writes_moves_and_deletes(tmp_path):
    q = DiskQuota(10 * MiB)
    try:
        write(tmp_path / "before", MiB)  # made before the watch: counted by the first scan
        q.watch("k", str(tmp_path))
        assert q.usage("k") >= MiB
        write(tmp_path / "a", 4 * MiB)
        (tmp_path / "sub").mkdir()
        write(tmp_path / "sub" / "b", 3 * MiB)
        assert q.read() == []
        assert 8 * MiB <= q.usage("k") < 9 * MiB
        os.rename(tmp_path / "a", tmp_path / "sub" / "a2")
        q.read()
        assert 8 * MiB <= q.usage("k") < 9 * MiB
        write(tmp_path / "c", 3 * MiB)
        assert q.read() == ["k"]
        os.remove(tmp_path / "c")
        os.remove(tmp_path / "sub" / "a2")
        assert q.read() == []
        assert q.usage("k") < 5 * MiB
    finally:
        q.close()


def test_kernels_are_counted_apart_and_unwatched(tmp_path):
    q = DiskQuota(2 * MiB)
    try:
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        q.watch("one", str(tmp_path / "one"))
        q.watch("two", str(tmp_path / "two"))
        write(tmp_path / "one" / "x", 3 * MiB)
        write(tmp_path / "two" / "y", MiB)
        assert q.read() == ["one"]
        q.unwatch("one")
        write(tmp_path / "one" / "z", 3 * MiB)
        assert q.read() == []
        assert q.usage("one") == 0
    finally:
        q.close()


def test_too_many_directories_is_over_quota(tmp_path):
    q = DiskQuota(100 * MiB, max_dirs=5)
    try:
        q.watch("k", str(tmp_path))
        for i in range(6):
            (tmp_path / f"d{i}").mkdir()
        assert q.read() == ["k"]
    finally:
        q.close()


def test_one_upload_in_progress_is_not_counted_twice(tmp_path):
    q = DiskQuota(3 * MiB)
    try:
        q.watch("k", str(tmp_path))
        write(tmp_path / "a", 2 * MiB)
        # the daemon replacing "a": old and new exist for a moment
        write(tmp_path / ".upload-0123456789abcdef", 2 * MiB)
        assert q.read() == []
        os.rename(tmp_path / ".upload-0123456789abcdef", tmp_path / "a")
        assert q.read() == []
        assert 2 * MiB <= q.usage("k") < 3 * MiB
        # a second file of that shape is counted: the exemption is one file
        write(tmp_path / ".upload-0123456789abcdef", MiB)
        write(tmp_path / ".upload-fedcba9876543210", 2 * MiB)
        assert q.read() == ["k"]
    finally:
        q.close()


def test_deleted_files_held_open_are_counted(tmp_path):
    """A file deleted but still open fills the disk: counted, once, for the process (and those under it) holding it."""
    dev = os.stat(tmp_path).st_dev
    before = deleted_usage(os.getpid(), dev)
    path = tmp_path / "gone"
    with open(path, "wb") as f:
        os.unlink(path)
        f.write(os.urandom(3 * MiB))
        f.flush()
        again = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)  # a second fd on it: counted once
        try:
            held = deleted_usage(os.getpid(), dev)
            assert 3 * MiB <= held - before < 4 * MiB
            assert dir_usage(str(tmp_path), 100 * MiB) == 0
            assert deleted_usage(os.getpid(), dev + 1) == 0  # another disk's deleted files are not this one's
        finally:
            os.close(again)
    assert deleted_usage(os.getpid(), dev) == before


def test_the_upload_check_counts_what_the_quota_counts(tmp_path):
    """
    Many small files fill more blocks than their bytes: the upload check
    counts the blocks, as the quota does, so an upload it lets in does not
    then take the kernel over quota (and get it killed).
    """
    work = tmp_path / "work"
    work.mkdir()
    for i in range(200):
        (work / f"small{i}").write_bytes(b"x")  # 200 bytes, ~800 KiB of blocks
    quota = MiB
    with pytest.raises(TooLarge):
        store_body(str(work), os.getuid(), ["big"], io.BytesIO(b"y" * (500 << 10)), MiB, quota)
    assert dir_usage(str(work), 1 << 40) <= quota


def test_a_sparse_file_counts_what_it_holds(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "sparse", "wb") as f:
        f.truncate(100 * MiB)  # 100 MiB long, nothing written
    st = store_body(str(work), os.getuid(), ["new.txt"], io.BytesIO(b"z" * 1000), MiB, 50 * MiB)
    assert st.st_size == 1000 and dir_usage(str(work), 1 << 40) < 50 * MiB
