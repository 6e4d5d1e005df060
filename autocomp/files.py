"""Every file autocomp writes goes through here: checked before the work starts, written to a temp file beside
the target and renamed (a reader sees the old file or the new one, never half of either), with the
permissions a plain ``open()`` would give, and the temp files a killed earlier run left for the same target
removed by the next write to it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from autocomp.errors import AutocompError

__all__ = ["check_output", "atomic_write", "atomic_write_text", "stale_temps"]


def check_output(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Refuse, before any work, a target that cannot be written: a folder, a path under a file, a folder
    without write permission. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise AutocompError(f"{flag} {str(path)!r} is a folder; give a file path inside it (e.g. "
                            f"{str(path / ('out' + (path.suffix or '.json')))!r})")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AutocompError(f"{flag} {str(path)!r} is under {str(parent)!r}, which is a file, not a folder; choose "
                            f"another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AutocompError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable; choose another {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise AutocompError(f"{flag} {str(path)!r} exists and is not writable; choose another {flag}")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(path: Path) -> list[Path]:
    """Temp files of earlier writes to ``path`` whose writing process is gone (killed mid-write)."""
    out = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path``. A failure leaves the old file (or none) and no temp
    file; location problems (a missing or read-only folder) are one-line :class:`AutocompError` s."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in stale_temps(path):
            old.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        raise AutocompError(f"cannot write {str(path)!r}: {e.strerror or e}; choose another location") from None
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain open(): mkstemp's 0600 would hide plans and exports
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`), synced to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def cache_dir() -> Path:
    """Where derived files that do not belong to a study are cached (the built-in models' trained weights and
    text): ``$AUTOCOMP_CACHE``, default ``~/.cache/autocomp``."""
    return Path(os.environ.get("AUTOCOMP_CACHE") or Path.home() / ".cache" / "autocomp")
