"""Where chatprobe finds the checkout's data folders (fixtures/, reports/) and its state."""

from __future__ import annotations

import os
from pathlib import Path


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
