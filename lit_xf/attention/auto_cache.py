"""``auto``'s measured choices on disk, so a second run of the same case reuses them.

One JSON file, ``auto_attention.json`` under ``$LIT_XF_CACHE_DIR`` (default
``$XDG_CACHE_HOME/lit_xf``, else ``~/.cache/lit_xf``), mapping a case key (the case and the
torch / xformers / flash-attn-4 / lit_xf versions) to ``{"choice", "times_ms", "skipped",
"case"}``. ``LIT_XF_AUTO_CACHE=0`` turns it off. Writes go to a temporary file that replaces the
old one (``os.replace``), so readers never see half a file; processes writing at once may drop
each other's new entries (they are measured again). A corrupt or unreadable file is warned about
once and ignored (the next write replaces it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "LIT_XF_CACHE_DIR"
CACHE_SWITCH_ENV = "LIT_XF_AUTO_CACHE"
CACHE_FILE = "auto_attention.json"
_OFF = ("0", "off", "false", "no")


def default_cache_dir() -> Path | None:
    """Where ``auto`` keeps its choices, or None when ``LIT_XF_AUTO_CACHE`` turns the cache off."""
    if os.environ.get(CACHE_SWITCH_ENV, "").strip().lower() in _OFF:
        return None
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lit_xf"


class ChoiceCache:
    """The JSON file of measured choices in ``directory`` (None: no disk cache; every get misses)."""

    def __init__(self, directory: str | os.PathLike | None):
        self.path = None if directory is None else Path(directory) / CACHE_FILE
        self._warned = False

    def get(self, key: str) -> dict | None:
        entry = self._read().get(key)
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict) -> None:
        """Add ``entry`` under ``key`` to what the file holds now, written atomically."""
        if self.path is None:
            return
        entries = self._read()
        entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            self._warn(f"can't write {self.path} ({e}); choices are kept for this process only")

    def _read(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            entries = json.loads(self.path.read_text())
            if not isinstance(entries, dict):
                raise ValueError(f"holds a {type(entries).__name__}, not an object")
            return entries
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            self._warn(f"ignoring {self.path} ({e}); measuring again")
            return {}

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("attention=auto cache: %s", message)
