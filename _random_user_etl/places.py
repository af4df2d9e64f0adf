"""Where a run's files lie: a local folder or an object-storage address, and the local folder its pages are staged in."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import tempfile
from pathlib import Path


STAGING = ".staging"  # the folder of a run's staged pages, inside a local output folder


def is_remote(location: str) -> bool:
    """True for an object-storage address such as s3://bucket/prefix: a URL scheme, then ://."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def staging_root(output_dir: str) -> Path:
    """The local folder for a run's part files: inside the output folder, or in this user's private temp folder."""
    if is_remote(output_dir):
        # Per user, and made 0700 by the run (or refused): a shared, predictable temp path could
        # be pre-created by another local user as a link to a folder of theirs or of ours.
        digest = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"random_user_etl-{user_tag()}" / digest
    return Path(output_dir) / STAGING


def user_tag() -> str:
    """This user in a folder name: the uid, or where there is none (Windows) the login name, as one plain name."""
    if hasattr(os, "getuid"):
        return str(os.getuid())
    try:
        name = getpass.getuser()
    except Exception:  # no login variable set, and no pwd module: ImportError, OSError or KeyError by version
        return "user"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)  # one plain name: a slash, a backslash or ".." must not leave the temp folder


def lies_in(path, folder) -> bool:
    """True when `path` is `folder` or lies inside it, both resolved: a relative path, "..", or a link hides nothing."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents
