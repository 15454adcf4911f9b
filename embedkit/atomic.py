"""Atomic, durable writes: write to a temporary sibling, fsync it, rename it into place, fsync the parent folder.

A crash or power loss leaves either the old file (folder) or the new one, never half of one and never neither.

Permissions: files come out as a plain `open()` would create them (0666 & ~umask: 0644 under the usual umask 022)
and folders as `mkdir` would (0777 & ~umask: 0755). `tempfile.mkstemp`/`mkdtemp` make 0600/0700, and some writers
(safetensors) create 0600 files themselves, so everything is widened to those modes before the rename; bits are
only ever added, never removed. A model saved by one user can then be served by another (the Docker image's user).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

# fsync errors that mean "this file system cannot fsync", not "the data is not on disk".
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where possible (os.umask(0) briefly affects every thread)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new entry) in folder `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not a folder we can open (e.g. Windows): nothing to sync
        return
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _widen(path: Path, st: os.stat_result, umask: int) -> None:
    """Add the bits a plain open()/mkdir() would have given (group/other read; folders and programs executable)."""
    mode = stat.S_IMODE(st.st_mode)
    ordinary = (0o777 if stat.S_ISDIR(st.st_mode) or mode & 0o111 else 0o666) & ~umask
    if mode | ordinary != mode:
        os.chmod(path, mode | ordinary)


def _finish_tree(root: Path, umask: int) -> None:
    """Ordinary permissions and fsync for every file and folder under `root` (children before their folder)."""
    for folder, dirs, files in os.walk(root, topdown=False):
        base = Path(folder)
        for name in files + dirs:
            path = base / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            _widen(path, st, umask)
            if stat.S_ISREG(st.st_mode):
                _fsync_file(path)
        _widen(base, os.lstat(base), umask)
        fsync_dir(base)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    umask = _umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp_path
        # The caller may have replaced the file (a library writing its own temp file and renaming it here).
        _widen(tmp_path, os.stat(tmp_path), umask)
        _fsync_file(tmp_path)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any, *, indent: int = 2) -> Path:
    return write_text(target, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # glibc < 2.28, or a libc without it
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # kernel or file system without RENAME_EXCHANGE: the caller falls back to two renames
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it becomes `target` (an old one is replaced).

    Every file is fsynced and given ordinary permissions before the swap. An existing folder is exchanged with
    the new one in one step (renameat2 RENAME_EXCHANGE on Linux), so `target` always exists for readers and a crash
    leaves the old or the new folder; elsewhere the old folder is renamed aside first. A killed process can leave
    its temporary folder behind: `remove_stale_temps(target)` removes them (call it under the writers' lock).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    umask = _umask()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
    try:
        yield tmp
        _finish_tree(tmp, umask)
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            pass  # `tmp` now holds the old folder; removed below
        elif target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temporary folders `atomic_dir(target)` left behind when its process was killed.

    Only folders named exactly as atomic_dir names them for this target (`.NAME.XXXXXXXX.tmp`, and `.NAME.old-PID`
    when `target` itself exists) are removed; never `target`, never another target's. Call it only while holding
    the lock that every writer of `target` takes, so no live writer's folder can be among them.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    name = re.escape(target.name)
    temp = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")  # tempfile.mkdtemp: 8 characters from [a-z0-9_]
    old = re.compile(rf"\.{name}\.old-\d+")  # without target, an .old folder may be the only complete copy
    target_present = target.is_dir()
    removed = []
    for entry in os.scandir(parent):
        if not entry.is_dir(follow_symlinks=False):
            continue
        if temp.fullmatch(entry.name) or (target_present and old.fullmatch(entry.name)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed
