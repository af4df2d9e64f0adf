"""The seed lock: a plain file of this user's, closed to others; another user's lock, or anything else at
its name, is refused before any request."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from support import OTHER_UID

import random_user_etl as etl


def test_a_lock_owned_by_another_user_is_refused(api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.chown(lock, OTHER_UID, -1)
    with pytest.raises(etl.EtlError, match=f"refusing {lock}: owned by uid {OTHER_UID}"):
        etl.run(settings(seed="pura"))
    assert api.requests == [] and os.lstat(lock).st_uid == OTHER_UID


def test_a_lock_left_readable_by_an_older_run_is_closed_to_others(api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.chmod(lock, 0o644)
    etl.run(settings(seed="pura"))
    assert stat.S_IMODE(os.lstat(lock).st_mode) == 0o600


def folder_as_lock(lock: Path) -> None:
    """A folder at the lock's name."""
    lock.mkdir()


def socket_as_lock(lock: Path) -> None:
    """A listening socket at the lock's name (bound by a relative name: socket paths are short)."""
    with socket.socket(socket.AF_UNIX) as sock:
        here = os.getcwd()
        os.chdir(lock.parent)
        try:
            sock.bind(lock.name)
        finally:
            os.chdir(here)


@pytest.mark.parametrize("plant", [folder_as_lock, socket_as_lock], ids=lambda plant: plant.__name__)
def test_something_odd_at_the_lock_name_is_named(plant, api, out, settings):
    lock = out / ".staging" / "pura.lock"
    lock.parent.mkdir(parents=True)
    plant(lock)
    with pytest.raises(etl.EtlError, match=f"refusing {lock}: not a plain file"):
        etl.run(settings(seed="pura"))
    assert os.path.lexists(lock) and api.requests == []
