"""Small filesystem helpers that never leave half-written files behind, and process helpers."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lenet_tf.errors import UsageError


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Writes text to a temporary file beside `path`, then renames it into place.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        # mkstemp creates the file private (0600); give it ordinary permissions.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: Path, purpose: str, min_free_bytes: int = 50 * 2**20) -> Path:
    """Creates `path` if needed and proves we can write there, before any work starts.

    Checking up front turns "permission denied after an hour of training" into
    an error in the first second.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"cannot write the {purpose} {path}: {reason}; choose a writable folder") from None
    free = _free_bytes(path)
    if free is not None and free < min_free_bytes:
        raise UsageError(
            f"only {free // 2**20} MiB free under the {purpose} {path}; "
            f"free at least {min_free_bytes // 2**20} MiB or choose another folder"
        )
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows.
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment for a child `python -m lenet_tf...`, with `overrides`.

    The package's folder goes first on PYTHONPATH, so the child imports the
    same lenet_tf however this process imported it (installed or from a checkout).
    """
    environment = dict(os.environ, **overrides)
    package_root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    return environment
