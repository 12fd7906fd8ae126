"""Files the scripts write: atomically, and into folders checked before any model is loaded."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yields a temporary path to write in place of `path`, renamed over it when the block ends
    and removed if the block fails: a reader (or a resumed run) sees the old file or the new one,
    never part of one. The file gets the usual permissions (safetensors writes 0600)."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, payload) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically, its header's keys in sorted order: the same tensors
    and metadata always give the same bytes (safetensors itself writes the metadata in hash order,
    which changes from process to process)."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = header.encode() + b" " * (-len(header.encode()) % 8)  # the data stays 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + size :])


def save_image(image, path: str) -> None:
    """A PIL image as PNG (whatever the file's extension)."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


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
