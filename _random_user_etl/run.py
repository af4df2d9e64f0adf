"""One run: pages from a source, typed and staged in parallel, checked and sorted, then landed by a sink as one batch."""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Protocol
import polars as pl
from random_user_config import Settings
from schemas import UTC_INSTANT
from _random_user_etl.answer import PageRequest
from _random_user_etl.contract import transform
from _random_user_etl.errors import EtlError, RefusedPages, StorageError, failing_as, on_page
from _random_user_etl.progress import Progress
from _random_user_etl.raw import settle_raw
from _random_user_etl import sort
from _random_user_etl.sort import SCATTER_ROWS, SORT_RUN_ROWS, ExternalSort
from _random_user_etl.staging import part_identity, part_path, quality_report, sort_folder, stage_part, staging_for
from _random_user_etl.stop import Stop
from _random_user_etl.store import Sink, SortedBatch, sink_for
from _random_user_etl.wire import Answer, unpack

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


STAGERS = 2  # pages unpacked and typed at once: both cores of a small machine, and a bounded peak


STAGING_FAILURES = (OSError, pl.exceptions.PolarsError)  # what writing a part, a key range or the batch can raise


@dataclasses.dataclass
class Batch:
    """What a run landed: pages_fetched its source gave this run (kept answers, for a replay), pages_reused an earlier run staged."""

    path: str
    seed: str
    rows: int
    bytes: int
    seconds: float
    pages_fetched: int
    pages_reused: int
    report: dict


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One page's answer as a source gives it: what was asked, the bytes, and where its raw copy is kept (if it is)."""

    request: PageRequest
    answer: Answer
    raw: Path | None = None


class PageSource(Protocol):
    """Where a run's pages come from: the service (ServicePages) or kept raw answers (KeptPages)."""

    origin: str  # what a staged part says it came from: a part of another origin is never reused
    resumable: bool  # whether parts an earlier run staged may stand in for pages (else the staging starts empty)

    def opened(self, run: Run) -> contextlib.AbstractContextManager:
        """While held, the source is ready and run.seed is set (and run.sizes, where known before staging)."""

    def pending(self, run: Run) -> list[PageRequest]:
        """Under the seed's lock: the pages still to stage, once what will not be used is cleared."""

    def answers(self, run: Run, wanted: list[PageRequest]) -> Generator[Fetched]:
        """The answers of the wanted pages, in any order."""

    def progress(self, run: Run, todo: list[PageRequest]) -> Progress | None:
        """What counts the pages as they are staged, if anything."""

    def staged(self, run: Run) -> None:
        """Every page is staged: refuse pages that cannot be one batch together."""

    def failed(self, run: Run, exc: EtlError) -> EtlError:
        """The error a failed page's staging ends the run with."""

    def landed(self, run: Run) -> None:
        """The batch has landed: what the source keeps of it (the raw answers) is settled."""


@dataclasses.dataclass(frozen=True)
class SortSizes:
    """The external sort's sizes: rows sorted in memory at once, and rows split into key ranges together."""

    run_rows: int = SORT_RUN_ROWS
    group_rows: int = SCATTER_ROWS


class Run:
    """One run of the job: its settings, page source, sink and stop, and once known its seed, pages, staging folder and sorter."""

    def __init__(self, settings: Settings, source: PageSource, stop: Stop | None = None, sort_sizes: SortSizes = SortSizes(), sink: Sink | None = None):
        self.settings, self.source, self.stop, self.sort_sizes = settings, source, stop or Stop(), sort_sizes
        self.sink = sink or sink_for(settings, self.stop)
        self.started = time.monotonic()
        self.seed = ""
        self.sizes: list[int] = []  # each page's users: asked for, or (replay) as staged
        self.folder = Path()
        self.sorter: ExternalSort | None = None
        self.staged_rows: dict[int, int] = {}  # the users of each page this run staged; the rest were staged by an earlier one

    def land(self) -> Batch:
        """Stage every page the source gives, then land them as one batch through the sink."""
        self.stop.begin()  # a caller may keep one Stop for its runs one after another
        self.sink.check()  # before the first request: a missing bucket or credentials must not wait until every page is fetched
        with self.source.opened(self), staging_for(self.settings, self.seed, self.source.resumable, self.stop.hold) as folder:
            self.folder = folder
            if self.sizes:  # known before staging: its key ranges are split while the run still waits on the network
                self.sorter = self.new_sorter(sum(self.sizes))
            with self.failing_as_source():
                todo = self.source.pending(self)
                self.stage_all(todo)
            self.source.staged(self)
            return self.finish()

    @contextlib.contextmanager
    def failing_as_source(self):
        """A page's failure said as the source says it (a replay names its kept answers)."""
        try:
            yield
        except EtlError as exc:
            said = self.source.failed(self, exc)
            if said is exc:
                raise
            raise said from exc

    def new_sorter(self, rows: int) -> ExternalSort:
        """The external sort of this run's `rows` rows, in the staging folder."""
        return sort.ExternalSort(sort_folder(self.folder), rows, self.sort_sizes.run_rows, self.sort_sizes.group_rows, self.stop)

    def stage_all(self, todo: list[PageRequest]) -> None:
        """Stage every page in `todo`: at most STAGERS typed at once while the source fetches ahead."""
        progress = self.source.progress(self, todo)
        try:
            with contextlib.closing(self.source.answers(self, todo)) as answers:
                for page, rows in in_parallel(self.stage_page, answers, min(self.settings.concurrency, STAGERS), self.stop):
                    if progress is not None:
                        progress.advance(page, rows)
        finally:
            if progress is not None:
                progress.close()

    def stage_page(self, fetched: Fetched) -> tuple[int, int]:
        """Unpack, transform and stage one answer, name its kept raw copy after the verdict, and hand it to the sort."""
        request = fetched.request
        assert request.seed is not None and request.page is not None  # a staged page is always asked for by seed and number
        self.stop.check()  # kept answers and resumed pages need no network, which is where a stop is otherwise seen
        try:
            frame = transform(unpack(fetched.answer, self.settings.max_response_bytes), request)
        except EtlError as exc:
            settle_raw(fetched.raw, accepted=False)
            raise on_page(exc, request.page) from exc
        settle_raw(fetched.raw, accepted=True)
        identity = part_identity(self.settings, request.seed, request.page, frame.height, self.source.origin)
        with failing_as("cannot stage in", self.folder, request.page, STAGING_FAILURES):
            stage_part(self.folder, frame, identity)
        if self.sorter is not None:
            with failing_as("cannot split into key ranges in", self.folder, request.page, STAGING_FAILURES):
                self.sorter.add(part_path(self.folder, request.page), frame.height)
        self.staged_rows[request.page] = frame.height
        return request.page, frame.height

    def finish(self) -> Batch:
        """Land the batch from its staged parts, let the source keep what it keeps, clear the staging, say what landed."""
        self.stop.check()  # every page may have been staged before the run began: nothing else looks before the sort
        parts = [part_path(self.folder, page) for page in range(1, len(self.sizes) + 1)]
        destination = self.sink.where(self.seed)
        try:
            batch = sorted_batch(parts, self.sizes, self.sorter or self.new_sorter(sum(self.sizes)), self.seed)
            with failing_as("cannot write", destination, catching=STAGING_FAILURES):
                size = self.sink.land(batch)
        except RefusedPages as exc:
            for page in exc.pages:  # reused as they are, they would be refused again by every rerun
                part_path(self.folder, page).unlink(missing_ok=True)
            raise
        self.source.landed(self)  # before the staging is cleared: a run killed in between lands (and keeps) again
        seconds = time.monotonic() - self.started
        rows = batch.report["rows"]
        log.info("landed %d rows, seed %s, file %s, %d bytes, %.2fs", rows, self.seed, destination, size, seconds)
        staged = len(self.staged_rows)
        return Batch(destination, self.seed, rows, size, seconds, staged, len(self.sizes) - staged, batch.report)


def sorted_batch(parts: list[Path], sizes: list[int], sorter: ExternalSort, seed: str) -> SortedBatch:
    """Staged parts (of `sizes` users each) as one batch in key order, each user once, every row stamped with the landing's instant."""
    report, dropped = quality_report(parts)
    staged = report["rows"] + report["duplicate_users_dropped"]
    if staged != sum(sizes):
        raise StorageError(f"staged parts hold {staged} rows, expected {sum(sizes)}")
    # Each part holds its page's size: staged from an answer checked to hold it, or trusted for it.
    ordered = sorter.ordered(parts, sizes)
    if dropped.height:  # a user served on several pages, identically, lands once: from the first of them
        copies = dropped.select(pl.struct("user_id", "page")).to_series().implode()
        ordered = ordered.filter(~pl.struct("user_id", "page").is_in(copies))
    ingested_at = dt.datetime.now(dt.UTC)  # when the batch lands: every row of it, the same instant
    rows = ordered.with_columns(ingested_at=pl.lit(ingested_at, UTC_INSTANT))
    return SortedBatch(rows, seed, report, parts[0].parent, sorter.run_rows)


def in_parallel(work, items, concurrency: int, stop: Stop):
    """Run work(item) for each item, at most `concurrency` at once; yield results as they finish; a failure winds the run down."""
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
        if not stopped:
            stop.wind_down()  # wake the workers blocked on the network or a wait, so the run ends now
        raise
    finally:
        # On a stop, not waited for: a worker may sit in a connect that nothing can cut (see the script's exit).
        pool.shutdown(wait=not stopped, cancel_futures=True)
