"""Writes that never leave a half-written file or folder: write a temporary one beside the target,
then ``os.replace`` it onto the target (atomic on POSIX and Windows within one file system).

Files and folders get the permissions of any newly created one, ``0o666`` / ``0o777`` less the
process's umask (the temporary ones are created ``0o600`` / ``0o700``, and ``os.replace`` would
keep that)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary binary file in ``path``'s folder, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder_atomically(folder: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``folder``, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file :func:`write_atomically` left behind (killed mid-write)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")
