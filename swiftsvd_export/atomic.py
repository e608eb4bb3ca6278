"""Write outputs through a temporary sibling and rename, so nothing half-written is left behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import SwiftSVDError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SwiftSVDError(f"{path} already exists (pass --overwrite to replace it)")


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        # mkdtemp/mkstemp create private (0700/0600) entries; give outputs the usual permissions.
        tmp.chmod(0o777 & ~_umask())
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
