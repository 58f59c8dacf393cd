"""Development keys kept in the data folder, so tokens and signed URLs survive restarts.
Production refuses to start without configured keys (config.Settings)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create(data_dir: Path, name: str) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{name}.key"
    try:
        value = path.read_text().strip()
        if len(value) >= 32:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
