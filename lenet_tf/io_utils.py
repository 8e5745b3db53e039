"""Small filesystem helpers that never leave half-written files behind, and process helpers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lenet_tf.errors import StoppedError, UsageError

# The errors a write gets when the disk (or the user's quota) is full.
_FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


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


@contextlib.contextmanager
def reporting_full_disk(path: Path):
    """Turns "no space left on device" while writing `path` into one line that says what to do.

    Every writer of a run goes through this, so a disk that fills up mid-run
    ends the run with the file's name instead of a traceback; the files it
    replaces atomically (checkpoint, backup, history) stay as they were.
    """
    try:
        yield
    except OSError as error:
        if not is_full_disk_error(error):
            raise
        raise StoppedError(full_disk_message(error, path)) from None


def full_disk_message(error: BaseException, where: Path) -> str:
    """One line for a run stopped by a full disk: the file, when the error names one, and what to do."""
    path = getattr(error, "filename", None) or where
    if not isinstance(error, OSError):  # TensorFlow names the file inside its message.
        roots = (str(where), str(Path(where).resolve()))
        named = [token for token in re.findall(r"/[^\s;:'\"]+", str(error)) if token.startswith(roots)]
        path = named[0] if named else where
    return (f"no space left on the device to write {path}; free some space and run the same command "
            "again: the run resumes from its last backup")


def is_full_disk_error(error: BaseException) -> bool:
    """Whether `error` (or an error it wraps) is a full disk or quota, whatever library raised it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL_DISK_ERRORS:
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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


def process_start_time() -> float:
    """When this process started, as a time.time() value (now, where the OS does not say).

    Linux gives the start in clock ticks since boot, and /proc/uptime the
    time since boot: interpreter and TensorFlow start-up then count in a
    run's wall time, as they do for the user waiting for it.
    """
    import time

    try:
        now = time.time()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # Field 22, starttime.
        return now - (uptime - started_after_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


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


def run_module_in_child(module: str, arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs `python -m module arguments...` as a helper that dies when this process dies.

    A killed export must leave nothing running: an orphaned converter would
    go on writing into a staging folder after the next export swept it away.
    The child arranges that itself, first thing (lenet_tf.child): Python
    documents `preexec_fn` as unsafe in a process with threads, which every
    TensorFlow process is.
    """
    return subprocess.run(_child_command(module, arguments), capture_output=True, text=True, env=env)


def _child_command(module: str, arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "lenet_tf.child", str(os.getpid()), module, *arguments]


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment for a child `python -m lenet_tf...`, with `overrides`.

    The package's folder goes first on PYTHONPATH, so the child imports the
    same lenet_tf however this process imported it (installed or from a checkout).
    """
    environment = dict(os.environ, **overrides)
    package_root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    return environment
