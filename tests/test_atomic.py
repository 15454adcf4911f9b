"""embedkit.atomic: durable (fsync file, rename, fsync folder), ordinary permissions, stale temp folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from embedkit import atomic


@pytest.fixture
def events(monkeypatch):
    """Records fsync (by path), os.replace and the folder exchange, in order."""
    log: list[tuple] = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, atomic._exchange

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            log.append(("rename", str(a), str(b)))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", exchange)
    return log


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, events):
    target = tmp_path / "sub" / "report.json"
    atomic.write_json(target, {"a": 1})
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1
    tmp = events[renames[0]][1]
    assert Path(tmp).parent == target.parent and events[renames[0]][2] == str(target)
    assert ("fsync", tmp) in events[:renames[0]]  # the data is on disk before the name points at it
    assert ("fsync", str(target.parent)) in events[renames[0] + 1:]  # and the rename itself is durable
    assert target.read_text() == '{\n  "a": 1\n}\n'


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_atomic_dir_fsyncs_every_file_and_folder_before_the_swap(tmp_path, events, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    for generation in ("old", "new"):
        events.clear()
        with atomic.atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(generation.encode())
            (tmp / "sub").mkdir()
            (tmp / "sub" / "config.json").write_text(generation)
        synced = [e[1] for e in events if e[0] == "fsync"]
        swap = max(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target))
        before = {e[1] for e in events[:swap] if e[0] == "fsync"}
        assert {str(tmp / "weights.bin"), str(tmp / "sub" / "config.json"), str(tmp / "sub"), str(tmp)} <= before
        assert synced[-1] == str(tmp_path)  # the parent folder, after the swap
        assert (target / "weights.bin").read_bytes() == generation.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or .old folder left


def test_atomic_dir_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("killed")
    assert (target / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_files_get_ordinary_permissions_even_when_a_writer_makes_them_0600(tmp_path, umask_022):
    """safetensors and mkstemp create 0600 files, mkdtemp 0700 folders: the saved result is 0644 / 0755."""
    import tempfile

    with atomic.atomic_dir(tmp_path / "out") as tmp:
        fd, private = tempfile.mkstemp(dir=tmp, prefix="weights", suffix=".bin")
        os.close(fd)
        os.rename(private, tmp / "model.safetensors")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
        Path(tempfile.mkdtemp(dir=tmp)).rename(tmp / "private_dir")
    with atomic.atomic_path(tmp_path / "single.bin") as tmp:
        tmp.write_bytes(b"x")
    modes = _modes(tmp_path / "out")
    assert modes == {".": 0o755, "model.safetensors": 0o644, "run.sh": 0o755, "private_dir": 0o755}
    assert stat.S_IMODE((tmp_path / "single.bin").stat().st_mode) == 0o644


def test_permissions_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        assert atomic._umask() == 0o077
        with atomic.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
        atomic.write_text(tmp_path / "b", "b")
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out") == {".": 0o700, "a": 0o600}
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600


def test_remove_stale_temps_takes_only_this_targets_temporary_folders(tmp_path):
    target = tmp_path / "idx"
    target.mkdir()
    ours = [tmp_path / ".idx.abcd_123.tmp", tmp_path / ".idx.old-4242"]
    keep = [tmp_path / ".idx2.abcd1234.tmp",         # another index's
            tmp_path / ".idx.foo.abcd1234.tmp",      # the temp folder of an index named "idx.foo"
            tmp_path / ".idx.abcd1234.tmp.keep", tmp_path / "idx.abcd1234.tmp", tmp_path / "idx2"]
    for path in ours + keep:
        path.mkdir()
        (path / "file").write_text("x")
    (tmp_path / ".idx.zzzz9999.tmp").write_text("a file, not a folder")
    (tmp_path / ".idx.link0000.tmp").symlink_to(tmp_path / "idx2")
    assert sorted(atomic.remove_stale_temps(target)) == sorted(ours)
    assert target.is_dir() and all(p.exists() for p in keep) and (tmp_path / "idx2" / "file").exists()
    assert (tmp_path / ".idx.zzzz9999.tmp").is_file() and (tmp_path / ".idx.link0000.tmp").is_symlink()

    # Without the live folder, an .old folder may be the only complete copy: it stays.
    gone = tmp_path / "gone"
    (tmp_path / ".gone.old-77").mkdir()
    assert atomic.remove_stale_temps(gone) == [] and (tmp_path / ".gone.old-77").is_dir()
