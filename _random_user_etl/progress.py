"""A run's progress: a bar on a terminal, one log line per page otherwise; both say when the rate limit holds."""

from __future__ import annotations

import logging
import sys
import time
from _random_user_etl.client import RateGate, seconds_text

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


class Progress:
    """Users landed so far: a tqdm bar on a terminal, one log line per page otherwise; both say when the rate limit holds."""

    def __init__(self, total: int, pages: int, done: int, gate: RateGate):
        self.total, self.pages, self.done, self.started = total, pages, done, time.monotonic()
        self.resumed = done  # users staged by an earlier run: not fetched again
        self.fresh = 0  # users fetched by this run, for the rate (resumed pages took no time)
        self.gate = gate
        self.bar = None
        if pages > 1 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=" users", unit_scale=True, file=sys.stderr)
            self.gate.watch = self.limited

    def advance(self, page: int, rows: int) -> None:
        """Count one landed page."""
        self.done += rows
        self.fresh += rows
        if self.bar is not None:
            self.bar.update(rows)
        elif self.pages > 1:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = self.fresh / elapsed
            log.info(
                "page %d done: %d/%d users (%.0f%%), %.0f users/s, about %s left%s",
                page,
                self.done,
                self.total,
                100 * self.done / self.total,
                rate,
                self.left(rate),
                limit_note(self.gate),
            )

    def left(self, rate: float) -> str:
        """The time left: the windows still to wait once the rate limit's pace is known, else users left at the rate so far."""
        # Pages are fetched ahead of landing: the limit binds the users not fetched yet.
        seconds = self.gate.time_left(self.total - self.resumed - self.gate.fetched)
        if seconds is None:
            seconds = (self.total - self.done) / rate if rate else float("inf")
        return seconds_text(seconds)

    def limited(self, waited: float | None) -> None:
        """Show on the bar how long the rate limit has held, or clear it once lifted."""
        if self.bar is not None:  # the gate calls this only while the bar is open
            self.bar.set_postfix_str("" if waited is None else f"rate limited {seconds_text(waited)}")

    def close(self) -> None:
        """Close the bar if there is one."""
        if self.bar is not None:
            self.gate.watch = None
            self.bar.close()


def limit_note(gate: RateGate) -> str:
    """', rate limited for 40s' while the limit holds, and the pace it lets through once seen; or nothing."""
    waited, pace = gate.limited_for(), gate.pace()
    note = f", rate limited for {seconds_text(waited)}" if waited is not None else ""
    if pace is not None:
        note += f" (the limit lets about {pace[0]:,} users through a {seconds_text(pace[1])} window)"
    return note
