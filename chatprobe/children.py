"""Child processes that must not outlive chatprobe (edge, Linux).

The swarm's Locust and the canary's suite run in sessions of their own, so that a timeout or
a signal can stop each with its whole process group. A chatprobe killed by SIGKILL (or a
crash) stops nothing, and they would run on against the target. The kernel can stop them: a
parent-death signal, set by util-linux's ``setpriv`` before it execs the child's command (the
setting survives exec), reaches the child when the thread that started it dies.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys


def die_with_parent(signal_name: str) -> list[str]:
    """A command prefix: the child gets ``signal_name`` ("INT", "KILL", ...) when this
    process dies. Empty where setpriv is missing (not Linux, no util-linux): the child then
    outlives a killed chatprobe until it ends on its own."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", signal_name] if setpriv else []


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent_now(signum: int) -> bool:
    """This process gets ``signum`` when its parent dies (for processes chatprobe does not
    start itself, such as the workers Locust forks); False where Linux's prctl is missing.
    A parent already gone when this is called sends the signal at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signum)
    return True
