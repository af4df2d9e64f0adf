"""The job's own folders and files: refused if another's or open to others, written atomically, the seed's lock."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import secrets
import stat
from pathlib import Path
import polars as pl
from _random_user_etl.places import is_remote, staging_root
from _random_user_etl.errors import StorageError, write_error

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


def check_own(path: Path, info: os.stat_result, kind: str) -> None:
    """Refuse a link, or anything but a plain folder or file (`kind`), where the job keeps one of its own."""
    if stat.S_ISLNK(info.st_mode):
        raise StorageError(f"a symbolic link where the job keeps its own {kind}; it was left as it is", path=path, doing="refusing")
    if not (stat.S_ISDIR if kind == "folder" else stat.S_ISREG)(info.st_mode):
        raise StorageError(f"not a plain {kind}; it was left as it is", path=path, doing="refusing")


def check_ours(path: Path, info: os.stat_result, closed: int = 0o022) -> None:
    """Refuse a folder or file of the job's that another user owns, or that has any of the `closed` mode bits."""
    # By default others may not write in it (they could plant links or forged parts there); object
    # storage's private staging also closes it to their eyes (closed=0o077).
    if info.st_uid != os.getuid():
        raise StorageError(f"owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); it was left as it is", path=path, doing="refusing")
    if info.st_mode & closed:
        mode, most = stat.S_IMODE(info.st_mode), 0o777 & ~closed
        raise StorageError(
            f"open to other users (mode {mode:04o}, at most {most:04o} expected); it was left as it is "
            f"(if it is yours and meant to be the job's, `chmod {most:o} {path}`)",
            path=path,
            doing="refusing",
        )


def own_folder(path: Path, closed: int = 0o022) -> Path:
    """Make the job's own folder `path` (mode 0700; its parents as usual) or find it ours; refuse a link, a file, or another's."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the operator's folders: these may be links
    with contextlib.suppress(FileExistsError):
        path.mkdir(0o700)
    info = os.lstat(path)
    check_own(path, info, "folder")
    check_ours(path, info, closed)
    return path


def found_own_folder(path: Path) -> bool:
    """True if the job's own folder `path` is there, False if not; a link, a file, or another's folder there is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    check_own(path, info, "folder")
    check_ours(path, info)
    return True


def is_plain_file(path: Path) -> bool:
    """True for a regular file, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def own_staging_root(output_dir: str) -> Path:
    """The staging root, made or checked: the job's own folder, in one only this user can enter for object storage."""
    # Absolute: Polars reads a leading "~" as the home folder, which the job's own file calls do not.
    root = staging_root(output_dir).absolute()
    if is_remote(output_dir):
        own_folder(root.parent, closed=0o077)  # in the shared temp folder: closed to others' eyes too
    return own_folder(root)


def fresh_temp(folder: Path, name: str, mode: int) -> Path:
    """A new empty file in `folder` at an unpredictable name ending .tmp, made by this call alone (never through a link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):  # as tempfile.mkstemp, which cannot be given the mode of a file for others to read
        temp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            os.close(os.open(temp, flags, mode))
            return temp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp file name", str(folder))


class KeepingFile(io.FileIO):
    """A file opened for writing that writes each piece whole and keeps the OSError a write raised, which Polars' error for it can lose."""

    error: OSError | None = None

    def write(self, data) -> int:
        """Write all of `data` (a nearly full disk takes part of it); an OSError is kept, then raised."""
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                done += super().write(view[done:])
        except OSError as exc:
            self.error = exc
            raise
        return done


@contextlib.contextmanager
def full_disk_said(folder: Path, written: KeepingFile | None = None):
    """A Polars write in `folder` that fails raises the OSError its file's write raised (if `written`), else ENOSPC once its filesystem is full."""
    # Polars' words for a refused write vary by where it stopped, and can lose the errno ("Invalid
    # thrift: transport error" in the footer): a file Polars writes through is asked first, as it
    # knows what was refused (a quota or file size limit leaves the disk with room, and room freed
    # since changes nothing). A write Polars makes itself leaves the filesystem to be asked, while
    # what the failed write left is still on it.
    try:
        yield
    except pl.exceptions.PolarsError as exc:
        if written is not None and written.error is not None:
            raise written.error from exc
        if no_space_left(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from exc
        raise


def write_to(temp: Path, write, sync: bool = False) -> None:
    """Call write(file) on the existing file `temp` opened for writing (never through a link), then fsync it if `sync`."""
    # Unbuffered: Polars writes to a buffered file's descriptor itself, and that loses the errno again.
    with KeepingFile(os.open(temp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "w") as file, full_disk_said(temp.parent, file):
        write(file)
        if sync:
            os.fsync(file.fileno())


# A write that failed with less room than this left on its filesystem ran out of it: Polars may have
# removed what it wrote before the filesystem is asked, giving some of the room back.
NEARLY_FULL = 1 << 20


def no_space_left(folder: Path) -> bool:
    """True when the filesystem holding `folder` has next to no room left for this user (NEARLY_FULL)."""
    try:
        info = os.statvfs(folder)
    except (OSError, AttributeError):  # gone, or no statvfs (Windows): not known to be full
        return False
    return info.f_bavail * info.f_frsize < NEARLY_FULL


@contextlib.contextmanager
def temp_file(folder: Path, name: str, mode: int = 0o600):
    """A fresh temp file in `folder` (fresh_temp), removed on leaving unless it was moved away."""
    temp = fresh_temp(folder, name, mode)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(path: Path, write, temp_dir: Path | None = None, mode: int = 0o600, sync: bool = False) -> None:
    """Call write(file) on a fresh temp file (write_to; fsynced if `sync`), then move the finished file into place in one step."""
    # `mode` (less the umask) is the file's: 0600 for the job's own files, 0666 for what others read.
    # temp_dir must be on the same filesystem; a killed run's temp file is swept from there.
    with temp_file(temp_dir or path.parent, path.name, mode) as temp:
        write_to(temp, write, sync)
        os.replace(temp, path)


# How often a run takes the seed's lock again after the run before it removed the lock as it finished.
LOCK_TRIES = 20


LOCK_POLL = 0.05  # seconds between looks at a lock another run holds: a wait the run's stop can end


@contextlib.contextmanager
def seed_lock(make_root, seed: str, hold):
    """Hold the seed's lock in the folder make_root() gives, so two runs of one seed take turns (hold(seconds) waits between looks); yields a forget() that removes it."""
    import fcntl  # POSIX only, and only a run takes the lock: importing the job and read_processed work on Windows too

    for _ in range(LOCK_TRIES):
        path = make_root() / f"{seed}.lock"
        try:
            handle = open_lock(path)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                continue  # its folder removed by a run that just finished, after make_root() made it: made again
            raise
        try:
            take_lock(handle, seed, hold)
            if same_file(path, handle):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # removed by the run before, as it finished: the lock is the file now at the name
    else:
        raise StorageError("the seed lock was removed under this run again and again", path=path, doing="cannot hold")
    with handle:
        try:
            yield lambda: path.unlink(missing_ok=True)  # while held: a run waiting on it finds it gone and takes it anew
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def take_lock(handle, seed: str, hold) -> None:
    """Lock `handle`; while another run of the seed holds it, look again each LOCK_POLL seconds that hold() waits."""
    import fcntl

    # Not a blocking flock: nothing but a signal to the main thread ends one, and a run stopped by its
    # Stop (from any thread) must end while it waits, not once the other run has finished.
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not said:
                log.info("another run of seed %s is under way: waiting for it", seed)
                said = True
            hold(LOCK_POLL)


def same_file(path: Path, handle) -> bool:
    """True while `path` still names the file `handle` holds open."""
    try:
        named, held = os.lstat(path), os.fstat(handle.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def open_lock(path: Path):
    """The seed's lock file, opened (made 0600 if new) and checked ours; never through a link or a FIFO."""
    try:
        # Never through a link, and never blocking on a FIFO planted under the lock's name. 0600:
        # flock needs only a file one can open, so a lock others can read is one they can hold forever.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a link, a folder, a socket: named as what it is
            check_own(path, os.lstat(path), "file")
        raise StorageError(write_error(exc), path=path, doing="cannot open the seed lock") from exc
    handle = open(fd, "rb")
    try:
        info = os.fstat(fd)
        check_own(path, info, "file")
        check_ours(path, info, closed=0)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # ours, but readable by others: closed now
    except BaseException:
        handle.close()
        raise
    return handle
