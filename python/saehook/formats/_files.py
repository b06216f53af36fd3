"""File plumbing the format readers share: opening only regular files, strict JSON, and
telling whether an array lives in a file mapping. No SAE imports (safetensors_io uses it)."""
from __future__ import annotations

import json
import mmap
import os
import stat
from typing import Any, List, Optional, Tuple


class NotARegularFile(OSError):
    """The path names a FIFO, device, socket or directory: reading it could block forever."""


def open_regular(path: str) -> int:
    """An O_RDONLY descriptor of `path`, refusing anything but a regular file before reading.

    O_NONBLOCK makes the open itself return at once for a FIFO (a plain open() blocks until a
    writer appears); fstat on the descriptor (not a stat of the name) then decides, so a name
    swapped between the check and the open cannot slip through.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path}: not a regular file ({_kind(mode)}); refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_regular(path: str) -> None:
    """Raises FileNotFoundError / NotARegularFile unless `path` is a regular file (for readers
    such as torch.load and zipfile that open the path themselves)."""
    os.close(open_regular(path))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class StrictJSONError(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, val in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key!r}")
        out[key] = val
    return out


def _no_constant(name: str):
    raise StrictJSONError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """json.loads that refuses what RFC 8259 JSON parsers disagree on: a key given twice in one
    object (Python keeps the last silently; serde refuses some) and NaN/Infinity literals."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _address(arr: Any) -> int:
    return arr.data_ptr() if hasattr(arr, "data_ptr") else arr.__array_interface__["data"][0]


def file_offset(addr: int) -> Optional[Tuple[str, int]]:
    """(file, offset in it) of the file mapping that holds address `addr`, None for anonymous
    memory; raises OSError where there is no /proc/self/maps (not Linux)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= addr < hi:
                name = parts[5].strip() if len(parts) == 6 else ""
                if not name.startswith("/") or name.startswith("/dev/"):
                    return None  # anonymous memory, [heap], /dev/zero
                return name, addr - lo + int(parts[2], 16)
    return None


def mapped_file(arr: Any) -> Optional[str]:
    """The file whose memory mapping holds `arr`'s data (a numpy array or torch tensor), or None
    when the data is in anonymous memory (a copy). Linux reads /proc/self/maps (exact, names the
    file); elsewhere a numpy array's base chain is searched for an mmap ("a mapped file")."""
    if arr is None:
        return None
    try:
        where = file_offset(_address(arr))
        return None if where is None else where[0]
    except OSError:
        pass
    base = arr
    while base is not None:
        if isinstance(base, mmap.mmap):
            return "a mapped file"
        base = getattr(base, "base", None)
    return None
