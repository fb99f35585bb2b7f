"""Files: atomic writes, JSON results, weights into modules, ddpmkit's cache folder, and the
one-line messages the commands print.

Every file ddpmkit writes for later runs to trust (checkpoints, reference features, result
JSON) goes through ``write_atomically``: a crash leaves the old file or the new one, never
half of one. Its files get the mode of any other file a user creates (0666 less the
umask, 0644 by default): checkpoints and classifiers are results to share, like the
PNGs and JSON beside them, and hold nothing secret (the temporary files that safetensors
writes through would otherwise leave them 0600).

``check_writable`` is how a command checks its output paths before any work, so that an
unwritable ``--out`` is one line at the start, not a traceback after an hour of sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CACHE_ENV = "DDPMKIT_CACHE"
MESSAGE_PREFIX = "ddpm: "


def say(message: str) -> None:
    """One line for the user on stdout, prefixed ``ddpm: `` as every message of ddpmkit is,
    written above an open progress bar rather than through it."""
    from tqdm import tqdm

    tqdm.write(MESSAGE_PREFIX + message)


def check_writable(paths: Iterable[str | Path], *, what: str = "output") -> None:
    """Raise one CheckpointError line now if any of ``paths`` (files to be written later)
    could not be created: its folder, or the nearest folder above it that exists, is
    read-only, full or not a folder, or the path is a folder itself. Creates nothing
    that stays: a probe file is made and removed in the nearest existing folder."""
    for path in map(Path, paths):
        if path.is_dir():
            raise CheckpointError(f"cannot write {what} {path}: it is a directory")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(20, f"{folder} is not a directory")
            with tempfile.TemporaryFile(dir=folder):
                pass
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise CheckpointError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def cache_root() -> Path:
    """ddpmkit's cache: $DDPMKIT_CACHE, else ~/.cache/ddpmkit (classifiers, FID reference statistics, Inception weights)."""
    return Path(os.environ.get(CACHE_ENV) or default_cache_root())


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "ddpmkit"


def safe_name(name: str) -> str:
    """A name usable as one file-name component ("folder:/a/b" -> "folder_a_b")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def write_atomically(path: str | Path, write: Callable[[Path], object], *, what: str = "file") -> Path:
    """write(temporary), fsync, rename over path, fsync the folder: all or nothing.

    A full disk or a read-only folder becomes a CheckpointError naming ``what`` and path;
    whatever was at path before is left as it was.
    """
    from safetensors import SafetensorError  # safetensors reports its I/O errors as SafetensorError

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        _fsync_path(temporary)
        os.replace(temporary, path)
        _fsync_path(path.parent)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            temporary.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CheckpointError(f"could not write {what} {path}: {reason}") from None
    return path


def write_text(path: str | Path, text: str, *, what: str = "file") -> Path:
    """``text`` written atomically (write_atomically)."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), what=what)


def write_json(path: str | Path, value: Any, *, what: str = "result") -> Path:
    """``value`` as indented JSON (other types as str), written atomically."""
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n", what=what)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (what results quote to name the weights they used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(module: Any, weights: dict[str, Any], *, source: str) -> None:
    """``module.load_state_dict(weights)``, but a mismatch names the keys and shapes that differ."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [
        f"{k} {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or reshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
            if items:
                shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(weights)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
