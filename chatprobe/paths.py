"""Where chatprobe finds the checkout's data folders (fixtures/, reports/) and its state, and
how it writes a result file."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """The checkout holding fixtures/; CHATPROBE_HOME overrides (for non-editable installs)."""
    override = os.environ.get("CHATPROBE_HOME")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path:
    return project_root() / "fixtures"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "chatprobe"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Whole or not at all: a run killed while writing must not leave half a document
    where the last one was (a temporary file beside it, renamed over it, with its mode).
    A path that is not a regular file (/dev/stdout, a pipe) is written in place; a symlink
    keeps pointing where it did, at the new document."""
    text = json.dumps(doc, indent=2) + "\n"
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = stale.name[len(target.name) + 2:-len(".tmp")]
        # A writer's file lives for milliseconds: a minute old, with no such process here
        # (or in another pid namespace sharing the folder, hence the age), it was killed.
        if pid.isascii() and pid.isdecimal() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to do
                if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                    stale.unlink()  # left by a writer killed mid-write
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        with contextlib.suppress(OSError):
            shutil.copymode(target, temporary)  # none yet: the default mode
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


OWNER_LOCK = ".owner.lock"
STALE_TMP_S = 60.0
# A run's folder gets its lock file within milliseconds: one of our folders without it (a
# run killed in between, or a chatprobe before the lock files) untouched for this long and
# whose process is not alive here is abandoned.
UNLOCKED_STALE_S = 24 * 3600.0


@contextlib.contextmanager
def run_temp_dir(kind: str) -> Iterator[str]:
    """A temporary folder for one run (``kind``: swarm, demo...), named with this process's
    id and holding a file this process keeps locked (flock) while the folder is in use. A run
    killed with SIGKILL cannot remove its folder, but its lock dies with it: each new run of
    the kind removes the folders nobody holds, never a live run's (whatever its pid
    namespace; a folder without a lock file, from a chatprobe before them, goes once a day
    untouched with no such pid here)."""
    for stale in Path(tempfile.gettempdir()).glob(f"chatprobe-{glob.escape(kind)}-*-*"):
        _remove_if_abandoned(stale, kind)
    with tempfile.TemporaryDirectory(prefix=f"chatprobe-{kind}-{os.getpid()}-") as folder:
        # Locked under a name of its own, then renamed into place: a sweeper never finds the
        # lock file before it is held.
        taking = Path(folder) / f"{OWNER_LOCK}.{os.getpid()}"
        with open(taking, "x", encoding="ascii") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taking.rename(Path(folder) / OWNER_LOCK)
            yield folder


def _remove_if_abandoned(folder: Path, kind: str) -> None:
    try:
        # Writable (NFS emulates flock with write locks), never created.
        lock = open(folder / OWNER_LOCK, "r+", encoding="ascii")  # noqa: SIM115
    except FileNotFoundError:
        _remove_if_unlocked_and_stale(folder, kind)
        return
    except OSError:
        return  # not a folder, or not ours to open
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # its run holds it
        shutil.rmtree(folder, ignore_errors=True)


def _remove_if_unlocked_and_stale(folder: Path, kind: str) -> None:
    # Named exactly as run_temp_dir names them (tempfile adds 8 of [a-z0-9_]), so that a
    # person's chatprobe-swarm-2024-notes is never taken for one.
    match = re.fullmatch(rf"chatprobe-{re.escape(kind)}-(\d+)-[a-z0-9_]{{8}}", folder.name)
    if match is None or _alive(int(match.group(1))):
        return  # not named as ours are, or its process may still use it
    try:
        info = folder.lstat()  # a symlink planted under our name is not followed
    except OSError:
        return
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or time.time() - info.st_mtime < UNLOCKED_STALE_S):
        return  # not a folder, another user's (as root too), or in use lately
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True
