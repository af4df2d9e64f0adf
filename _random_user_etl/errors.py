"""The job's errors: one line each, exit status 1; a stop by signal."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from _random_user_etl.shown import LINE_LIMIT, shorten, shown_urls_in


class EtlError(Exception):
    """A run that failed for a reason worth one clear line (exit status 1); the page and path it concerns, if any."""

    def __init__(self, reason: str, page: int | None = None, path=None, doing: str = ""):
        # `doing` is what was being done to `path` ("cannot write"): the line reads "cannot write <path>: <reason>".
        super().__init__(reason)
        self.reason, self.page, self.path, self.doing = reason, page, path, doing

    def __str__(self) -> str:
        """The one line: 'page N: ', then what was done to which path, then why; escaped and bounded, whatever it holds."""
        where = " ".join(str(part) for part in (self.doing, self.path) if part not in ("", None))
        page = f"page {self.page}" if self.page is not None else ""
        return shorten(": ".join(part for part in (page, where, self.reason) if part), LINE_LIMIT)


class ServiceError(EtlError):
    """The service could not be asked: an error status, a transport fault, retries given up."""


class AnswerError(EtlError):
    """The service's answer was refused: its size, shape or contract."""


class StorageError(EtlError):
    """A folder, lock or file of the job's could not be used or written."""


class RefusedPages(StorageError):
    """Staged pages that cannot land together: the run drops them from staging, so the next one fetches them again."""

    def __init__(self, reason: str, pages: list[int]):
        super().__init__(reason)
        self.pages = pages


def on_page(exc: EtlError, page: int | None) -> EtlError:
    """The same kind of error, said of one page."""
    return type(exc)(exc.reason, page=page, path=exc.path, doing=exc.doing)


class Stopped(KeyboardInterrupt):
    """The run was told to stop (SIGINT or SIGTERM); staged pages are kept for the next run."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def failing_as(doing: str, path=None, page: int | None = None, catching: tuple = (OSError,), by_filename: bool = False):
    """Turn an OS failure (or any of `catching`) inside into one StorageError line: what was being done to which path, and why."""
    try:
        yield
    except catching as exc:
        # `by_filename`: the failing call names the path itself (a folder of the operator's deep inside `path`).
        named = getattr(exc, "filename", None) if by_filename else None
        raise StorageError(write_error(exc), page=page, path=named or path, doing=doing) from exc


def write_error(exc: BaseException) -> str:
    """Why a write failed, in one line; an object store's refusal by its S3 error code and message."""
    # The object store's words (and any library's) are outside text: each piece goes through shorten,
    # and every address in them through shown_url (Polars names the endpoint as given, password and all).
    if isinstance(exc, OSError) and exc.strerror:
        return shorten(shown_urls_in(exc.strerror), 200)
    text = shown_urls_in(str(exc).strip())
    code = re.search(r"<Code>([^<]+)</Code>", text)
    if code:
        message = re.search(r"<Message>([^<]+)</Message>", text)
        return f"the object store answered {shorten(code.group(1))}" + (f" ({shorten(message.group(1), 160)})" if message else "")
    # delta-rs (1.6) puts each cause on a line of its own, "↳ ..." in colour, under a first line that
    # says as little as "Generic S3 error": the last is the one that says why (a timeout, a refusal).
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    chained = len(lines) > 1 and ("Caused by:" in text or lines[-1].startswith("↳"))
    cause = re.sub(r"^(\d+:|↳)\s*", "", lines[-1]) if chained else ""
    return shorten(lines[0], 200) + (f" ({shorten(cause, 80)})" if cause else "")


class _Silencer:
    """The process's stderr sent nowhere while any thread holds it: the first holder saves and redirects it, the last puts it back."""

    # The process has one stderr: two runs at once each silencing it alone would save the other's
    # redirect as "the real one" and put it back for good.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: int | None = None

    @contextlib.contextmanager
    def held(self):
        """While held, what the process writes to file descriptor 2 goes nowhere."""
        with self._lock:
            if self._holders == 0:
                self._saved = self._redirect()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._saved is not None:
                    os.dup2(self._saved, 2)
                    os.close(self._saved)
                    self._saved = None

    @staticmethod
    def _redirect() -> int | None:
        """Point descriptor 2 at the null device; the saved descriptor, or None if there is no stderr to silence."""
        try:
            saved, nowhere = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return None
        os.dup2(nowhere, 2)
        os.close(nowhere)
        return saved


_SILENCER = _Silencer()


def panic_text_silenced():
    """While held, what the process writes to its stderr goes nowhere: for a Polars read whose panic the job catches and says itself."""
    # Polars' Rust panic hook writes "thread ... panicked at ..." (and a backtrace) straight to file
    # descriptor 2 before the PanicException reaches Python: only a read that may panic is wrapped,
    # a moment long.
    return _SILENCER.held()
