"""Test-only hook, never part of a user's run: with this folder on PYTHONPATH and
FTCORE_TEST_FULL_DISK="DIR:NAME" (or "DIR:NAME:cow"), every Python process (ftcore and the
children it starts) sees DIR as a disk that fills up at the first write to a file whose name
contains NAME (its temporary name too): from then on a write that would make the files under DIR
take more 4 KiB blocks than they held at that moment fails with OSError(ENOSPC) and writes
nothing, as on a full disk; a rewrite within the blocks a file already holds still succeeds, as
there, except with `cow` (a copy-on-write filesystem such as btrfs or ZFS writes every change to
new blocks, so once full it refuses every write). shutil.disk_usage says
0 bytes free under DIR once it is full. The disk's size (bytes) is kept in DIR.full beside DIR,
so every process sees the same disk. Only writes through Python's open() are seen: use a backend
whose run writes its files that way (mlx; torch's adapter is written by safetensors' Rust code).
Used by tests/test_disk_full.py."""

from __future__ import annotations

import os

_SPEC = os.environ.get("FTCORE_TEST_FULL_DISK")

if _SPEC:
    import builtins
    import errno
    import io
    import shutil
    from collections import namedtuple

    _ROOT, _NAME, *_MODE = _SPEC.split(":")
    _COW = _MODE == ["cow"]
    _ROOT = os.path.abspath(_ROOT)
    _STATE = _ROOT.rstrip("/") + ".full"
    _BLOCK = 4096
    _open_files = {}  # path -> its _Limited, while open in this process

    def _blocks(size: int) -> int:
        return -(-size // _BLOCK) * _BLOCK

    def _under(path: str) -> bool:
        return os.path.abspath(path).startswith(_ROOT + os.sep)

    def _used(skip: str | None = None) -> int:
        """Bytes the files under the root take, in whole blocks (an open file: its written size)."""
        total = 0
        for folder, _, names in os.walk(_ROOT):
            for name in names:
                path = os.path.join(folder, name)
                if path == skip:
                    continue
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue
                if path in _open_files:
                    size = max(size, _open_files[path].size)
                total += _blocks(size)
        return total

    def _capacity() -> int | None:
        try:
            with _real_open(_STATE) as f:
                return int(f.read())
        except OSError:
            return None

    class _Limited:
        """A file opened for writing under the root: write() refuses what the disk has no room for."""

        def __init__(self, f, path: str) -> None:
            self._f, self.path = f, path
            self.size = os.stat(path).st_size
            _open_files[path] = self

        def write(self, data):
            n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
            end = self._f.tell() + n
            cap = _capacity()
            if cap is None and _NAME in os.path.basename(self.path):  # this write fills the disk
                cap = _used()
                with _real_open(_STATE, "w") as f:
                    f.write(str(cap))
            if cap is not None and (_COW or _used(skip=self.path) + _blocks(max(self.size, end)) > cap):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.size = max(self.size, end)
            return self._f.write(data)

        def close(self) -> None:
            _open_files.pop(self.path, None)
            self._f.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.close()

        def __iter__(self):
            return iter(self._f)

        def __getattr__(self, name):
            return getattr(self._f, name)

    _real_open = io.open

    def _limited_open(file, mode="r", *args, **kwargs):
        f = _real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and set(mode) & set("wax+") and _under(os.fspath(file)):
            return _Limited(f, os.path.abspath(os.fspath(file)))
        return f

    io.open = builtins.open = _limited_open

    _real_disk_usage = shutil.disk_usage
    _Usage = namedtuple("_Usage", "total used free")

    def _disk_usage(path):
        cap = _capacity()
        if cap is None or not (_under(os.fspath(path)) or os.path.abspath(path) == _ROOT):
            return _real_disk_usage(path)
        used = _used()
        return _Usage(cap, used, max(0, cap - used))

    shutil.disk_usage = _disk_usage
