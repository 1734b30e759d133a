"""Files the pipeline writes: atomically (a reader sees the old file or the new one), deterministically
(sorted JSON, no NaN), with shareable modes; and their sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "write_output", "dump_json", "sha256_file", "UMASK"]

UMASK = os.umask(0)
os.umask(UMASK)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file via a temporary sibling and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dump_json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_output(path: Path, data: bytes | str, *, option: str) -> None:
    """`atomic_write` to a path the user named (`--json`, `--output`, ...): an OSError (read-only, full,
    a parent that is a file, a folder in the way) is an OutputError naming the option, not a traceback."""
    from ..errors import OutputError

    try:
        atomic_write(path, data)
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot write it ({err.strerror or err}); choose another path") from None
