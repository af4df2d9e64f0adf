"""Random User ETL: fetch fake people from randomuser.me, type them with Polars, land parquet.

    python random_user_etl.py --n 500 --seed demo
    >>> from random_user_etl import read_processed
    >>> read_processed().filter(pl.col("nationality") == "GB").collect()

The module reads as the job runs: settings, extract, transform, load, read, run, CLI.
Each step is a function of its arguments, so tests and analysts can call any one alone.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import datetime as dt
import email.utils
import errno
import fcntl
import fnmatch
import functools
import gzip
import http.client
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
from polars.io.plugins import register_io_source
import requests
from requests.adapters import HTTPAdapter
import urllib3
from urllib3.exceptions import InvalidChunkLength, MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError
from urllib3.poolmanager import pool_classes_by_scheme

import random_user_config as config
from random_user_config import Settings, SettingsError, is_remote, shorten, staging_root
from schemas import (
    INCLUDED_FIELDS,
    MAX_FIELD_BYTES,
    NULLABLE_COLUMNS,
    OUTPUT_SCHEMA,
    QUALITY_METADATA_KEY,
    RAW_INFO,
    RAW_RESPONSE,
    SORT_KEY,
    SOURCE_FIELDS,
    UTC_INSTANT,
)

log = logging.getLogger("random_user_etl")

BATCH_GLOB = "random_users_*.parquet"
# A kept answer: accepted-page-N until its batch lands (then page-N, what replay reads), rejected-page-N if refused.
KEPT_PAGE = re.compile(r"(accepted-|rejected-)?page-(\d{5})\.json\.gz")
PART_METADATA_KEY = "random_user_etl.part"
READ_STEP = 1 << 24  # 16 MB: an answer's bytes are read in steps of at most this
BOM = b"\xef\xbb\xbf"  # json.loads(bytes) skips a UTF-8 byte order mark; so does the transform
PART_NULLS_KEY = "random_user_etl.nulls"  # a staged page's nulls per column, counted as it was staged
SORT_RUN_ROWS = 10_000  # rows sorted in memory at once: assembly memory stays flat whatever n
SCATTER_ROWS = 20_000  # rows of staged parts split into key ranges together: fewer, larger pieces
# Scratch files of the external sort are read once, soon after: uncompressed parquet is the
# cheapest to write and read back (Arrow IPC measured slower here, zstd costs a third more).
SCRATCH = dict(compression="uncompressed", statistics=False)
# Staged parts wait on disk for a rerun, so they are compressed, at zstd's fastest level (measured
# on 100,000 users: 0.17 s to write at the default level, 0.10 s at level 1 with no statistics, and no
# larger); nothing reads them by predicate, so their statistics would go unused.
PART = dict(compression="zstd", compression_level=1, statistics=False)
# The service's own compact layout of a user, key by key. An answer written in it with no backslash
# anywhere (so no escape can hide a key or a surrogate) holds every key once in every object, and
# Polars reads it as Python's json does; any other answer is read once more by Python's json to check.
USER_LAYOUT = (
    "gender,name{title,first,last},location{street{number,name},city,state,country,postcode,"
    "coordinates{latitude,longitude},timezone{offset,description}},email,"
    "login{uuid,username,password,salt,md5,sha1,sha256},dob{date,age},registered{date,age},phone,cell,"
    "id{name,value},picture{large,medium,thumbnail},nat"
)
INFO_LAYOUT = "seed,results,page,version"
# An instant as ISO 8601 writes it and a standard reader reads it: chrono alone would also take a
# one-digit month, a space before the zone, or a leap second rolled into the next minute.
INSTANT_TEXT = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate written as an escape (a byte check)
INSTANT_COLUMNS = tuple(name for name in SOURCE_FIELDS if OUTPUT_SCHEMA[name] == UTC_INSTANT)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what is left of a lone escape once Python's json pairs the rest
STAGERS = 2  # pages unpacked and typed at once: both cores of a small machine, and a bounded peak
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"


class EtlError(Exception):
    """A run that failed for a reason worth one clear line (exit status 1)."""


@dataclasses.dataclass(frozen=True)
class PageRequest:
    """What one page should hold: a check on the answer wherever a field is not None."""

    seed: str | None
    page: int | None
    results: int | None


# ---------------------------------------------------------------- extract


RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
# Set when the run is told to stop (SIGINT, SIGTERM): every wait ends at once and every request in
# flight is cut, so the thread pools drain in moments and staged pages stay for the next run.
STOP = threading.Event()
_attempt = threading.local()  # the try each thread's requests belong to, for its connections to find
_in_flight: set = set()  # every try under way, cut at once by a stop


class Stopped(KeyboardInterrupt):
    """The run was told to stop (SIGINT or SIGTERM); staged pages are kept for the next run."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def hold(seconds: float) -> None:
    """Wait `seconds`, unless the run is told to stop first: then raise Stopped at once."""
    if STOP.wait(max(seconds, 0)):
        raise Stopped()


def stop_requests() -> None:
    """Tell the run to stop: every wait ends and every request in flight is cut."""
    STOP.set()
    for attempt in list(_in_flight):
        attempt.cut()


class RateGate:
    """Holds every worker back while the service's rate limit is waited out."""

    def __init__(self):
        self._lock = threading.Lock()
        self._resume_at = 0.0

    def pause(self, seconds: float) -> None:
        """Close the gate for everyone for `seconds`, then wait for it to open."""
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)
        self.wait()

    def wait(self) -> None:
        """Block until the gate is open; a stopped run passes no more requests through."""
        hold(0)
        while (left := self._resume_at - time.monotonic()) > 0:
            hold(left)


class Attempt:
    """One try of a request, `seconds` from connect to last byte: its socket is shut at that deadline or at a stop."""

    def __init__(self, seconds: float):
        self.connection = None
        self.expired = False
        self._timer = threading.Timer(seconds, self.cut)
        self._timer.daemon = True

    def __enter__(self) -> Attempt:
        _attempt.current = self
        _in_flight.add(self)
        self._timer.start()
        if STOP.is_set():  # a stop between the caller's check and here found no try to cut
            self.cut()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        _in_flight.discard(self)
        _attempt.current = self.connection = None

    def attach(self, connection) -> None:
        """Tie the connection this try uses to it, and cut it at once if the try is already over."""
        self.connection = connection
        if self.expired:
            self.cut()

    def cut(self) -> None:
        """End the try: shut its socket, so a read or write blocked on it returns at once."""
        self.expired = True  # before reading the connection: attach() reads them the other way round
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """Mixed into urllib3's connections: a connection in use is tied to its thread's current try."""

    def connect(self):
        super().connect()
        self._watch()

    def request(self, *args, **kwargs):
        self._watch()  # a reused connection; a new one connects inside request(), and connect() ties it
        return super().request(*args, **kwargs)

    def _watch(self) -> None:
        attempt = getattr(_attempt, "current", None)
        if attempt is not None:
            attempt.attach(self)


def watched(pool_class: type) -> type:
    """A urllib3 pool class whose connections are tied to the try under way."""
    connection = type(f"Watched{pool_class.ConnectionCls.__name__}", (_Watched, pool_class.ConnectionCls), {})
    return type(f"Watched{pool_class.__name__}", (pool_class,), {"ConnectionCls": connection})


WATCHED_POOLS = {scheme: watched(pool) for scheme, pool in pool_classes_by_scheme.items()}


class WatchedAdapter(HTTPAdapter):
    """requests' adapter on watched connections. It retries nothing itself: fetch_page holds the one retry loop."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS has pool classes of its own
            manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager


def make_session(settings: Settings) -> requests.Session:
    """One pooled, verifying session on watched connections, with no retries of its own."""
    session = requests.Session()
    adapter = WatchedAdapter(max_retries=0, pool_connections=1, pool_maxsize=max(settings.concurrency, 1))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.verify = True
    session.headers["User-Agent"] = "random-user-etl/1.0"
    session.headers["Accept-Encoding"] = "gzip"  # the one encoding read_body unpacks
    return session


def redact(url: str | None) -> str:
    """A URL fit for the log: path and query only (they hold seeds and page numbers, no PII)."""
    if not url:
        return "the request"
    return re.sub(r"^[a-z]+://[^/]+", "", url) or url


# What a transport fault is, by the first row that any exception in its chain of causes matches.
# Only the class name and these fixed words are ever logged: a fault's own text can carry the
# answer's bytes (a status line or a chunk length that is really JSON, a header that is a person).
TIMED_OUT = "timed out: no whole answer within {timeout:g}s (--timeout)"
REACH, BAD, CUT = "cannot reach {url}: {kind}", "bad answer from {url}: {kind}", "answer cut off"
FAULTS = (
    ((http.client.RemoteDisconnected,), "closed without an answer", REACH),
    ((ConnectionRefusedError,), "connection refused", REACH),
    ((socket.gaierror, NameResolutionError), "host name does not resolve", REACH),
    ((NewConnectionError,), "cannot connect", REACH),  # before the timeouts: urllib3 derives it from one
    ((TimeoutError, urllib3.exceptions.TimeoutError, requests.exceptions.Timeout), "timed out", TIMED_OUT),
    ((ConnectionResetError, ConnectionAbortedError, BrokenPipeError), "connection reset by peer", REACH),
    ((ssl.SSLError, urllib3.exceptions.SSLError, requests.exceptions.SSLError), "TLS failed", REACH),
    ((InvalidChunkLength,), "broken chunked framing", BAD),  # before IncompleteRead, which it derives from
    ((http.client.IncompleteRead,), "connection broken, answer cut off", CUT),
    ((http.client.HTTPException,), "not an HTTP answer", BAD),
)
# Everything a request and its streamed read can raise short of our own checks.
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class Fault(Exception):
    """A transport fault reduced to its kind: what the retry line says, and what the last line says."""

    def __init__(self, reason: str, line: str):
        super().__init__(reason)
        self.reason, self.line = reason, line


def causes(exc: BaseException) -> list[BaseException]:
    """An exception and every exception it wraps (in its args, reason, cause or context), outermost first."""
    chain, todo = [], [exc]
    while todo:
        item = todo.pop(0)
        if isinstance(item, BaseException) and not any(item is seen for seen in chain):
            chain.append(item)
            todo += [*item.args, getattr(item, "reason", None), item.__cause__, item.__context__]
    return chain


def fault_of(exc: BaseException, settings: Settings, reading: bool, timed_out: bool) -> Fault:
    """A transport fault by its kind: its class name and fixed words, never its text."""
    chain = causes(exc)
    # The first class that is not one of requests' or urllib3's wrappers names what broke.
    name = next((type(e).__name__ for e in chain if not isinstance(e, (requests.RequestException, MaxRetryError))), type(exc).__name__)
    words, line = fault_words(chain, reading, timed_out)
    if line == TIMED_OUT:
        said = TIMED_OUT.format(timeout=settings.timeout)
        return Fault(said, said)
    kind = f"{name} ({words})"
    return Fault(kind, line.format(url=settings.api_url, kind=kind))


def fault_words(chain: list[BaseException], reading: bool, timed_out: bool) -> tuple[str, str]:
    """The fixed words for a fault, and the template of the line that ends a run on it."""
    if timed_out:  # a socket shut at the deadline shows as whatever that did to the read
        return "timed out", TIMED_OUT
    for classes, words, line in FAULTS:
        if any(isinstance(e, classes) for e in chain):
            return words, line
    return ("connection broken, answer cut off", CUT) if reading else ("transport fault", REACH)


def page_sizes(n: int, page_size: int) -> list[int]:
    """How many users each page asks for: full pages, then the remainder."""
    full, rest = divmod(n, page_size)
    return [page_size] * full + ([rest] if rest else [])


def page_params(settings: Settings, request: PageRequest) -> dict:
    """The query of one page: only the fields the contract needs."""
    params = {"results": request.results, "page": request.page, "inc": ",".join(INCLUDED_FIELDS)}
    if request.seed is not None:
        params["seed"] = request.seed
    if settings.nat:
        params["nat"] = ",".join(settings.nat)
    return params


@dataclasses.dataclass(frozen=True)
class Answer:
    """One page's answer as it crossed the wire: its bytes, and whether they are gzip."""

    wire: bytes
    gzipped: bool = False


def too_large(limit: int) -> EtlError:
    """The error for an answer past the size bound."""
    return EtlError(f"answer larger than the {limit:,}-byte limit (--max-response-mb)")


def wire_limit(limit: int, gzipped: bool) -> int:
    """The most bytes a body of at most `limit` bytes can take on the wire."""
    # Deflate's worst case (stored blocks) adds 5 bytes per 16 kB, plus gzip's header and trailer.
    return limit + (limit // 3000 + 1024 if gzipped else 0)


def read_body(response: requests.Response, limit: int) -> Answer:
    """A streamed answer's bytes as sent, refused once they cannot hold a body within the bound."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise EtlError(f"answer in an encoding that was not asked for: {encoding[:40]!r}")
    # Unpacked later by unpack(), not by urllib3: the gzip bytes are kept as they came, and
    # unpacking on the thread that types the page frees this one for the next request.
    gzipped, most = encoding == "gzip", wire_limit(limit, encoding == "gzip")
    length = response.raw.length_remaining  # urllib3's reading of Content-Length; None when chunked
    if length is not None and length > most:
        raise too_large(limit)  # said to be too large: refused before a byte of it is read
    # Read in steps of at most READ_STEP: a page in one read, copied once (1 MB steps cost 2 ms a
    # page, on the critical path at concurrency 1), and never a read sized by the bound, which an
    # answer with no length would allocate whole. A body cut short ends in urllib3's IncompleteRead.
    wire, size = [], 0
    for chunk in response.raw.stream(min(most + 1, READ_STEP), decode_content=False):
        size += len(chunk)
        if size > most:
            raise too_large(limit)
        wire.append(chunk)
    if not size and length is None and not response.raw.chunked and response.status_code == 200:
        # Its end is the connection closing, and it closed before a byte of body: http.client takes a
        # close inside the headers for their end, so this is an answer cut off, not an empty one.
        raise ProtocolError("the connection closed before the answer's body")
    return Answer(b"".join(wire), gzipped)


def unpack(answer: Answer, limit: int) -> bytes:
    """The answer's body, gunzipped if it came gzipped, refused past `limit` bytes unpacked."""
    if not answer.gzipped:
        if len(answer.wire) > limit:
            raise too_large(limit)
        return answer.wire
    stream = zlib.decompressobj(wbits=31)
    try:
        body = stream.decompress(answer.wire, limit + 1)  # max_length: a gzip bomb stops here
    except zlib.error:
        raise EtlError("the answer is not valid gzip") from None
    if len(body) > limit or stream.unconsumed_tail:
        raise too_large(limit)
    if not stream.eof or stream.unused_data:
        raise EtlError("the answer's gzip stream is cut short or followed by other data")
    return body


def fetch_page(session: requests.Session, settings: Settings, request: PageRequest, gate: RateGate | None = None) -> Answer:
    """One page's answer, by the run's one retry loop.

    A transport fault, a cut-off answer or a status worth retrying is tried again, up to --retries
    times, after the rate-limit pause, the service's Retry-After or a jittered backoff; no wait is
    longer than --max-wait, and a stop ends any of them at once. One log line per retry.
    """
    gate = gate or RateGate()
    params = page_params(settings, request)
    where = redact(requests.Request("GET", settings.api_url, params=params).prepare().url)
    for retry in itertools.count(1):
        gate.wait()
        last = retry > settings.retries
        try:
            response, answer = ask(session, settings, params, last)
        except Fault as fault:
            if last:
                raise EtlError(f"page {request.page}: {fault.line}{retries_made(retry - 1, 'gave up after')}") from None
            why, seconds, shared = fault.reason, backoff_time(settings, retry), False
        except EtlError as exc:
            raise EtlError(f"page {request.page}: {exc}") from None
        else:
            if response.status_code == 200:
                return answer
            if answer is not None or response.is_redirect:
                raise status_error(response, answer, settings, request.page, retry - 1)
            why, seconds, shared = status_wait(response, settings, retry, request.page)
        log.warning("retry %d of %d for %s: %s", retry, settings.retries, where, why)
        if shared:
            gate.pause(seconds)  # the rate limit holds every worker, not just this one
        else:
            hold(seconds)


def ask(session: requests.Session, settings: Settings, params: dict, last: bool) -> tuple[requests.Response, Answer | None]:
    """One try, whole within --timeout: the answer, and its bytes unless it is a redirect or a status to retry."""
    response = None
    with Attempt(settings.timeout) as attempt:
        try:
            # A redirect is not followed: it could lead to plain http on another host.
            response = session.get(settings.api_url, params=params, timeout=settings.timeout, stream=True, allow_redirects=False)
            with response:
                if response.is_redirect or (response.status_code in RETRIED_STATUSES and not last):
                    return response, None  # closed unread: a huge or endless error body never fills memory
                answer = read_body(response, settings.max_response_bytes)
            if attempt.expired:  # shut at the deadline: what came before is not the whole answer
                raise requests.exceptions.Timeout()
            return response, answer
        except TRANSPORT_ERRORS as exc:
            if STOP.is_set():
                raise Stopped() from None
            raise fault_of(exc, settings, reading=response is not None, timed_out=attempt.expired) from None


def retries_made(count: int, verb: str = "after") -> str:
    """', after 3 retries' (or another verb), or nothing when no retry was made."""
    return f", {verb} {count} {'retry' if count == 1 else 'retries'}" if count else ""


def status_error(response: requests.Response, answer: Answer | None, settings: Settings, page: int, retries: int) -> EtlError:
    """The error that ends the run on an answer that is not 200: a redirect, or an error status with the service's word."""
    if response.is_redirect:
        target = urlsplit(response.headers.get("Location", "")).hostname or "elsewhere"
        return EtlError(f"page {page}: HTTP {response.status_code} redirect to {shorten(target)}, not followed")
    says = service_says(answer, settings.max_response_bytes)
    return EtlError(f"page {page}: HTTP {response.status_code}{says}{retries_made(retries)}")


def status_wait(response: requests.Response, settings: Settings, retry: int, page: int) -> tuple[str, float, bool]:
    """Why a status is retried, how long to wait first, and whether every worker waits (the rate limit)."""
    why, asked = f"HTTP {response.status_code}", retry_after(response)
    if asked and asked > settings.max_wait:
        raise EtlError(
            f"page {page}: {why}, the service asks to wait {asked:.0f}s (Retry-After), longer than --max-wait {settings.max_wait:g}s"
        )
    if asked:
        return f"{why}, waiting {asked:g}s as the service asks (Retry-After)", asked, False
    if response.status_code == 429 and asked is None:  # randomuser.me's own 429 says nothing of when
        seconds = min(settings.rate_limit_wait, settings.max_wait)
        return f"{why}, rate limited: pausing all requests for {seconds:g}s", seconds, True
    return why, backoff_time(settings, retry), False


def retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds, whole or to an HTTP date; None if absent or unreadable ("soon", "0.5")."""
    # Read here, not by urllib3, which caps the value at 6 hours: a longer wait is reported as asked.
    value = response.headers.get("Retry-After", "").strip()
    if re.fullmatch(r"[0-9]+", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no zone said
        when = when.replace(tzinfo=dt.timezone.utc)
    return max((when - dt.datetime.now(dt.timezone.utc)).total_seconds(), 0.0)


def backoff_time(settings: Settings, retry: int) -> float:
    """The sleep before retry k (from 1): base, 2·base, 4·base..., jittered, capped at 32 bases and at --max-wait."""
    grown = settings.backoff * 2.0 ** min(retry - 1, 5) + random.random() * settings.backoff / 2
    return min(grown, settings.backoff * 32, settings.max_wait)


def service_says(answer: Answer, limit: int) -> str:
    """The service's own error message in an answer, as ': message', or ''."""
    try:
        message = json.loads(unpack(answer, limit)).get("error")
    except (EtlError, ValueError, AttributeError):
        return ""
    return f": the service says {str(message)[:200]!r}" if message else ""


# ---------------------------------------------------------------- transform


def field(path: str) -> pl.Expr:
    """An expression for a dotted field of the raw user struct."""
    head, *rest = path.split(".")
    expr = pl.col(head)
    for name in rest:
        expr = expr.struct.field(name)
    return expr


def without_bom(body: bytes) -> bytes:
    """The body without a leading UTF-8 byte order mark."""
    return body[len(BOM) :] if body.startswith(BOM) else body


def parse_body(body: bytes, schema: pl.Schema = RAW_RESPONSE) -> pl.DataFrame:
    """Parse one answer against the raw schema: one row of results, info and error."""
    body = without_bom(body)
    try:
        parsed = pl.read_json(body, schema=schema)
    except Exception as exc:  # polars reports malformed JSON as several error types
        head = body[:64].lstrip()[:1]
        if head == b"<":
            raise EtlError("the answer is an HTML page, not JSON") from None
        if SURROGATE_ESCAPE.search(body):  # Polars refuses some lone surrogates: name the field as json reads it
            faults = json_reading_faults(body)
            if faults:
                raise contract_failure(faults) from None
        raise EtlError(f"the answer is not JSON of the randomuser.me 1.4 shape ({json_fault(exc)})") from None
    if parsed.height != 1 or not body.lstrip().startswith(b"{"):
        raise EtlError("the answer is not one JSON object")
    return parsed


def json_fault(exc: Exception) -> str:
    """What Polars found wrong with a body, without the offending value (it may be personal data)."""
    text = str(exc)
    wrong_type = re.search(r'deserializing value "(\w+)\(.*" as (\w+)', text)
    if wrong_type:
        return f"a JSON {wrong_type.group(1).lower()} where a {wrong_type.group(2)} belongs"
    position = re.search(r"at character \d+", text)
    return f"malformed JSON {position.group(0)}" if position else "malformed JSON"


def layout_pattern(layout: str) -> str:
    """A regular expression for one object in a layout ("a,b{c,d}"): each key once, in order, values plain."""
    scalar = r'(?:"[^"]*"|null|true|false|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)'
    keys = re.sub(r"(\w+)(\{?)", lambda m: f'"{m[1]}":' + (r"\{" if m[2] else scalar), layout.replace("}", r"\}"))
    return r"\{" + keys + r"\}"


@functools.cache
def service_layout() -> re.Pattern:
    """The whole compact answer of the service, as one regular expression over its bytes."""
    user, info = layout_pattern(USER_LAYOUT), layout_pattern(INFO_LAYOUT)
    return re.compile(rf'\{{"results":\[(?:{user}(?:,{user})*)?\],"info":{info}\}}'.encode())


def in_service_layout(body: bytes) -> bool:
    """True when no key of the body can repeat and no escape can hide one: the service's compact layout."""
    return b"\\" not in body and service_layout().fullmatch(body) is not None


def dig(value, path: str):
    """A dotted field of what Python's json read, None where anything on the way is not an object."""
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def json_reading_faults(body: bytes) -> list[str]:
    """Where Python's json reads an answer otherwise than Polars: keys written twice, lone UTF-16 surrogates."""
    declared = set(re.findall(r"\w+", f"results,info,error,{USER_LAYOUT},{INFO_LAYOUT}"))
    twice = []  # per object holding a declared key more than once, those keys (a name is no personal data)

    def one_object(items: list) -> dict:
        read = dict(items)
        if len(read) < len(items):  # Polars keeps the first of a repeated key, Python's json the last
            counts = collections.Counter(key for key, _ in items)
            keys = {key for key, count in counts.items() if count > 1 and key in declared}
            if keys:
                twice.append(keys)
        return read

    try:
        doc = json.loads(body, object_pairs_hook=one_object)
    except (ValueError, RecursionError):
        return ["a standard JSON reader refuses the answer"]
    faults = []
    if twice:
        names = ", ".join(sorted(set().union(*twice)))
        faults.append(f"{len(twice)} JSON object(s) hold a key twice ({names})")
    users = dig(doc, "results") if isinstance(dig(doc, "results"), list) else []
    for source in [*SOURCE_FIELDS.values(), "info.seed", "info.version"]:
        where = [dig(doc, source)] if source.startswith("info.") else [dig(user, source) for user in users]
        count = sum(1 for value in where if isinstance(value, str) and LONE_SURROGATE.search(value))
        if count:
            faults.append(f"{source} holds a lone UTF-16 surrogate in {count} records")
    return faults


def envelope(parsed: pl.DataFrame) -> dict:
    """The error, info and user count of a parsed answer, without turning users into Python objects."""
    row = parsed.select("error", "info", count=pl.col("results").list.len()).row(0, named=True)
    return {**row, "info": row["info"] or {}}


def service_error(message: str) -> EtlError:
    """The error for an answer that is the service's own error body."""
    return EtlError(f"the service answered with an error: {message[:200]!r}")


def answer_info(body: bytes) -> dict:
    """An answer's info alone, from a parse of only info and error (half a full parse); an error body refused."""
    row = parse_body(body, pl.Schema({"info": RAW_INFO, "error": pl.String})).row(0, named=True)
    if row["error"] is not None:
        raise service_error(row["error"])
    info = row["info"] or {}
    check_page_number(info)
    return info


def check_page_number(info: dict) -> None:
    """Refuse an info.page that is not a page number."""
    if info.get("page") is not None and not re.fullmatch(r"[1-9][0-9]{0,4}", info["page"]):
        raise EtlError(f"the answer's info.page {shorten(info['page'])!r} is not a page number")


def check_envelope(parsed: pl.DataFrame, expect: PageRequest | None) -> dict:
    """The answer's info, after refusing an error body, missing results, or another page's answer."""
    row = envelope(parsed)
    if row["error"] is not None:
        raise service_error(row["error"])
    if row["count"] is None:
        raise EtlError("the answer has no results")
    info, got = row["info"], row["count"]
    check_page_number(info)
    if expect is not None:
        check_expected(info, got, expect)
    if info.get("results") not in (None, str(got)):
        raise EtlError(f"the answer says info.results={shorten(info['results'])} but holds {got} users")
    return info


def check_expected(info: dict, got: int, expect: PageRequest) -> None:
    """Refuse an answer for another seed, another page, or another number of users than asked."""
    if expect.seed is not None and info.get("seed") != expect.seed:
        raise EtlError(f"asked for seed {expect.seed!r}, the answer is for seed {shorten(info.get('seed'))!r}")
    if expect.results is not None and got != expect.results:
        raise EtlError(f"asked for {expect.results} users, the answer holds {got}")
    if expect.page is not None and info.get("page") != str(expect.page):
        raise EtlError(f"asked for page {expect.page}, the answer is for page {info.get('page')}")


def typed_columns() -> dict[str, pl.Expr]:
    """Each contract column of a user, typed, from the flat text columns named as the contract."""
    typed = {}
    for name in SOURCE_FIELDS:
        dtype = OUTPUT_SCHEMA[name]
        col = pl.col(name)
        if dtype == UTC_INSTANT:
            # No cache: real answers hold distinct instants, so a cache is built per page and never hit.
            instant = col.str.to_datetime(TIMESTAMP_FORMAT, time_unit="us", time_zone="UTC", strict=False, cache=False)
            typed[name] = pl.when(col.str.contains(INSTANT_TEXT)).then(instant)
        elif dtype != pl.String:
            typed[name] = col.cast(dtype, strict=False)
        elif name in NULLABLE_COLUMNS:
            typed[name] = pl.when(col != "").then(col)  # the service writes "no id" as "" or null
        else:
            typed[name] = col
    return typed


def contract_failure(problems: list[str]) -> EtlError:
    """The error for an answer that breaks the contract, every problem named."""
    return EtlError(f"{len(problems)} contract check(s) failed: " + "; ".join(problems))


def contract_violations(flat: pl.DataFrame, typed: pl.DataFrame) -> list[str]:
    """What in these records breaks the contract, each with the field and the count of records."""
    problems = []
    missing = flat.null_count().row(0, named=True)
    unparsed = typed.null_count().row(0, named=True)
    for name, source in SOURCE_FIELDS.items():
        if name not in NULLABLE_COLUMNS and missing[name]:
            problems.append(f"{source} is missing or null in {missing[name]} records")
        elif unparsed[name] > missing[name] and name not in NULLABLE_COLUMNS:
            kind = {UTC_INSTANT: "a date", pl.Float64: "a number"}.get(OUTPUT_SCHEMA[name], "a whole number")
            problems.append(f"{source} does not parse as {kind} in {unparsed[name] - missing[name]} records")
    ranges = typed.select(
        bad_latitude=(~pl.col("latitude").is_between(-90, 90)).sum(),
        bad_longitude=(~pl.col("longitude").is_between(-180, 180)).sum(),
        duplicates=pl.len() - pl.col("user_id").drop_nulls().n_unique() - pl.col("user_id").null_count(),
        # A standard reader holds years 1 to 9999 only; an offset can carry a written year past them.
        **{name: (~pl.col(name).dt.year().is_between(1, 9999)).sum() for name in INSTANT_COLUMNS},
    ).row(0, named=True)
    if ranges["bad_latitude"]:
        problems.append(f"latitude lies outside [-90, 90] in {ranges['bad_latitude']} records")
    if ranges["bad_longitude"]:
        problems.append(f"longitude lies outside [-180, 180] in {ranges['bad_longitude']} records")
    for name in INSTANT_COLUMNS:
        if ranges[name]:
            problems.append(f"{SOURCE_FIELDS[name]} lies outside the years 1 to 9999 in {ranges[name]} records")
    if ranges["duplicates"]:
        problems.append(f"login.uuid repeats in {ranges['duplicates']} records")
    return problems


def check_field_lengths(flat: pl.DataFrame) -> None:
    """Refuse records with a text field longer than MAX_FIELD_BYTES, before anything copies it."""
    counts = flat.select((pl.all().str.len_bytes() > MAX_FIELD_BYTES).sum()).row(0, named=True)
    problems = [
        f"{SOURCE_FIELDS[name]} is longer than {MAX_FIELD_BYTES:,} bytes in {count} records" for name, count in counts.items() if count
    ]
    if problems:
        raise contract_failure(problems)


def sort_key() -> pl.Expr:
    """The sort key as one string that orders exactly as the key's columns do, even with NULs in them."""
    # Each field ends in "\x00\x00", which sorts before anything else, so a shorter field orders
    # first, as in a tuple; a NUL inside a field becomes "\x00\x01", after that end and before "\x01".
    fields = [pl.col(name).str.replace_all("\x00", "\x00\x01", literal=True) for name in SORT_KEY]
    return pl.concat_str(fields, separator="\x00\x00")


def transform(body: bytes, expect: PageRequest | None = None, ingested_at: dt.datetime | None = None) -> pl.DataFrame:
    """One raw answer body in, the contract frame out in the answer's order, or EtlError saying what is wrong."""
    body = without_bom(body)
    parsed = parse_body(body)
    if not in_service_layout(body):  # the exact, slower reading only where Polars and json could differ
        faults = json_reading_faults(body)
        if faults:
            raise contract_failure(faults)
    info = check_envelope(parsed, expect)
    users = parsed.get_column("results").explode(empty_as_null=False).struct.unnest()
    if users.height == 0:
        return OUTPUT_SCHEMA.to_frame()
    flat = users.select(**{name: field(source) for name, source in SOURCE_FIELDS.items()})
    check_field_lengths(flat)
    flat = flat.with_columns(user_id=pl.when(pl.col("user_id") != "").then("user_id"))  # "" identifies no one
    typed = flat.with_columns(**typed_columns())
    problems = contract_violations(flat, typed)
    if problems:
        raise contract_failure(problems)
    ingested_at = ingested_at or dt.datetime.now(dt.timezone.utc)
    page = info.get("page") or (expect.page if expect else None)
    return (
        typed.with_columns(
            full_name=pl.concat_str("first_name", "last_name", separator=" "),
            street_address=pl.concat_str(pl.col("street_number").cast(pl.String), "street_name", separator=" "),
            seed=pl.lit(info.get("seed") or (expect.seed if expect else None), pl.String),
            page=pl.lit(int(page) if page is not None else None, pl.Int32),
            api_version=pl.lit(info.get("version"), pl.String),
            ingested_at=pl.lit(ingested_at, UTC_INSTANT),
        )
        .select(OUTPUT_SCHEMA.names())  # not sorted: the batch is, as it lands (write_batch)
    )


# ---------------------------------------------------------------- load


def batch_path(output_dir: str, seed: str) -> str:
    """Where a seed's batch lands; the seed is checked, so the path never leaves the folder."""
    if not config.SEED_PATTERN.fullmatch(seed):
        raise EtlError(f"seed {shorten(seed)!r} is not safe as a file name: it {config.seed_rule()}")
    return f"{output_dir.rstrip('/')}/random_users_{seed}.parquet"


def check_own(path: Path, info: os.stat_result, kind: str) -> None:
    """Refuse a link, or anything but a plain folder or file (`kind`), where the job keeps one of its own."""
    if stat.S_ISLNK(info.st_mode):
        raise EtlError(f"refusing {path}: a symbolic link where the job keeps its own {kind}; it was left as it is")
    if not (stat.S_ISDIR if kind == "folder" else stat.S_ISREG)(info.st_mode):
        raise EtlError(f"refusing {path}: not a plain {kind}; it was left as it is")


def check_ours(path: Path, info: os.stat_result, closed: int = 0o022) -> None:
    """Refuse a folder or file of the job's that another user owns, or that has any of the `closed` mode bits.

    By default others may not write in it (they could plant links or forged parts there); object
    storage's private staging also closes it to their eyes (closed=0o077).
    """
    if info.st_uid != os.getuid():
        raise EtlError(f"refusing {path}: owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); it was left as it is")
    if info.st_mode & closed:
        mode, most = stat.S_IMODE(info.st_mode), 0o777 & ~closed
        raise EtlError(f"refusing {path}: open to other users (mode {mode:04o}, at most {most:04o} expected); it was left as it is")


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
    root = staging_root(output_dir)
    if is_remote(output_dir):
        own_folder(root.parent, closed=0o077)  # in the shared temp folder: closed to others' eyes too
    return own_folder(root)


@contextlib.contextmanager
def seed_lock(root: Path, seed: str):
    """Hold the seed's lock, so two runs of one seed take turns instead of mixing parts."""
    path = root / f"{seed}.lock"
    try:
        # Never through a link, and never blocking on a FIFO planted under the lock's name. 0600:
        # flock needs only a file one can open, so a lock others can read is one they can hold forever.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a link, a folder, a socket: named as what it is
            check_own(path, os.lstat(path), "file")
        raise EtlError(f"cannot open the seed lock {path}: {exc.strerror or exc}") from None
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        check_own(path, info, "file")
        check_ours(path, info, closed=0)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # ours, left readable by an older version of the job
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another run of seed %s is under way: waiting for it", seed)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def part_identity(settings: Settings, seed: str, page: int, rows: int) -> dict:
    """What a staged part must prove about itself before a later run trusts it."""
    return {"seed": seed, "page": page, "rows": rows, "page_size": settings.page_size, "nat": ",".join(settings.nat)}


def part_path(folder: Path, page: int) -> Path:
    """Where page `page` of a run is staged."""
    return folder / f"part-{page:05d}.parquet"


def sort_folder(folder: Path) -> Path:
    """Where a run's external sort keeps its scratch files: inside the run's staging folder."""
    return folder / "sort"


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


def write_atomically(path: Path, write, temp_dir: Path | None = None, mode: int = 0o600) -> None:
    """Call write(temp_path) on a fresh temp file, then move the finished file into place in one step.

    `mode` (less the umask) is the file's: 0600 for the job's own files, 0666 for what others read.
    """
    # temp_dir must be on the same filesystem; a killed run's temp file is swept from there.
    temp = fresh_temp(temp_dir or path.parent, path.name, mode)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def stage_part(folder: Path, frame: pl.DataFrame, identity: dict) -> Path:
    """Spill one transformed page to a part file that carries its identity."""
    path = part_path(folder, identity["page"])
    metadata = {
        PART_METADATA_KEY: json.dumps(identity, sort_keys=True),
        PART_NULLS_KEY: json.dumps(frame.null_count().row(0, named=True)),
    }
    write_atomically(path, lambda temp: frame.write_parquet(temp, metadata=metadata, **PART))
    return path


def trusted_part(path: Path, identity: dict) -> bool:
    """True when a staged part is whole and is the page this run would fetch."""
    try:
        metadata = pl.read_parquet_metadata(path)
        found = json.loads(metadata.get(PART_METADATA_KEY, "null"))
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    except Exception:  # a torn or foreign file is simply not trusted
        return False
    # A part staged by an older version carries no null counts: staging is scratch, so it is fetched again.
    return found == identity and rows == identity["rows"] and PART_NULLS_KEY in metadata


def save_raw(raw_dir: str | None, seed: str, page: int, answer: Answer) -> Path | None:
    """Keep the answer exactly as received, gzip-compressed, before it is transformed."""
    if raw_dir is None:
        return None
    folder = Path(raw_dir) / seed
    # Named "unchecked" until the transform accepts it, so a bad answer never replaces a good one.
    path = folder / f"unchecked-page-{page:05d}.json.gz"
    try:
        own_folder(folder)
        # The service's own gzip bytes when it sent them: the same body, and no CPU spent again.
        packed = answer.wire if answer.gzipped else gzip.compress(answer.wire, compresslevel=1, mtime=0)
        write_atomically(path, lambda temp: temp.write_bytes(packed), mode=0o666)
    except OSError as exc:
        raise EtlError(f"cannot keep the raw answer in {exc.filename or raw_dir}: {exc.strerror or exc}") from None
    return path


def settle_raw(path: Path | None, accepted: bool) -> None:
    """Name a kept answer after its check: accepted-page-N (page-N once its batch lands) or rejected-page-N."""
    if path is not None:
        name = path.name.removeprefix("unchecked-")
        settled = path.with_name(f"accepted-{name}" if accepted else f"rejected-{name}")
        try:
            os.replace(path, settled)
        except OSError as exc:
            raise EtlError(f"cannot keep the raw answer as {settled}: {exc.strerror or exc}") from None


def quality_report(parts: list[Path]) -> dict:
    """What was checked of a batch: rows, unique ids, nulls per contract column."""
    # Nulls were counted from each page as it was staged (trusted_part proves the count is there);
    # only the ids are read again here.
    nulls = dict.fromkeys(OUTPUT_SCHEMA.names(), 0)
    for part in parts:
        for name, count in json.loads(pl.read_parquet_metadata(part)[PART_NULLS_KEY]).items():
            nulls[name] += count
    ids = pl.scan_parquet(parts).select("user_id")
    # 8-byte hashes keep the distinct count small in memory; only a suspected repeat is recounted exactly.
    rows, unique = ids.select(pl.len(), pl.col("user_id").hash().n_unique()).collect(engine="streaming").row(0)
    if unique < rows:
        unique = ids.select(pl.col("user_id").n_unique()).collect(engine="streaming").item()
    return {
        "rows": rows,
        "unique_user_ids": unique,
        "nulls": nulls,
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class ExternalSort:
    """The batch in key order, sorting at most about `run_rows` rows in memory at once.

    Staged parts are split into key ranges in groups as they arrive (add), while the run still
    waits on the network; at the end (ordered) each range is sorted alone, in key order.
    """

    def __init__(self, work: Path, rows: int, run_rows: int = SORT_RUN_ROWS, group_rows: int = SCATTER_ROWS):
        self.work, self.rows, self.runs = work, rows, math.ceil(rows / run_rows)
        if found_own_folder(work):
            shutil.rmtree(work)  # a killed run's ranges: this run splits its parts afresh
        # Parts are split a group at a time, so each split writes one piece per range, not thousands of slivers.
        self.group_rows = max(run_rows, group_rows)
        self.bounds: pl.Series | None = None
        self.waiting: list[Path] = []
        self.waiting_rows, self.added_rows, self.groups = 0, 0, 0
        self.taken: set[Path] = set()
        self.lock = threading.Lock()

    def add(self, part: Path, rows: int) -> None:
        """Take one staged part; once a group's worth has come, split the group into key ranges."""
        if self.runs <= 1:
            return  # one range: ordered() sorts the parts directly
        with self.lock:
            self.taken.add(part)
            self.waiting.append(part)
            self.waiting_rows += rows
            self.added_rows += rows
            # The last group is not written out: ordered() splits it in memory, saving a round trip.
            if self.waiting_rows >= self.group_rows and self.added_rows < self.rows:
                self._split()

    def _keyed(self, group: list[Path]) -> pl.LazyFrame:
        """A group's rows with their sort key and key range; the first group's keys set the ranges."""
        # The key is kept in the pieces: one string column sorts three times faster than the four it is made of.
        rows = pl.scan_parquet(group).with_columns(sort_key().alias("__key"))
        if self.bounds is None:
            # Bounds only balance the ranges' sizes: any bounds give the same order.
            keys = rows.select("__key").collect().get_column("__key").sort()
            self.bounds = pl.Series([keys[len(keys) * i // self.runs] for i in range(1, self.runs)], dtype=pl.String)
        return rows.with_columns(pl.lit(self.bounds).search_sorted(pl.col("__key"), side="right").alias("__run"))

    def _split(self) -> None:
        """Write the waiting parts' rows to one file per key range (under the lock)."""
        group, self.waiting, self.waiting_rows = self.waiting, [], 0
        own_folder(self.work)  # made when first needed (0700): a run that never splits leaves none behind
        # Streamed into group-N/__run=R/ by Polars: the group is never held in memory whole.
        target = pl.PartitionBy(self.work / f"group-{self.groups:05d}", key="__run", include_key=False)
        self._keyed(group).sink_parquet(target, engine="streaming", **SCRATCH)
        self.groups += 1

    def ordered(self, parts: list[Path]) -> pl.LazyFrame:
        """All of `parts` in key order: each key range, read from its pieces, sorted alone."""
        if self.runs <= 1:
            return pl.scan_parquet(parts).sort(sort_key())
        for part in parts:
            if part not in self.taken:
                self.add(part, pl.scan_parquet(part).select(pl.len()).collect().item())
        with self.lock:
            # The last group (at most about two groups' rows) is split here, in memory.
            last = self._keyed(self.waiting).collect() if self.waiting else None
            self.waiting, self.waiting_rows = [], 0
        ranges = [[] for _ in range(self.runs)]
        by_folder = {f"__run={run}": pieces for run, pieces in enumerate(ranges)}
        for piece in sorted(self.work.glob("group-*/__run=*/*.parquet")):  # one walk, not one per range
            by_folder.get(piece.parent.name, []).append(piece)  # anything else is not a range's piece
        pieces = [piece for run in ranges for piece in run]
        held = (pl.scan_parquet(pieces, hive_partitioning=False).select(pl.len()).collect().item() if pieces else 0)
        held += last.height if last is not None else 0
        if held != self.rows:  # the batch is built from these pieces, so they must hold every row, once
            raise EtlError(f"the sort's key ranges hold {held} rows, expected {self.rows}")
        # The last group's rows, by key range, in one pass (not one filter per range).
        tails = last.partition_by("__run", as_dict=True, include_key=False) if last is not None else {}

        def ranges_in_order(with_columns, predicate, n_rows, batch_size):
            for run, pieces in enumerate(ranges):
                frames = [pl.read_parquet(pieces, hive_partitioning=False)] if pieces else []
                if (run,) in tails:
                    frames.append(tails[(run,)])
                if not frames:
                    continue
                frame = pl.concat(frames).sort("__key").drop("__key")
                if predicate is not None:
                    frame = frame.filter(predicate)
                yield frame.select(with_columns) if with_columns is not None else frame

        # One pass: each range is read, sorted and handed straight to the sink, never written back.
        # (register_io_source and PartitionBy are marked unstable in Polars 2; requirements pin
        # polars <3 and test_large.py checks the order they give against the raw JSON.)
        return register_io_source(ranges_in_order, schema=pl.read_parquet_schema(parts[0]))


def write_batch(
    parts: list[Path],
    destination: str,
    ingested_at: dt.datetime,
    expected_rows: int,
    storage_options=None,
    run_rows: int = SORT_RUN_ROWS,
    sorter: ExternalSort | None = None,
) -> tuple[dict, int]:
    """Assemble staged parts into the sorted batch file with the streaming engine, atomically: its quality report and size in bytes.

    `sorter` is the run's ExternalSort if it already split some parts.
    """
    report = quality_report(parts)
    if report["rows"] != expected_rows:
        raise EtlError(f"staged parts hold {report['rows']} rows, expected {expected_rows}")
    if report["unique_user_ids"] != report["rows"]:
        raise EtlError(f"login.uuid repeats across pages in {report['rows'] - report['unique_user_ids']} records")
    sorter = sorter or ExternalSort(sort_folder(parts[0].parent), report["rows"], run_rows)
    ordered = sorter.ordered(parts)
    batch = ordered.with_columns(ingested_at=pl.lit(ingested_at, UTC_INSTANT))
    sink = dict(
        compression="zstd",
        compression_level=1,  # measured on 100k users: faster than the default level, and no larger
        metadata={QUALITY_METADATA_KEY: json.dumps(report)},
        engine="streaming",
        row_group_size=run_rows,
    )
    if is_remote(destination):
        return report, sink_to_store(batch, destination, storage_options, sink)
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    write = lambda temp: batch.sink_parquet(temp, sync_on_close="all", **sink)
    write_atomically(final, write, temp_dir=parts[0].parent, mode=0o666)  # analysts read the lake
    return report, final.stat().st_size


def sink_to_store(batch: pl.LazyFrame, destination: str, storage_options: dict | None, sink: dict) -> int:
    """Stream the batch to an object key through Polars' cloud writer; return the object's size in bytes.

    With no storage_options, Polars takes credentials, region and endpoint from the standard
    AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    AWS_ENDPOINT_URL). A PUT, or a multipart upload that is only completed after its last part,
    replaces the key in one step: readers see the old batch or the new one, never part of one;
    a failed upload leaves the old object (or none) in place.
    """
    sinked = []
    batch.sink_parquet(destination, storage_options=storage_options, sinked_paths_callback=sinked.append, **sink)
    return sum(path.num_bytes for args in sinked for path in args.paths)


# ---------------------------------------------------------------- read


def read_processed(output_dir: str | None = None, storage_options: dict | None = None) -> pl.LazyFrame:
    """Every batch ever landed, as one lazy frame with the output schema (empty if the folder holds none)."""
    output_dir = output_dir or os.environ.get("RANDOM_USER_OUTPUT_DIR") or config.default_output_dir()
    if is_remote(output_dir):
        source = f"{output_dir.rstrip('/')}/{BATCH_GLOB}"
    else:
        source = lake_batches(lake_folder(output_dir))
    if not source:
        return OUTPUT_SCHEMA.to_frame().lazy()
    # Given the schema, Polars reads a glob that matches no object as an empty frame, so an
    # empty prefix is an empty lake without listing the bucket here: nothing is read until collect.
    return pl.scan_parquet(
        source,
        schema=OUTPUT_SCHEMA,
        missing_columns="insert",  # a column added to the contract later reads as null in older batches
        extra_columns="ignore",
        storage_options=storage_options,
    )


def lake_batches(folder: Path) -> list[str]:
    """The batch files of a local lake, sorted; a folder that cannot be listed, or an odd thing named like a batch, raises."""
    batches = []
    with os.scandir(folder) as entries:  # PermissionError naming the folder: pathlib's glob would skip it
        for entry in entries:
            if fnmatch.fnmatchcase(entry.name, BATCH_GLOB):
                # Followed, so a link to a batch reads as the batch; a FIFO would hang the reader, and
                # a folder or device is not a batch the job landed: something odd is in the lake.
                if not entry.is_file(follow_symlinks=True):
                    raise EtlError(f"{entry.path}: named like a batch but not a regular file; move it out of the lake")
                batches.append(entry.path)
    return sorted(batches)


def lake_folder(output_dir: str) -> Path:
    """A local lake's folder; FileNotFoundError or NotADirectoryError naming it (a typo is not an empty lake)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder of batches", output_dir)
        raise FileNotFoundError(errno.ENOENT, "no such folder of batches (a typo, or no batch has landed there yet?)", output_dir)
    return folder


# ---------------------------------------------------------------- run


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
    """Users landed so far: a tqdm bar on a terminal, one log line per page otherwise."""

    def __init__(self, total: int, pages: int, done: int = 0):
        self.total, self.pages, self.done, self.started = total, pages, done, time.monotonic()
        self.fresh = 0  # users fetched by this run, for the rate (resumed pages took no time)
        self.bar = None
        if pages > 1 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=" users", unit_scale=True, file=sys.stderr)

    def advance(self, page: int, rows: int) -> None:
        """Count one landed page."""
        self.done += rows
        self.fresh += rows
        if self.bar is not None:
            self.bar.update(rows)
        elif self.pages > 1:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = self.fresh / elapsed
            left = (self.total - self.done) / rate if rate else float("inf")
            log.info(
                "page %d done: %d/%d users (%.0f%%), %.0f users/s, about %.0fs left",
                page, self.done, self.total, 100 * self.done / self.total, rate, left,
            )

    def close(self) -> None:
        """Close the bar if there is one."""
        if self.bar is not None:
            self.bar.close()


def fetch_and_keep(session, settings: Settings, request: PageRequest, gate: RateGate) -> tuple[PageRequest, Answer, Path | None]:
    """Fetch one page and keep its raw answer: the part of a page's work that waits on the network."""
    answer = fetch_page(session, settings, request, gate)
    return request, answer, save_raw(settings.raw_dir, request.seed, request.page, answer)


def stage_body(answer: Answer, request: PageRequest, settings: Settings, folder: Path, raw_path: Path | None = None) -> tuple[int, int]:
    """Unpack, transform and stage one answer, and name its kept raw file after the verdict."""
    try:
        frame = transform(unpack(answer, settings.max_response_bytes), request)
    except EtlError as exc:
        settle_raw(raw_path, accepted=False)
        raise EtlError(f"page {request.page}: {exc}") from None
    settle_raw(raw_path, accepted=True)
    try:
        stage_part(folder, frame, part_identity(settings, request.seed, request.page, frame.height))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EtlError(f"page {request.page}: cannot stage in {folder}: {write_error(exc)}") from None
    return request.page, frame.height


def split_part(sorter: ExternalSort, folder: Path, page: int, rows: int) -> None:
    """Hand a staged page to the external sort, which splits it into key ranges while the run goes on."""
    try:
        sorter.add(part_path(folder, page), rows)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EtlError(f"page {page}: cannot split into key ranges in {folder}: {write_error(exc)}") from None


def stage_and_split(fetched: tuple[PageRequest, Answer, Path | None], settings: Settings, folder: Path, sorter: ExternalSort) -> tuple[int, int]:
    """Stage one fetched answer, then hand the staged page to the external sort."""
    request, answer, raw_path = fetched
    page, rows = stage_body(answer, request, settings, folder, raw_path)
    split_part(sorter, folder, page, rows)
    return page, rows


def in_parallel(work, items, concurrency: int):
    """Run work(item) for each item, at most `concurrency` at once; yield results as they finish."""
    items = iter(items)
    with futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="page") as pool:
        pending = {pool.submit(work, item) for item in _take(items, concurrency)}
        try:
            while pending:
                done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                results = [future.result() for future in done]  # a failure surfaces before more work is taken
                # Refill before yielding, so the next items are under way while the caller works on these.
                pending |= {pool.submit(work, item) for item in _take(items, len(done))}
                yield from results
        except KeyboardInterrupt:
            stop_requests()  # wake the workers blocked on the network or a wait, so the pool drains now
            raise
        finally:
            for future in pending:
                future.cancel()


def _take(items, count: int) -> list:
    """The next `count` items of an iterator."""
    return [item for _, item in zip(range(count), items)]


def first_seed(session, settings, gate, sizes) -> tuple[str, Answer]:
    """Ask for page 1 with no seed and take the seed the service picked."""
    answer = fetch_page(session, settings, PageRequest(None, 1, sizes[0]), gate)
    try:
        seed = answer_info(unpack(answer, settings.max_response_bytes)).get("seed")  # the transform checks the rest
    except EtlError as exc:
        raise EtlError(f"page 1: {exc}") from None
    if not seed:
        raise EtlError("page 1: the service picked no seed (info.seed missing)")
    if not config.SEED_PATTERN.fullmatch(seed):
        raise EtlError(f"page 1: the service's seed {shorten(seed)!r} is not safe as a file name")
    return seed, answer


@contextlib.contextmanager
def staging_for(settings: Settings, seed: str):
    """Hold the seed's lock and give its staging folder, refusing an output folder we cannot write."""
    try:
        root = own_staging_root(settings.output_dir)
        with seed_lock(root, seed):
            folder = own_folder(root / seed)
            found_own_folder(sort_folder(folder))  # cleared below: refused now if it is a link or another's
            try:
                yield folder
            finally:
                shutil.rmtree(sort_folder(folder), ignore_errors=True)  # derived scratch; the parts stay for a rerun
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a run that staged nothing leaves no folder behind
    except OSError as exc:
        raise EtlError(f"cannot write to {exc.filename or settings.output_dir}: {exc.strerror or exc}") from None


def run(settings: Settings | None = None, **overrides) -> Batch:
    """Fetch, transform and land one batch: run() with the defaults, or run(n=500, seed="demo")."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    started = time.monotonic()
    ingested_at = dt.datetime.now(dt.timezone.utc)
    sizes = page_sizes(settings.n, settings.page_size)
    gate = RateGate()
    STOP.clear()  # a new run starts unstopped, even in a session where an earlier one was interrupted
    with make_session(settings) as session:
        seed, first_answer = settings.seed, None
        if seed is None:
            seed, first_answer = first_seed(session, settings, gate, sizes)
        destination = batch_path(settings.output_dir, seed)
        with staging_for(settings, seed) as folder:
            kept = kept_folder(settings.raw_dir, seed)
            todo = pending_pages(folder, settings, seed, sizes)
            fetched = len(todo)
            if kept is not None:
                clear_stale_raw(kept, todo)
            if len(todo) < len(sizes):
                log.info("resuming seed %s: %d of %d pages already staged", seed, len(sizes) - len(todo), len(sizes))
            progress = Progress(settings.n, len(sizes), done=settings.n - sum(sizes[page - 1] for page in todo))
            sorter = ExternalSort(sort_folder(folder), settings.n, SORT_RUN_ROWS, SCATTER_ROWS)  # read now: tests set them
            stage = functools.partial(stage_and_split, settings=settings, folder=folder, sorter=sorter)
            try:
                if first_answer is not None and 1 in todo:
                    raw_path = save_raw(settings.raw_dir, seed, 1, first_answer)
                    progress.advance(*stage((PageRequest(seed, 1, sizes[0]), first_answer, raw_path)))
                    todo.remove(1)
                # `concurrency` threads wait on the network while at most STAGERS pages are typed,
                # so memory holds a bounded number of bodies and typed pages, whatever n.
                wanted = [PageRequest(seed, page, sizes[page - 1]) for page in todo]
                fetch = functools.partial(fetch_and_keep, session, settings, gate=gate)
                with contextlib.closing(in_parallel(fetch, wanted, settings.concurrency)) as answers:
                    for page, rows in in_parallel(stage, answers, min(settings.concurrency, STAGERS)):
                        progress.advance(page, rows)
            finally:
                progress.close()
            return land(folder, settings, seed, sizes, destination, ingested_at, started, fetched, sorter, kept)


def kept_pages(source: Path, limit: int) -> tuple[str, list[tuple[int, Path]]]:
    """The seed and the numbered pages of a kept raw folder, or of one saved answer."""
    if not source.exists():
        raise EtlError(f"nothing to replay at {source}: no such folder or file")
    if not source.is_dir():
        try:
            info = answer_info(read_kept(source, limit))  # the transform checks the rest when it lands
        except EtlError as exc:
            raise EtlError(f"cannot replay {source}: {exc}") from None
        if not info.get("seed"):
            raise EtlError(f"{source}: the answer names no seed (info.seed), so it cannot be landed")
        page = int(info.get("page") or 1)
        if page != 1:
            raise EtlError(
                f"cannot replay {source}: it is page {page} of seed {shorten(info['seed'])!r}, and a batch starts "
                "at page 1; replay the seed's kept folder instead"
            )
        return info["seed"], [(page, source)]
    numbered = {}
    try:
        names = os.listdir(source)
    except OSError as exc:
        raise EtlError(f"cannot replay {source}: {exc.strerror or exc}") from None
    for name in names:
        match = re.fullmatch(r"page-(\d{5})\.json\.gz", name)
        if match:
            numbered[int(match.group(1))] = source / name
    if not numbered:
        raise EtlError(f"nothing to replay in {source}: no page-NNNNN.json.gz files")
    missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
    if missing:
        raise EtlError(f"cannot replay {source}: page {missing[0]} of {max(numbered)} is missing")
    return source.name, sorted(numbered.items())


def read_kept(path: Path, limit: int) -> bytes:
    """A kept answer's body, gunzipped if it was kept compressed, under the same size bound as a live one."""
    gzipped = path.name.endswith(".gz")
    most = wire_limit(limit, gzipped)
    try:
        # Opened without blocking and read only if regular: a FIFO or a device would hang or never end.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise EtlError("not a regular file")
            if info.st_size > most:
                raise too_large(limit)
            wire = handle.read(most + 1)
        if len(wire) > most:  # grew since it was measured
            raise too_large(limit)
        return unpack(Answer(wire, gzipped), limit)
    except OSError as exc:
        raise EtlError(f"cannot read kept answer {path}: {exc.strerror or exc}") from None
    except EtlError as exc:
        raise EtlError(f"cannot read kept answer {path}: {exc}") from None


def check_not_staging(source: Path, output_dir: str) -> None:
    """Refuse a replay source in the output's staging folder: replay clears the seed's staging folder first."""
    staging = Path(os.path.realpath(staging_root(output_dir)))
    found = Path(os.path.realpath(source))  # resolved: a link or ".." hides nothing
    if found == staging or staging in found.parents:
        raise EtlError(
            f"cannot replay {source}: it lies in the staging folder {staging_root(output_dir)} of the output, "
            "which a run clears; copy the kept answers elsewhere and replay the copy"
        )


def replay(source: str | Path, settings: Settings | None = None, **overrides) -> Batch:
    """Rebuild a seed's batch from its kept raw answers alone, with no network at all."""
    settings = dataclasses.replace(settings or Settings(), **overrides)
    started = time.monotonic()
    ingested_at = dt.datetime.now(dt.timezone.utc)
    check_not_staging(Path(source), settings.output_dir)
    seed, pages = kept_pages(Path(source), settings.max_response_bytes)
    destination = batch_path(settings.output_dir, seed)
    with staging_for(settings, seed) as folder:
        shutil.rmtree(folder)
        folder.mkdir()
        sizes = []
        try:
            for page, path in pages:
                request = PageRequest(seed, page, None)
                body = read_kept(path, settings.max_response_bytes)
                sizes.append(stage_body(Answer(body), request, settings, folder)[1])
        except EtlError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise EtlError(f"cannot replay {source}: {exc}") from None
        # Every page but the last is full, as the live run asked for them: anything else is a mix of runs.
        if not sum(sizes) or any(size != sizes[0] for size in sizes[:-1]) or sizes[-1] > sizes[0]:
            shutil.rmtree(folder, ignore_errors=True)
            raise EtlError(f"cannot replay {source}: the kept pages hold {sizes} users, not one run's pages")
        log.info("replayed %d kept pages of seed %s", len(pages), seed)
        settings = dataclasses.replace(settings, n=max(sum(sizes), 1))
        return land(folder, settings, seed, sizes, destination, ingested_at, started, 0)


def kept_folder(raw_dir: str | None, seed: str) -> Path | None:
    """The seed's raw folder (None when raw answers are not kept); refused now if it is a link or a file."""
    if raw_dir is None:
        return None
    folder = Path(raw_dir) / seed
    try:
        found_own_folder(folder)
    except OSError as exc:
        raise EtlError(f"cannot keep the raw answer in {raw_dir}: {exc.strerror or exc}") from None
    return folder


def clear_stale_raw(folder: Path, todo: list[int]) -> None:
    """Under the seed's lock: drop temp files, unchecked answers, and accepted answers of pages fetched again.

    The kept pages (page-N) stay: they are the landed batch's, until a new batch lands (keep_landed_raw).
    """
    again = set(todo)
    for path in folder.glob("*"):
        match = KEPT_PAGE.fullmatch(path.name)
        accepted_again = match is not None and match.group(1) == "accepted-" and int(match.group(2)) in again
        if path.name.endswith(".tmp") or path.name.startswith("unchecked-") or accepted_again:
            path.unlink(missing_ok=True)  # a link is removed as a link, never followed


def keep_landed_raw(folder: Path, pages: int) -> None:
    """Once a batch has landed: its accepted answers become the kept pages replay reads; pages past its last go.

    Without the pruning, an earlier, larger run of the seed would leave pages that a replay then lands.
    """
    for path in folder.glob("*"):
        match = KEPT_PAGE.fullmatch(path.name)
        if match and int(match.group(2)) > pages:
            path.unlink(missing_ok=True)
        elif match and match.group(1) == "accepted-":
            os.replace(path, path.with_name(path.name.removeprefix("accepted-")))


def pending_pages(folder: Path, settings: Settings, seed: str, sizes: list[int]) -> list[int]:
    """The pages still to fetch; staged parts that prove themselves are kept, the rest cleared."""
    todo = []
    for page, rows in enumerate(sizes, start=1):
        path = part_path(folder, page)
        if is_plain_file(path) and trusted_part(path, part_identity(settings, seed, page, rows)):
            continue  # never a link: what lands is what this job staged, nothing reached through one
        todo.append(page)
    wanted = {part_path(folder, page).name for page in range(1, len(sizes) + 1)}
    for leftover in folder.iterdir():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name not in wanted or leftover.name.endswith(".tmp"):
            leftover.unlink(missing_ok=True)
    for page in todo:
        part_path(folder, page).unlink(missing_ok=True)
    return todo


def write_error(exc: BaseException) -> str:
    """Why a write failed, in one line; an object store's refusal by its S3 error code and message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    code = re.search(r"<Code>([^<]+)</Code>", text)
    if code:
        message = re.search(r"<Message>([^<]+)</Message>", text)
        return f"the object store answered {code.group(1)}" + (f" ({message.group(1)[:160]})" if message else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    cause = re.sub(r"^\d+:\s*", "", lines[-1]) if len(lines) > 1 and "Caused by:" in text else ""
    return lines[0][:200] + (f" ({cause[:80]})" if cause else "")


def land(folder, settings, seed, sizes, destination, ingested_at, started, fetched, sorter=None, kept=None) -> Batch:
    """Write the batch from its staged parts, keep its raw answers (if `kept`), clear the staging, say what landed."""
    parts = [part_path(folder, page) for page in range(1, len(sizes) + 1)]
    try:
        report, size = write_batch(parts, destination, ingested_at, settings.n, sorter=sorter)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EtlError(f"cannot write {destination}: {write_error(exc)}") from None
    try:
        # Before the staging is cleared: a run killed in between finds the parts and lands (and keeps) again.
        if kept is not None:
            keep_landed_raw(kept, len(sizes))
    except OSError as exc:
        raise EtlError(f"landed {destination}, but cannot keep its raw answers in {kept}: {exc.strerror or exc}") from None
    shutil.rmtree(folder, ignore_errors=True)
    seconds = time.monotonic() - started
    log.info("landed %d rows, seed %s, file %s, %d bytes, %.2fs", report["rows"], seed, destination, size, seconds)
    return Batch(destination, seed, report["rows"], size, seconds, fetched, len(sizes) - fetched, report)


# ---------------------------------------------------------------- CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, exit status 2."""

    def error(self, message):
        """Say what is wrong in one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Flags for every setting, read from the settings table in random_user_config."""
    parser = OneLineParser(
        prog="random_user_etl.py",
        description="Fetch fake people from randomuser.me and land them as one parquet file per seed.",
        epilog="Every flag has an environment variable (shown in brackets); a flag beats its variable.",
    )
    for setting in config.SETTINGS:
        if setting.name == "allow_http":
            parser.add_argument(setting.flag, dest=setting.name, action="store_const", const="true", help=f"{setting.help} [{setting.env}]")
        else:
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.metavar, help=f"{setting.help} [{setting.env}]")
    parser.add_argument(
        "--replay",
        metavar="PATH",
        help="rebuild a batch with no network from kept raw answers: a <raw-dir>/<seed> folder or one saved answer (.json or .json.gz)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return parser


def configure_logging(verbose: bool) -> None:
    """Log lines to stderr, one per event; never a library's record that carries an exception's text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(without_fault_text)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=[handler],
        force=True,
    )
    logging.getLogger("urllib3").setLevel(logging.DEBUG if verbose else logging.ERROR)


def without_fault_text(record: logging.LogRecord) -> bool:
    """False for another logger's record that carries an exception: its text can hold the answer's bytes."""
    # urllib3 logs headers it cannot parse (a header line may be a person) with the exception and its traceback.
    args = record.args if isinstance(record.args, tuple) else ()
    return record.name == log.name or not (record.exc_info or any(isinstance(arg, BaseException) for arg in args))


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM stop the run promptly (as PID 1 of a container, SIGTERM reaches a process only through a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers: a caller elsewhere keeps its own
        return
    # Set after `import polars`, which puts a SIGINT handler of its own in Python's place: with it, a
    # Ctrl-C reached Python only when the main thread next woke (measured: not until a page came in).
    previous = {signum: signal.signal(signum, on_stop_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def on_stop_signal(signum: int, frame) -> None:
    """Stop every wait and request of the run, and unwind the main thread; a second signal changes nothing."""
    if STOP.is_set():
        return
    stop_requests()
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the job from the command line; return the exit status."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    verbose, source = args.pop("verbose"), args.pop("replay")
    configure_logging(verbose)
    try:
        settings = config.load_settings(args)
        config.check_path_text("--replay", source)
    except SettingsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    with stop_on_signals():  # held while the last line is printed: a second signal cannot cut it
        try:
            replay(source, settings) if source else run(settings)
        except EtlError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a bug, not bad input: still one line, and -v shows the traceback
            log.debug("unexpected failure", exc_info=True)
            print(f"{parser.prog}: error: unexpected {type(exc).__name__}: {write_error(exc)} (run with -v for details)", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"{parser.prog}: stopped by {signal.Signals(signum).name}; staged pages are kept and the next run resumes", file=sys.stderr)
            return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
