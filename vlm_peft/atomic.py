"""Writing files and dirs so that a kill, a full disk or a planted link never leaves a wrong one.

A leaf module (no vlm_peft imports): every layer may use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def stale_temporaries(folder: Path, pattern: str) -> list[tuple[Path, re.Match]]:
    """Entries of `folder` matching `pattern` (whose last group is a PID) left by processes that died."""
    if not folder.is_dir():
        return []
    regex = re.compile(pattern)
    found = []
    for path in sorted(folder.iterdir()):
        match = regex.fullmatch(path.name)
        if match and not pid_alive(int(match.groups()[-1])):
            found.append((path, match))
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `path` whole, under a temporary name renamed over it: a link at `path` is replaced,
    never followed, and a kill leaves the old file or the new one, not half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
