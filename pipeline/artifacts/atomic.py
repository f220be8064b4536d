"""Atomic writes: every output appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.exceptions import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A killed or failing writer leaves no file that looks complete: the temporary file is
    removed on error and never has the final name, and so are the directories this call
    created for it (while empty: several nested writers into one new directory leave it only
    once the last of them has failed).
    """
    path = Path(path)
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except OSError as exc:
        raise OutputError(
            f"cannot write to '{path.parent}': {exc.strerror}; choose a writable output "
            "directory or free disk space"
        ) from None
    tmp = Path(tmp)
    done = False
    try:
        yield tmp
        os.replace(tmp, path)
        done = True
    except OutputError:  # already says which file failed (nested atomic_path, a writer's own)
        raise
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty_dirs(created)


def _remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty; stop at the first that is not."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def write_failed(path: str | Path, exc: OSError) -> OutputError:
    """The OutputError for an OSError while writing ``path`` (disk full, permissions)."""
    return OutputError(f"writing '{path}' failed: {exc.strerror or exc}; check free disk "
                       "space and permissions")
