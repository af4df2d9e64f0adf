"""Stopping one run: the user's stop and the wind-down after a failed page, each waking every wait and cutting every try."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from _random_user_etl.errors import Stopped


class WoundDown(Exception):
    """A worker's wait or try ended because another page of its run failed: that failure is the run's, not this."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """One run's stopping: asked by the user (a signal, or stop() from any thread), or a wind-down once a page failed."""

    def __init__(self) -> None:
        self._ending = threading.Event()  # either of the two: every wait ends, every try is cut
        self._asked = threading.Event()  # the user's stop alone: a wind-down is no stop
        self.signum: int = signal.SIGINT
        self._lock = threading.Lock()
        self._cuts: set = set()  # what to call at once when the run ends: each try under way
        # While noting_signals() is held, the read end of the process's signal wakeup pipe: a signal is
        # seen here the moment it arrives, even while the main thread waits inside a long Polars call.
        self._signals_read: int | None = None

    @property
    def asked(self) -> bool:
        """True once the user asked the run to stop."""
        return self._asked.is_set()

    @property
    def ending(self) -> bool:
        """True once the run is stopping or winding down."""
        return self._ending.is_set()

    def stop(self, signum: int = signal.SIGINT) -> None:
        """The user's stop: every wait ends with Stopped and every try under way is cut."""
        with self._lock:
            if not self._asked.is_set():
                self.signum = signum
                self._asked.set()
        self._end()

    def begin(self) -> None:
        """A run starts on this stop: the wind-down an earlier run of it ended in is over; the user's stop stays."""
        with self._lock:  # stop() sets its flag under the lock before it ends anything: never cleared after it
            if not self._asked.is_set():
                self._ending.clear()

    def wind_down(self) -> None:
        """A page failed: every other wait and try of the run ends now, so the failure is said at once."""
        self._end()

    def _end(self) -> None:
        """Wake every wait and cut every try."""
        self._ending.set()
        with self._lock:
            cuts = list(self._cuts)
        for cut in cuts:
            cut()

    def reason(self) -> BaseException:
        """What a wait or try that the run's end cut raises: Stopped for the user's stop, WoundDown otherwise."""
        return Stopped(self.signum) if self.asked else WoundDown()

    def hold(self, seconds: float) -> None:
        """Wait `seconds`, unless the run ends first: then raise at once."""
        if self._ending.wait(max(seconds, 0)):
            raise self.reason()

    @contextlib.contextmanager
    def cutting(self, cut):
        """While held, the run's end calls cut() at once (and at entry if it has ended already)."""
        with self._lock:
            self._cuts.add(cut)
        try:
            if self.ending:  # ended between the caller's look and here: nothing else would cut it
                cut()
            yield
        finally:
            with self._lock:
                self._cuts.discard(cut)

    @contextlib.contextmanager
    def noting_signals(self):
        """While held (main thread only), every signal that has a Python handler is noted at once for check()."""
        if os.name == "nt":  # a wakeup fd must be a socket there; runs need POSIX anyway (the seed lock)
            yield
            return
        read, write = os.pipe()
        try:
            for fd in (read, write):
                os.set_blocking(fd, False)
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._signals_read = read
            try:
                yield
            finally:
                self._signals_read = None  # first: no look may read a pipe about to be closed
                signal.set_wakeup_fd(previous)
        finally:
            os.close(read)
            os.close(write)

    def check(self) -> None:
        """Raise Stopped if the user stopped the run: for code Polars runs on its own thread while the main thread waits in its call."""
        signum = self._noted_signal()
        if signum is not None:
            # The stop starts here: the main thread's handler, run once Polars returns, finds it under way
            # and raises nothing of its own, so this Stopped (which Polars hands back as it is) carries it.
            self.stop(signum)
        if self.asked:
            raise Stopped(self.signum)

    def _noted_signal(self) -> int | None:
        """SIGINT or SIGTERM if one arrived since the last look, whether or not the main thread has run its handler yet."""
        read = self._signals_read
        try:
            numbers = os.read(read, 512) if read is not None else b""
        except OSError:  # nothing written (BlockingIOError), or closed as the run ends
            return None
        return next((signum for signum in numbers if signum in STOP_SIGNALS), None)
