"""Class folders of a zero-shot set (``task/<class>/<image>``): the folder-safe name of a class label.

medclip-prep names the folders it writes with :func:`slug`, and evaluation matches a shard's label to a class
folder by the same function, so it lives in the data layer both import.
"""

from __future__ import annotations

import re


def slug(name: str) -> str:
    """Folder-safe lower-case name: ``"normal, benign"`` -> ``"normal_benign"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"
