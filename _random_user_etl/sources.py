"""A run's page sources: the service, asked page by page in parallel; or the raw answers a run kept, read back with no network."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from pathlib import Path
import random_user_config as config
from _random_user_etl.shown import shorten
from _random_user_etl.answer import PageRequest, answer_info
from _random_user_etl.client import Service, page_sizes
from _random_user_etl.errors import AnswerError, EtlError, StorageError, failing_as, on_page
from _random_user_etl.progress import Progress
from _random_user_etl.raw import check_not_staging, clear_stale_raw, keep_landed_raw, kept_folder, kept_pages, read_kept, save_raw
from _random_user_etl.staging import pending_pages
from _random_user_etl.run import Fetched, Run, in_parallel
from _random_user_etl.wire import Answer, unpack

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


class ServicePages:
    """The pages of a run asked of the service: resumed from trusted staged parts, fetched `concurrency` at once, raw answers kept."""

    origin = "service"
    resumable = True

    def __init__(self, service: Service | None = None):
        self.given = service  # one given (a test's transport); else each run makes its own from its settings and stop
        self.service: Service | None = None  # the open run's
        self.first: Answer | None = None  # page 1, when it was asked for with no seed to learn the one the service picks
        self.kept: Path | None = None  # the seed's raw folder, when raw answers are kept

    @contextlib.contextmanager
    def opened(self, run: Run):
        """While held, the run's service is open, its seed known (asking for page 1 if the service is to pick it), its page sizes set."""
        service = self.given or Service(run.settings, run.stop)
        with service:
            self.service = service
            run.sizes = page_sizes(run.settings.n, run.settings.page_size)
            run.seed = run.settings.seed or self.picked_seed(run.sizes[0])
            self.kept = kept_folder(run.settings.raw_dir, run.seed)  # refused now, before any page is fetched, if it is not ours
            yield

    def picked_seed(self, results: int) -> str:
        """Ask for page 1 with no seed and take the seed the service picked (its answer is staged as page 1)."""
        assert self.service is not None
        answer = self.service.fetch_page(PageRequest(None, 1, results))
        try:
            seed = answer_info(unpack(answer, self.service.settings.max_response_bytes)).get("seed")  # the transform checks the rest
        except EtlError as exc:
            raise on_page(exc, 1) from exc
        if not seed:
            raise AnswerError("the service picked no seed (info.seed missing)", page=1)
        if not config.SEED_PATTERN.fullmatch(seed):
            raise AnswerError(f"the service's seed '{shorten(seed)}' is not safe as a file name", page=1)
        self.first = answer
        return seed

    def pending(self, run: Run) -> list[PageRequest]:
        """The pages no trusted part holds; a picked seed whose batch has landed is refused first."""
        if self.first is not None and run.sink.holds(run.seed):
            raise StorageError(
                f"the service picked it, and a picked seed never replaces a batch (give --seed {run.seed} to land it again)",
                path=run.sink.where(run.seed),
                doing=f"a batch of seed {run.seed} is already at",
            )
        todo = pending_pages(run.folder, run.settings, run.seed, run.sizes)
        if self.kept is not None:
            clear_stale_raw(self.kept, todo)
        if len(todo) < len(run.sizes):
            log.info("resuming seed %s: %d of %d pages already staged", run.seed, len(run.sizes) - len(todo), len(run.sizes))
        wanted = [PageRequest(run.seed, page, run.sizes[page - 1]) for page in todo]
        if self.first is not None and wanted and wanted[0].page == 1:
            # The answer that picked the seed is staged first, alone: if it fails its check, no other page is asked for.
            run.stage_page(Fetched(wanted[0], self.first, save_raw(self.kept, 1, self.first)))
            wanted = wanted[1:]
        self.first = None  # its memory is not held for the rest of the run
        return wanted

    def answers(self, run: Run, wanted: list[PageRequest]) -> Generator[Fetched]:
        """The wanted pages' answers as they come, `concurrency` asked at once."""
        # `concurrency` threads wait on the network while at most STAGERS pages are typed, so memory
        # holds a bounded number of bodies and typed pages, whatever n.
        with contextlib.closing(in_parallel(self.fetch, wanted, run.settings.concurrency, run.stop)) as fetched:
            yield from fetched

    def fetch(self, request: PageRequest) -> Fetched:
        """Fetch one page and keep its raw answer: the part of a page's work that waits on the network."""
        assert self.service is not None and request.page is not None  # every page fetched to stage is asked for by number
        answer = self.service.fetch_page(request)
        return Fetched(request, answer, save_raw(self.kept, request.page, answer))

    def progress(self, run: Run, todo: list[PageRequest]) -> Progress:
        """A bar or a line per page, counting the users staged by an earlier run as done."""
        assert self.service is not None
        done = run.settings.n - sum(request.results or 0 for request in todo)
        return Progress(run.settings.n, len(run.sizes), done, self.service.gate)

    def staged(self, run: Run) -> None:
        """Nothing more to check: each page was checked to hold the users asked for."""

    def failed(self, run: Run, exc: EtlError) -> EtlError:
        """A failed page ends the run as it is: the pages staged before it stay for the next run."""
        return exc

    def landed(self, run: Run) -> None:
        """The batch's accepted raw answers become its kept pages, which replay reads."""
        if self.kept is not None:
            with failing_as(f"landed {run.sink.where(run.seed)}, but cannot keep its raw answers in", self.kept):
                keep_landed_raw(self.kept, len(run.sizes))


class KeptPages:
    """The pages of a seed's kept raw folder (or one saved answer), read back and checked as a live run's, with no network."""

    origin = "replay"  # a replayed page says nothing of the nationalities or page size it was asked with
    resumable = False  # a kept answer is read again whole: no part stands in for one

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.pages: list[tuple[int, Path]] = []

    @contextlib.contextmanager
    def opened(self, run: Run):
        """While held, the kept pages are listed and the run's seed is theirs."""
        check_not_staging(self.source, run.settings.output_dir)
        run.seed, self.pages = kept_pages(self.source, run.settings.max_response_bytes)
        yield

    def pending(self, run: Run) -> list[PageRequest]:
        """Every kept page."""
        return [PageRequest(run.seed, page, None) for page, _ in self.pages]

    def answers(self, run: Run, wanted: list[PageRequest]) -> Generator[Fetched]:
        """Each kept answer, read under the live size bound."""
        paths = dict(self.pages)
        for request in wanted:
            assert request.page is not None
            yield Fetched(request, Answer(read_kept(paths[request.page], run.settings.max_response_bytes)))

    def progress(self, run: Run, todo: list[PageRequest]) -> None:
        """No progress lines: a replay reads from disk in moments."""

    def staged(self, run: Run) -> None:
        """The users each page held, which must be one run's pages: every page but the last full, as a live run asked for them."""
        sizes = [run.staged_rows[page] for page, _ in self.pages]
        if not sum(sizes) or any(size != sizes[0] for size in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise StorageError(f"the kept pages hold {sizes} users, not one run's pages", path=self.source, doing="cannot replay")
        run.sizes = sizes
        log.info("replayed %d kept page%s of seed %s", len(sizes), "" if len(sizes) == 1 else "s", run.seed)

    def failed(self, run: Run, exc: EtlError) -> EtlError:
        """The failure said of the replayed source."""
        return type(exc)(str(exc), path=self.source, doing="cannot replay")

    def landed(self, run: Run) -> None:
        """Nothing to keep: the kept answers are where they were."""
