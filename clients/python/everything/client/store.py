"""A token store on disk for the CLI: `~/.config/everything/credentials.json`, mode 0600.

Tokens are kept per server (the `--server` target), so tokens of one deployment are never sent to
another. `$XDG_CONFIG_HOME` replaces `~/.config` when set. Writes are atomic (a temporary file in the
same folder, then rename), so a crash never leaves half a file and the refresh token is not lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from everything.client._core import Tokens

__all__ = ["CredentialsFile", "default_path"]


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "everything" / "credentials.json"


class CredentialsFile:
    def __init__(self, path: Path | None = None):
        self.path = path or default_path()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"servers": {}}
        except (OSError, ValueError):
            return {"servers": {}}  # unreadable or corrupt: behave as signed out
        if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
            return {"servers": {}}
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=self.path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def load(self, server: str) -> tuple[Tokens | None, str | None]:
        """(tokens, email) stored for `server`, or (None, None)."""
        entry = self._read()["servers"].get(server)
        if not isinstance(entry, dict) or not entry.get("access_token"):
            return None, None
        try:
            return Tokens.from_dict(entry), entry.get("email")
        except (TypeError, ValueError):
            return None, None

    def save(self, server: str, tokens: Tokens, email: str | None = None) -> None:
        data = self._read()
        old = data["servers"].get(server) or {}
        entry = tokens.to_dict()
        entry["email"] = email if email is not None else old.get("email")
        data["servers"][server] = entry
        self._write(data)

    def remove(self, server: str) -> bool:
        data = self._read()
        if data["servers"].pop(server, None) is None:
            return False
        self._write(data)
        return True
