"""One run's pages: fetched and staged in parallel, with progress, then landed as one batch."""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import logging
import shutil
import sys
import time
from pathlib import Path
import polars as pl
import random_user_config as config
from _random_user_etl.shown import shorten
from random_user_config import Settings
from _random_user_etl.answer import PageRequest, answer_info
from _random_user_etl.client import RateGate, fetch_page, seconds_text
from _random_user_etl.contract import transform
from _random_user_etl.errors import AnswerError, EtlError, RefusedPages, StorageError, on_page, write_error
from _random_user_etl.raw import keep_landed_raw, read_kept, save_raw, settle_raw
from _random_user_etl.sort import ExternalSort
from _random_user_etl.staging import part_identity, part_path, stage_part
from _random_user_etl.store import batch_exists, store_options, write_batch
from _random_user_etl.wire import Answer, stop_requests, unpack

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


STAGERS = 2  # pages unpacked and typed at once: both cores of a small machine, and a bounded peak


@dataclasses.dataclass
class Batch:
    """What a run landed."""

    path: str
    seed: str
    rows: int
    bytes: int
    seconds: float
    pages_fetched: int
    pages_reused: int
    report: dict


class Progress:
    """Users landed so far: a tqdm bar on a terminal, one log line per page otherwise; both say when the rate limit holds."""

    def __init__(self, total: int, pages: int, done: int = 0, gate: RateGate | None = None):
        self.total, self.pages, self.done, self.started = total, pages, done, time.monotonic()
        self.resumed = done  # users staged by an earlier run: not fetched again
        self.fresh = 0  # users fetched by this run, for the rate (resumed pages took no time)
        self.gate = gate or RateGate()
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


def in_parallel(work, items, concurrency: int):
    """Run work(item) for each item, at most `concurrency` at once; yield results as they finish."""
    items = iter(items)
    pool = futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="page")
    pending, stopped = {pool.submit(work, item) for item in itertools.islice(items, concurrency)}, False
    try:
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            results = [future.result() for future in done]  # a failure surfaces before more work is taken
            # Refill before yielding, so the next items are under way while the caller works on these.
            pending |= {pool.submit(work, item) for item in itertools.islice(items, len(done))}
            yield from results
    except BaseException as exc:  # a stop, a failed page, or the consumer gone: nothing more is worth waiting for
        stopped = isinstance(exc, KeyboardInterrupt)
        stop_requests()  # wake the workers blocked on the network or a wait, so the run ends now
        raise
    finally:
        # On a stop, not waited for: a worker may sit in a connect that nothing can cut (see the script's exit).
        pool.shutdown(wait=not stopped, cancel_futures=True)


def fetch_and_keep(session, settings: Settings, request: PageRequest, gate: RateGate, kept: Path | None) -> tuple[PageRequest, Answer, Path | None]:
    """Fetch one page and keep its raw answer in `kept`: the part of a page's work that waits on the network."""
    assert request.page is not None  # every page fetched to stage is asked for by number
    answer = fetch_page(session, settings, request, gate)
    return request, answer, save_raw(kept, request.page, answer)


def stage_body(answer: Answer, request: PageRequest, settings: Settings, folder: Path, raw_path: Path | None = None, replayed: bool = False) -> tuple[int, int]:
    """Unpack, transform and stage one answer (a kept one, if `replayed`), and name its kept raw file after the verdict."""
    assert request.seed is not None and request.page is not None  # a staged page is always asked for by seed and number
    try:
        frame = transform(unpack(answer, settings.max_response_bytes), request)
    except EtlError as exc:
        settle_raw(raw_path, accepted=False)
        raise on_page(exc, request.page) from exc
    settle_raw(raw_path, accepted=True)
    try:
        stage_part(folder, frame, part_identity(settings, request.seed, request.page, frame.height, replayed))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StorageError(write_error(exc), page=request.page, path=folder, doing="cannot stage in") from exc
    return request.page, frame.height


def split_part(sorter: ExternalSort, folder: Path, page: int, rows: int) -> None:
    """Hand a staged page to the external sort, which splits it into key ranges while the run goes on."""
    try:
        sorter.add(part_path(folder, page), rows)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StorageError(write_error(exc), page=page, path=folder, doing="cannot split into key ranges in") from exc


def stage_and_split(fetched: tuple[PageRequest, Answer, Path | None], settings: Settings, folder: Path, sorter: ExternalSort) -> tuple[int, int]:
    """Stage one fetched answer, then hand the staged page to the external sort."""
    request, answer, raw_path = fetched
    page, rows = stage_body(answer, request, settings, folder, raw_path)
    split_part(sorter, folder, page, rows)
    return page, rows


def first_seed(session, settings, gate, sizes) -> tuple[str, Answer]:
    """Ask for page 1 with no seed and take the seed the service picked."""
    answer = fetch_page(session, settings, PageRequest(None, 1, sizes[0]), gate)
    try:
        seed = answer_info(unpack(answer, settings.max_response_bytes)).get("seed")  # the transform checks the rest
    except EtlError as exc:
        raise on_page(exc, 1) from exc
    if not seed:
        raise AnswerError("the service picked no seed (info.seed missing)", page=1)
    if not config.SEED_PATTERN.fullmatch(seed):
        raise AnswerError(f"the service's seed '{shorten(seed)}' is not safe as a file name", page=1)
    return seed, answer


def check_picked_seed(seed: str, destination: str, settings: Settings) -> None:
    """Refuse a seed the service picked when its batch has landed: a run with no --seed never replaces a batch."""
    if batch_exists(destination, store_options(settings)):
        raise StorageError(
            f"the service picked it, and a picked seed never replaces a batch (give --seed {seed} to land it again)",
            path=destination,
            doing=f"a batch of seed {seed} is already at",
        )


def land(folder, settings, seed, sizes, destination, started, fetched, sorter=None, kept=None) -> Batch:
    """Write the batch from its staged parts, keep its raw answers (if `kept`), clear the staging, say what landed."""
    parts = [part_path(folder, page) for page in range(1, len(sizes) + 1)]
    try:
        # Each part holds its page's size: staged from an answer checked to hold it, or trusted for it.
        ingested_at = dt.datetime.now(dt.UTC)  # when the batch lands: every row of it, the same instant
        report, size = write_batch(parts, destination, ingested_at, sum(sizes), sorter=sorter, part_rows=sizes, storage_options=store_options(settings))
    except RefusedPages as exc:
        for page in exc.pages:  # reused as they are, they would be refused again by every rerun
            part_path(folder, page).unlink(missing_ok=True)
        raise
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StorageError(write_error(exc), path=destination, doing="cannot write") from exc
    try:
        # Before the staging is cleared: a run killed in between finds the parts and lands (and keeps) again.
        if kept is not None:
            keep_landed_raw(kept, len(sizes))
    except OSError as exc:
        raise StorageError(write_error(exc), path=kept, doing=f"landed {destination}, but cannot keep its raw answers in") from exc
    shutil.rmtree(folder, ignore_errors=True)
    seconds = time.monotonic() - started
    log.info("landed %d rows, seed %s, file %s, %d bytes, %.2fs", report["rows"], seed, destination, size, seconds)
    return Batch(destination, seed, report["rows"], size, seconds, fetched, len(sizes) - fetched, report)


def fetch_and_stage(
    session,
    settings: Settings,
    gate: RateGate,
    seed: str,
    sizes: list[int],
    todo: list[int],
    folder: Path,
    sorter: ExternalSort,
    kept: Path | None = None,
    first_answer: Answer | None = None,
) -> None:
    """Fetch, check and stage every page in `todo` (page 1 from `first_answer` if the service picked the seed), keeping raw answers in `kept`."""
    if len(todo) < len(sizes):
        log.info("resuming seed %s: %d of %d pages already staged", seed, len(sizes) - len(todo), len(sizes))
    progress = Progress(settings.n, len(sizes), done=settings.n - sum(sizes[page - 1] for page in todo), gate=gate)
    stage = functools.partial(stage_and_split, settings=settings, folder=folder, sorter=sorter)
    todo = list(todo)
    try:
        if first_answer is not None and 1 in todo:
            raw_path = save_raw(kept, 1, first_answer)
            progress.advance(*stage((PageRequest(seed, 1, sizes[0]), first_answer, raw_path)))
            todo.remove(1)
        # `concurrency` threads wait on the network while at most STAGERS pages are typed,
        # so memory holds a bounded number of bodies and typed pages, whatever n.
        wanted = [PageRequest(seed, page, sizes[page - 1]) for page in todo]
        fetch = functools.partial(fetch_and_keep, session, settings, gate=gate, kept=kept)
        with contextlib.closing(in_parallel(fetch, wanted, settings.concurrency)) as answers:
            for page, rows in in_parallel(stage, answers, min(settings.concurrency, STAGERS)):
                progress.advance(page, rows)
    finally:
        progress.close()


def stage_kept(pages: list[tuple[int, Path]], seed: str, settings: Settings, folder: Path) -> list[int]:
    """Check and stage kept answers, as a live run stages fetched ones; the users each page holds."""
    sizes = []
    for page, path in pages:
        body = read_kept(path, settings.max_response_bytes)
        sizes.append(stage_body(Answer(body), PageRequest(seed, page, None), settings, folder, replayed=True)[1])
    return sizes
