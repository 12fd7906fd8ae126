"""Checks on the folders the scripts write to, made before any model is loaded."""

from __future__ import annotations

import os


def unwritable_reason(folder: str) -> str | None:
    """Why `folder` cannot receive files (it is a file, or the nearest existing folder on its
    path is not writable), or None when it can."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} (on the way to {folder}) is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
