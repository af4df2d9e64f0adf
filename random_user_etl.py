"""Random User ETL: fetch fake people from randomuser.me, type them with Polars, land parquet.

    python random_user_etl.py --n 500 --seed demo
    >>> from random_user_etl import read_processed
    >>> read_processed().filter(pl.col("nationality") == "GB").collect()

This module is the job as it runs: settings, extract, transform, load, read, CLI. The machinery
lives in the private package _random_user_etl, one module per part: run (one run, from a page
source to a sink), sources (the service, or kept raw answers), client and wire (the HTTP), answer
and contract (the transform), staging, sort, folders and raw (what a run keeps on disk), store and
objects (where a batch lands), delta (the lake as one Delta table), lake (reading it back), stop
(ending a run). run(), replay(), compact() and read_processed() are what analysts import; the CLI
is a thin layer over them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import difflib
import functools
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

import polars as pl

import random_user_config as config
from _random_user_etl.places import is_remote, lies_in
from _random_user_etl import pseudonym
from _random_user_etl.objects import store_options
from _random_user_etl.shown import LINE_LIMIT, address_secrets, shorten, shown_url, shown_urls_in, without_secrets
from random_user_config import Settings, SettingsError
from schemas import OUTPUT_SCHEMA
from _random_user_etl.answer import PageRequest
from _random_user_etl.contract import transform  # one answer body in, the contract frame out
from _random_user_etl.errors import EtlError, Stopped, write_error
from _random_user_etl.delta import Compacted, scan_table, table_address
from _random_user_etl.delta import compact as compact_table
from _random_user_etl.lake import BATCH_GLOB, lake_batches, lake_folder, scan_batches
from _random_user_etl.run import Batch, Run
from _random_user_etl.sources import KeptPages, ServicePages
from _random_user_etl.stop import Stop
from _random_user_etl.wire import Fault
from _random_user_etl import __version__

__all__ = [
    "Batch",
    "EtlError",
    "PageRequest",
    "Stop",
    "Stopped",
    "compact",
    "main",
    "pseudonymise",
    "read_processed",
    "read_pseudonymised",
    "replay",
    "run",
    "transform",
]

log = logging.getLogger("random_user_etl")


# ---------------------------------------------------------------- extract, transform, load


def run(settings: Settings | None = None, stop: Stop | None = None, **overrides) -> Batch:
    """Fetch, transform and land one batch: run() with the defaults, or run(n=500, seed="demo"); stop.stop() from any thread ends it."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    return Run(settings, ServicePages(), stop).land()


def replay(source: str | Path, settings: Settings | None = None, stop: Stop | None = None, **overrides) -> Batch:
    """Rebuild a seed's batch from its kept raw answers alone, with no network at all."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    return Run(settings, KeptPages(source), stop).land()


def compact(settings: Settings | None = None, stop: Stop | None = None, **overrides) -> Compacted:
    """Merge the Delta table's small files in one commit, then vacuum the files no version within --retain-hours needs."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    done = compact_table(settings, store_options(settings) if is_remote(settings.output_dir) else None, stop)
    log.info(
        "compacted %s: %d files into %d, version %d; vacuumed %d files",
        table_address(settings.output_dir),
        done.files_before,
        done.files_after,
        done.version,
        done.vacuumed,
    )
    return done


# ---------------------------------------------------------------- read


def read_processed(
    output_dir: str | None = None, storage_options: dict | None = None, unique_users: bool = False, version: int | str | dt.datetime | None = None
) -> pl.LazyFrame:
    """Every batch ever landed (its Delta table's, if it has one: at `version`, a number or a time), as one lazy frame with the output schema; with unique_users, each user once."""
    if output_dir == "":
        raise SettingsError("read_processed's output_dir is empty; leave it out for the default lake")
    output_dir = config.lake_address(output_dir) if output_dir else config.setting_value("output_dir")
    if is_remote(output_dir):
        config.check_s3_address(output_dir)  # the addresses a run lands in, and no other: a gs:// would ask a metadata service
    table = scan_table(output_dir, storage_options, version)
    if table is not None:
        lake = table
    elif version is not None:
        raise SettingsError(f"read_processed's version reads a Delta table, and {shorten(output_dir)} holds none")
    elif is_remote(output_dir):
        # Given the schema, Polars reads a glob that matches no object as an empty frame, so an
        # empty prefix is an empty lake without listing the bucket here: nothing is read until collect.
        source = f"{output_dir.rstrip('/')}/{BATCH_GLOB}"
        lake = scan_batches(source, storage_options)
    else:
        batches = lake_batches(lake_folder(output_dir))  # each file read as named, its footer checked
        lake = scan_batches(batches) if batches else OUTPUT_SCHEMA.to_frame().lazy()
    return latest_per_user(lake) if unique_users else lake


def latest_per_user(lake: pl.LazyFrame) -> pl.LazyFrame:
    """Each user_id once: its row ingested last (a tie goes to the larger seed, then the larger page)."""
    # The service's page k of seed S is page 1 of seed S followed by k's digits ("demo" page 2 is
    # "demo2" page 1), so two batches of one lake can hold the same person.
    return lake.sort("ingested_at", "seed", "page").unique("user_id", keep="last", maintain_order=True)


# ---------------------------------------------------------------- the analyst lake


def pseudonymise(target: str, settings: Settings | None = None, stop: Stop | None = None, **overrides) -> dict[str, bool]:
    """Build or refresh the analyst lake in `target` from the lake in --output-dir, under the key in RANDOM_USER_PSEUDONYM_KEY(_FILE); each analyst file, and whether it was built."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    target = checked_target(target, settings)
    key = pseudonym.load_key(os.environ)  # before anything is written: a missing or short key is a bad setting
    return pseudonym.refresh(settings, target, key, store_options(settings), stop or Stop())


def checked_target(target: str, settings: Settings) -> str:
    """The analyst lake's address, spelt as a lake's is; refused if it is no place a lake may be, or overlaps the lake itself."""
    config.check_path_text("--pseudonymise", target)
    if target == "":
        raise SettingsError("--pseudonymise names no place for the analyst lake")
    target = config.lake_address(target)
    config.check_output_address("--pseudonymise", target)
    # Analysts are given the target, never the lake or the raw answers: none may hold another.
    for name in ("output_dir", "raw_dir"):
        place = getattr(settings, name)
        if place is not None and overlapping(target, place):
            raise SettingsError(f"--pseudonymise '{shorten(target)}' overlaps {config.describe(name)} '{shorten(place)}': keep the analyst lake apart")
    return target


def overlapping(target: str, place: str) -> bool:
    """True when one of two places is, or lies inside, the other: local folders resolved, object-storage prefixes as spelt."""
    if is_remote(target) or is_remote(place):
        return target == place or (target + "/").startswith(place + "/") or (place + "/").startswith(target + "/")
    return lies_in(target, place) or lies_in(place, target)


def read_pseudonymised(target: str, storage_options: dict | None = None) -> pl.LazyFrame:
    """The analyst table in `target` if it has one, else every analyst file in it, as one lazy frame (empty if it holds none)."""
    if not target:
        raise SettingsError("read_pseudonymised needs the analyst lake's folder or s3:// address")
    target = config.lake_address(target)
    if is_remote(target):
        config.check_s3_address(target)
    return pseudonym.read_analyst_lake(target, storage_options)


# ---------------------------------------------------------------- CLI


EPILOG = """\
Every flag has an environment variable (shown in brackets); a flag beats its variable.

examples (python random_user_etl.py takes the same flags):
  random-user-etl --n 500 --seed demo
      500 users of seed demo into ./processed_data, their raw answers into ./raw_data
  RANDOM_USER_OUTPUT_DIR=s3://bucket/lake random-user-etl --seed 'daily-{date}'
      one batch a day in object storage (the AWS_* variables give its credentials)
  random-user-etl --replay raw_data/demo
      rebuild seed demo's batch from its kept raw answers, with no network
  RANDOM_USER_PSEUDONYM_KEY_FILE=/run/secrets/key random-user-etl --pseudonymise analyst_data
      the analyst lake: one pseudonymised, k-anonymous file per batch of ./processed_data

exit status:
  0    the batch landed
  1    the run failed (service, network or storage): nothing landed, earlier batches untouched
  2    bad settings, refused before any request
  130  stopped by SIGINT (Ctrl-C): staged pages are kept and the next run resumes
  143  stopped by SIGTERM (docker stop, Kubernetes): as for 130
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, exit status 2, and names the real flag nearest an unknown one."""

    def parse_args(self, args=None, namespace=None):
        """argparse's parse_args, with a hint for an unknown flag."""
        known, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self.nearest_flag(unknown)}")
        return known

    def nearest_flag(self, unknown: list[str]) -> str:
        """'; did you mean --seed?' for the first unknown flag that is close to a real one, else ''."""
        flags = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        for word in unknown:
            close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1) if word.startswith("--") else []
            if close:
                return f"; did you mean {close[0]}?"
        return ""

    def error(self, message):
        """Say what is wrong in one line and exit 2: what was typed shown escaped, any address in it without its secrets."""
        self.exit(2, f"{self.prog}: error: {shorten(shown_urls_in(message), LINE_LIMIT)} (see --help)\n")


def build_parser(prog: str = "random_user_etl.py") -> argparse.ArgumentParser:
    """Flags for every setting, read from the settings table in random_user_config."""
    parser = OneLineParser(
        prog=prog,
        description="Fetch fake people from randomuser.me and land them as one parquet file per seed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's examples and statuses keep their lines
        allow_abbrev=False,  # --output is not --output-dir: a prefix taken for a flag would run with settings never asked for
    )
    defaults = Settings()
    for setting in config.SETTINGS:
        # argparse reads "%" in a help text as a format: a default path may hold one.
        help_text = config.help_text(setting, defaults).replace("%", "%%")
        parser.add_argument(setting.flag, dest=setting.name, help=help_text, **setting.flag_options)
    parser.add_argument(
        "--replay",
        metavar="PATH",
        help="rebuild a batch with no network from kept raw answers: a <raw-dir>/<seed> folder or one saved answer (.json or .json.gz)",
    )
    parser.add_argument(
        "--pseudonymise",
        metavar="TARGET",
        help="build or refresh the analyst lake in TARGET (a folder or s3://bucket/prefix) from the lake in --output-dir, "
        "under the key in RANDOM_USER_PSEUDONYM_KEY_FILE or RANDOM_USER_PSEUDONYM_KEY",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="instead of a run: merge the Delta table's small files, then remove the files no version within --retain-hours needs",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail, and what caused a failure")
    parser.add_argument("--version", action="version", version=f"random-user-etl {__version__}")
    return parser


def configure_logging(verbose: bool) -> OneLineFormatter:
    """Log lines to stderr, one per event, each escaped and bounded; only the job's own, and with -v urllib3's and warnings'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(functools.partial(job_record, verbose=verbose))
    formatter = OneLineFormatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    logging.getLogger("urllib3").setLevel(logging.DEBUG if verbose else logging.ERROR)
    # A library's warnings (Polars' Rust side raises its own as Python warnings) become records,
    # which the filter drops unless -v, instead of text of their own on stderr.
    logging.captureWarnings(True)
    return formatter


class OneLineFormatter(logging.Formatter):
    """Each record as one line with every unprintable character escaped (shorten) and no secret of --api-url; a traceback (with -v) line by line."""

    secrets: tuple[str, ...] = ()  # the --api-url's pieces no line may hold (address_secrets), once the settings are read

    def line(self, text: str) -> str:
        """One line of output: the address's secrets hidden, then escaped and bounded."""
        return shorten(without_secrets(text, self.secrets), LINE_LIMIT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line: a newline or an escape code in a value cannot make another line or reach the terminal."""
        return self.line(super().formatMessage(record))

    def formatException(self, ei) -> str:
        """A traceback, each of its lines escaped."""
        return "\n".join(self.line(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        """A stack, each of its lines escaped."""
        return "\n".join(self.line(line) for line in super().formatStack(stack_info).split("\n"))


SHOWN_WITH_VERBOSE = ("urllib3", "py.warnings")  # the loggers besides the job's that -v lets through


def job_record(record: logging.LogRecord, verbose: bool) -> bool:
    """True for the job's records; with -v also urllib3's (addresses shown by shown_url) and warnings', never one that carries an exception."""
    # Any other library's record is not the job's line: boto's credential notice, and with -v its
    # debug lines, which carry request headers. urllib3 logs headers it cannot parse (a header line may
    # be a person) with the exception and its traceback.
    if record.name == log.name:
        return True
    if not verbose or not record.name.startswith(SHOWN_WITH_VERBOSE):
        return False
    args = record.args if isinstance(record.args, tuple) else ()
    if record.exc_info or any(isinstance(arg, BaseException) for arg in args):
        return False
    if record.name.startswith("urllib3"):  # it logs each request's path and query: a token in --api-url's query is in it
        record.args = tuple(shown_url(arg) if isinstance(arg, str) and ADDRESS.match(arg) else arg for arg in args)
    return True


ADDRESS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|/")  # an argument of a library's record that is a URL or a path


@contextlib.contextmanager
def stop_on_signals(stop: Stop):
    """SIGINT and SIGTERM stop the run promptly (as PID 1 of a container, SIGTERM reaches a process only through a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers: a caller elsewhere keeps its own
        return

    def on_stop_signal(signum: int, frame) -> None:
        """Stop every wait and request of the run, and unwind the main thread; a second signal changes nothing."""
        if stop.ending:  # stopped already, or a failed page is winding the run down: that failure is the run's line
            return
        stop.stop(signum)
        raise Stopped(signum)

    # Set after `import polars`, which puts a SIGINT handler of its own in Python's place: with it, a
    # Ctrl-C reached Python only when the main thread next woke, which could be a whole page later.
    previous = {signum: signal.signal(signum, on_stop_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stop.noting_signals():  # a Polars call the main thread waits in sees a signal too (Stop.check)
            yield
    finally:
        for signum, handler in previous.items():
            # After a stop the process is leaving: a later signal must not change its status or line.
            signal.signal(signum, signal.SIG_IGN if stop.asked else handler)


def log_causes(exc: BaseException) -> None:
    """With -v, what an error was caused by: the job's own errors by their line, anything else by its class alone."""
    cause = exc.__cause__
    while cause is not None:
        # Another library's text can carry the answer's bytes (a transport fault's status line, a JSON value).
        said = str(cause) if isinstance(cause, (EtlError, Fault)) else "its text is not logged: it can hold personal data"
        log.debug("caused by %s: %s", type(cause).__name__, said)
        cause = cause.__cause__


def main(argv: list[str] | None = None, prog: str = "random_user_etl.py") -> int:
    """Run the job from the command line, its lines said as `prog`'s; return the exit status."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    verbose, source, target, compacting = args.pop("verbose"), args.pop("replay"), args.pop("pseudonymise"), args.pop("compact")
    formatter = configure_logging(verbose)
    try:
        settings = config.load_settings(args)
        config.check_path_text("--replay", source)
        key = analyst_key(target, source, settings)
        if compacting and (source or target is not None):
            raise SettingsError("--compact is a job of its own: give it without --replay or --pseudonymise")
    except SettingsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    # A service's error message, or a library's words, can repeat a key of the address it was given.
    formatter.secrets = address_secrets(settings.api_url) + key
    stop = Stop()
    with stop_on_signals(stop):  # held while the last line is printed: a second signal cannot cut it
        try:
            if compacting:
                compact(settings, stop)
            elif target is not None:
                pseudonymise(target, settings, stop)
            else:
                replay(source, settings, stop) if source else run(settings, stop)
        except EtlError as exc:
            log_causes(exc)
            print(f"{parser.prog}: error: {formatter.line(str(exc))}", file=sys.stderr)
            return 1
        # A bug, not bad input: still one line, and -v shows the traceback. A panic inside Polars is
        # raised as a BaseException, so it is named here too.
        except (Exception, pl.exceptions.PanicException) as exc:
            log.debug("unexpected failure", exc_info=True)
            print(f"{parser.prog}: error: unexpected {type(exc).__name__}: {formatter.line(write_error(exc))} (run with -v for details)", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            kept = "the analyst files built so far are kept and the next run builds the rest" if target is not None else STOPPED_RUN_KEEPS
            kept = STOPPED_COMPACTION_KEEPS if compacting else kept
            print(f"{parser.prog}: stopped by {signal.Signals(signum).name}; {kept}", file=sys.stderr)
            return 128 + signum
    return 0


STOPPED_RUN_KEEPS = "staged pages are kept and the next run resumes"  # what a stopped run or replay leaves
STOPPED_COMPACTION_KEEPS = "the table is as its last commit left it"  # a compaction is one commit, then the vacuum


def analyst_key(target: str | None, source: str | None, settings: Settings) -> tuple[str, ...]:
    """For --pseudonymise, its target and key checked before anything is written; the key's text, which no line may hold."""
    if target is None:
        return ()
    if source is not None:
        raise SettingsError("--pseudonymise and --replay are two jobs; give one")
    checked_target(target, settings)
    return (os.fsdecode(pseudonym.load_key(os.environ).secret),)  # as the variable, or the file, spells it


def exit_now(status: int) -> None:
    """Leave the process with `status`; after a stop, without waiting for workers still in a connect."""
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # A connect under way has no socket yet for the deadline to shut, so a worker may sit in it
        # for --timeout; what the run staged is already in place (every file is moved in whole).
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def cli() -> None:
    """The `random-user-etl` command: the same as `python random_user_etl.py`, its lines said by that name."""
    exit_now(main(prog="random-user-etl"))


if __name__ == "__main__":
    exit_now(main())
