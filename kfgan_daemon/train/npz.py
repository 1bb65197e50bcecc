"""Reading the ``.npz`` files a dataset build writes (sample files, face tracks), with one account of how they fail."""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kfgan_daemon.errors import InputError


@contextmanager
def open_npz(path: Path, what: str, remedy: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``path``'s arrays, read as they are asked for; any failure, reading them included, is an
    :class:`InputError` naming the file as an unreadable ``what`` and saying ``remedy``."""
    try:
        # Our own handle: np.load leaves its file open when the zip directory is unreadable.
        with open(path, "rb") as handle, np.load(handle) as arrays:
            yield arrays
    # A file cut short is a BadZipFile (its directory is at the end) or an EOFError (an array is).
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc}); {remedy}") from exc
