"""The marker file of an export (``medclip-export``): how a folder tells that this project wrote it.

Read when a moved export is loaded (:mod:`medclip_train.model.loading`) and when an export replaces an earlier one
(:mod:`medclip_train.export`), so it lives below both.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_MARKER = "medclip_export.json"
"""Written last into every export: recognises an earlier export (which may be replaced) and lists its files."""
EXPORT_FORMAT = "medclip-export"


def read_export_marker(folder: Path) -> dict | None:
    """The marker of an earlier export in ``folder``, or ``None`` when the folder holds none (or a broken one)."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT else None
