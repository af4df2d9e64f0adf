"""The raw archive: answers kept as received, named after their verdict, promoted once their batch lands, read by replay."""

from __future__ import annotations

import gzip
import os
import re
import stat
from pathlib import Path
from _random_user_etl.places import lies_in, staging_root
from _random_user_etl.shown import shorten
from _random_user_etl.answer import answer_info
from _random_user_etl.errors import EtlError, StorageError, failing_as
from _random_user_etl.folders import found_own_folder, own_folder, write_atomically
from _random_user_etl.wire import Answer, too_large, unpack, wire_limit


# A kept answer: accepted-page-N until its batch lands (then page-N, what replay reads), rejected-page-N if refused.
KEPT_PAGE = re.compile(r"(accepted-|rejected-)?page-([0-9]{5})\.json\.gz")


def save_raw(folder: Path | None, page: int, answer: Answer) -> Path | None:
    """Keep the answer exactly as received, gzip-compressed, in the seed's raw folder (kept_folder), before it is transformed."""
    if folder is None:
        return None
    # Named "unchecked" until the transform accepts it, so a bad answer never replaces a good one.
    path = folder / f"unchecked-page-{page:05d}.json.gz"
    with failing_as("cannot keep the raw answer in", folder, by_filename=True):
        own_folder(folder)  # made (or found ours) as a page is kept: a run that keeps none leaves no folder
        # The service's own gzip bytes when it sent them: the same body, and no CPU spent again.
        packed = answer.wire if answer.gzipped else gzip.compress(answer.wire, compresslevel=1, mtime=0)
        write_atomically(path, lambda file: file.write(packed))  # 0600: it holds the credentials sent
    return path


def settle_raw(path: Path | None, accepted: bool) -> None:
    """Name a kept answer after its check: accepted-page-N (page-N once its batch lands) or rejected-page-N."""
    if path is not None:
        name = path.name.removeprefix("unchecked-")
        settled = path.with_name(f"accepted-{name}" if accepted else f"rejected-{name}")
        with failing_as("cannot keep the raw answer as", settled):
            os.replace(path, settled)


def kept_folder(raw_dir: str | None, seed: str) -> Path | None:
    """The seed's raw folder (None when raw answers are not kept); refused now if it is a link, a file or another's."""
    if raw_dir is None:
        return None
    folder = Path(raw_dir) / seed
    with failing_as("cannot keep the raw answer in", raw_dir):
        found_own_folder(folder)  # refused before any page is fetched, if it is there and not ours
    return folder


def clear_stale_raw(folder: Path, todo: list[int]) -> None:
    """Under the seed's lock: drop temp files, unchecked answers, and accepted answers of pages fetched again."""
    # The kept pages (page-N) stay: they are the landed batch's, until a new batch lands (keep_landed_raw).
    again = set(todo)
    for path in folder.glob("*"):
        match = KEPT_PAGE.fullmatch(path.name)
        accepted_again = match is not None and match.group(1) == "accepted-" and int(match.group(2)) in again
        if path.name.endswith(".tmp") or path.name.startswith("unchecked-") or accepted_again:
            path.unlink(missing_ok=True)  # a link is removed as a link, never followed


def keep_landed_raw(folder: Path, pages: int) -> None:
    """Once a batch has landed: its accepted answers become the kept pages replay reads; pages past its last go."""
    # Without the pruning, an earlier, larger run of the seed would leave pages that a replay then lands.
    for path in folder.glob("*"):
        match = KEPT_PAGE.fullmatch(path.name)
        if match and int(match.group(2)) > pages:
            path.unlink(missing_ok=True)
        elif match and match.group(1) == "accepted-":
            os.replace(path, path.with_name(path.name.removeprefix("accepted-")))


def kept_pages(source: Path, limit: int) -> tuple[str, list[tuple[int, Path]]]:
    """The seed and the numbered pages of a kept raw folder, or of one saved answer."""
    if not source.exists():
        raise StorageError("no such folder or file", path=source, doing="nothing to replay at")
    if not source.is_dir():
        try:
            info = answer_info(read_kept(source, limit))  # the transform checks the rest when it lands
        except EtlError as exc:
            raise StorageError(str(exc), path=source, doing="cannot replay") from exc
        if not info.get("seed"):
            raise StorageError("the answer names no seed (info.seed), so it cannot be landed", path=source)
        page = int(info.get("page") or 1)
        if page != 1:
            raise StorageError(
                f"it is page {page} of seed '{shorten(info['seed'])}', and a batch starts at page 1; replay the seed's kept folder instead",
                path=source,
                doing="cannot replay",
            )
        return info["seed"], [(page, source)]
    numbered = {}
    with failing_as("cannot replay", source):
        names = os.listdir(source)
    for name in names:
        match = KEPT_PAGE.fullmatch(name)
        if match and match.group(1) is None:  # page-N only: accepted- and rejected- answers are not the batch's
            numbered[int(match.group(2))] = source / name
    if not numbered:
        raise StorageError("no page-NNNNN.json.gz files", path=source, doing="nothing to replay in")
    missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
    if missing:
        raise StorageError(f"page {missing[0]} of {max(numbered)} is missing", path=source, doing="cannot replay")
    return source.name, sorted(numbered.items())


def read_kept(path: Path, limit: int) -> bytes:
    """A kept answer's body, gunzipped if it was kept compressed, under the same size bound as a live one."""
    gzipped = path.name.endswith(".gz")
    most = wire_limit(limit, gzipped)
    with failing_as("cannot read kept answer", path, catching=(OSError, EtlError)):
        # Opened without blocking and read only if regular: a FIFO or a device would hang or never end.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StorageError("not a regular file")
            if info.st_size > most:
                raise too_large(limit)
            wire = handle.read(most + 1)
        if len(wire) > most:  # grew since it was measured
            raise too_large(limit)
        return unpack(Answer(wire, gzipped), limit)


def check_not_staging(source: Path, output_dir: str) -> None:
    """Refuse a replay source in the output's staging folder: replay clears the seed's staging folder first."""
    if lies_in(source, staging_root(output_dir)):
        raise StorageError(
            f"it lies in the staging folder {staging_root(output_dir)} of the output, which a run clears; copy the kept answers elsewhere and replay the copy",
            path=source,
            doing="cannot replay",
        )
