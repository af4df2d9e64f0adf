"""The transport: one try of a request whole within its deadline, its bytes read within a bound, faults reduced to kinds."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import re
import socket
import ssl
import threading
import zlib
from typing import Any, cast
import requests
from requests.adapters import HTTPAdapter
import urllib3
from urllib3.exceptions import InvalidChunkLength, MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError
from urllib3.poolmanager import pool_classes_by_scheme
from urllib.parse import urlsplit
from _random_user_etl.shown import shorten, shown_url
from random_user_config import MOST_RETRIES, Settings
from _random_user_etl.errors import AnswerError
from _random_user_etl.stop import Stop


READ_STEP = 1 << 24  # 16 MB: an answer's bytes are read in steps of at most this


class Attempt:
    """One try of a request, `seconds` from connect to last byte: its socket is shut at that deadline or at the run's end."""

    def __init__(self, seconds: float):
        self.connection = None
        self.expired = False
        self.bound: int | None = None  # the most bytes its answer may take once its headers are in (read_body sets it)
        self.read = 0  # bytes read since the bound was set: body, chunk framing and trailer alike
        self._timer = threading.Timer(seconds, self.cut)
        self._timer.daemon = True

    def __enter__(self) -> Attempt:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        self.connection = None

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


class Overrun(Exception):
    """More bytes came than the try's bound allows (read_body says it as the size error)."""


# Informational answers read past before the real one, and the header bytes each may carry: a real
# service sends one or two, with a line or two of hints.
MOST_INTERIM, INTERIM_BYTES = 8, 16 * 1024


class EndlessInterim(http.client.HTTPException):
    """More informational answers, or longer ones, than any service sends before its real answer."""


class BrokenFraming(http.client.HTTPException):
    """A chunk-size line that is not hex digits (a sign, a negative size, no end), or chunk data not ended by CRLF: the framing is not HTTP's."""


class Metered:
    """The socket's reader under one answer: once the try's bound is set, every byte read counts against it as it arrives."""

    def __init__(self, fp, attempt: Attempt | None):
        self._fp, self._attempt = fp, attempt

    def __getattr__(self, name):
        """Everything else (close, closed, fileno, peek) is the reader's own."""
        return getattr(self._fp, name)

    def _most(self, asked: int | None) -> int | None:
        """What a read may ask for: `asked`, but never past one byte beyond the bound, and never "all there is"."""
        attempt = self._attempt
        bound = attempt.bound if attempt is not None else None
        if attempt is None or bound is None:
            return asked
        left = max(bound - attempt.read, 0) + 1  # one past: a read that reaches it is over the bound
        return left if asked is None or asked < 0 else min(asked, left)

    def _count(self, size: int) -> None:
        """Count bytes read; past the bound, stop the read."""
        if self._attempt is not None and self._attempt.bound is not None:
            self._attempt.read += size
            if self._attempt.read > self._attempt.bound:
                raise Overrun()

    def read(self, size: int | None = -1) -> bytes:
        """Read as asked, within the bound."""
        data = self._fp.read(self._most(size))
        self._count(len(data))
        return data

    def read1(self, size: int = -1) -> bytes:
        """Read at most one buffer's worth, within the bound."""
        data = self._fp.read1(self._most(size))
        self._count(len(data))
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        """Read a line, cut at the bound: a line with no end ends there."""
        data = self._fp.readline(self._most(limit))
        self._count(len(data))
        return data

    def readinto(self, buffer) -> int:
        """Read into a buffer, within the bound."""
        most = self._most(len(buffer))
        size = self._fp.readinto(memoryview(buffer)[:most])
        self._count(size)
        return size


CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")  # hex digits, any extension, the line's end
CHUNK_LINE_MOST = 65536  # a chunk-size line, extensions and all, as http.client bounds any line


class StrictResponse(http.client.HTTPResponse):
    """http.client's answer, read past any informational answer, its chunk sizes checked, its body bytes metered."""

    def __init__(self, sock, *args, attempt: Attempt | None = None, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = cast(Any, Metered(self.fp, attempt))  # http.client reads it as its reader

    def _read_status(self):
        """The final answer's status line: a few informational ones before it (102 Processing, 103 Early Hints) are read past."""
        for _ in range(MOST_INTERIM + 1):
            version, status, reason = super()._read_status()
            # 101 ends HTTP on the connection: no upgrade is asked for, so it stays a final (refused) status.
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            self._skip_interim_headers()
        raise EndlessInterim()  # read on, they would hold the try until --timeout

    def _skip_interim_headers(self) -> None:
        """Read past an informational answer's headers, at most INTERIM_BYTES of them: they count against no other bound."""
        left = INTERIM_BYTES
        while True:
            line = self.fp.readline(left + 1)
            left -= len(line)
            if left < 0 or not line:
                raise EndlessInterim()
            if line in (b"\r\n", b"\n"):
                return

    def _get_chunk_left(self):
        """The bytes left of the chunk under way (the next size line read if none); its data must end with CRLF."""
        if self.chunk_left == 0:  # http.client tosses whatever two bytes come there: two bytes of a chunk too long
            if self._safe_read(2) != b"\r\n":
                raise BrokenFraming()
            self.chunk_left = None  # past the chunk's end: the next size line is read as at the start
        return super()._get_chunk_left()

    def _read_next_chunk_size(self) -> int:
        """The next chunk's size, or BrokenFraming: int() would also take "-1" (read to the end) or "+40"."""
        line = self.fp.readline(CHUNK_LINE_MOST + 1)
        if not line:
            raise http.client.IncompleteRead(b"")  # the stream ended where a chunk should start
        size = CHUNK_SIZE.fullmatch(line)
        if size is None:
            raise BrokenFraming()
        return int(size[1], 16)


class Tries:
    """The try each thread of one run has under way, for the connections that thread uses to find."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> Attempt | None:
        """This thread's try under way, if any."""
        return getattr(self._local, "attempt", None)

    @contextlib.contextmanager
    def trying(self, attempt: Attempt):
        """While held, `attempt` is this thread's try."""
        self._local.attempt = attempt
        try:
            yield attempt
        finally:
            self._local.attempt = None


class _Watched:
    """Mixed into urllib3's connections: a connection in use is tied to its thread's current try; its answers are StrictResponse."""

    response_class: Any = StrictResponse
    tries = Tries()  # each session's connection class has its own (watched_pools)

    def connect(self):
        """Connect, then tie the new socket to the try under way on this thread."""
        super().connect()
        self._watch()

    def request(self, *args, **kwargs):
        """Send a request, tying the connection to the try under way first."""
        self._watch()  # a reused connection; a new one connects inside request(), and connect() ties it
        return super().request(*args, **kwargs)

    def _watch(self) -> None:
        """Hand this connection to the try under way on this thread, so its deadline can shut it and its answer is metered against it."""
        attempt = self.tries.current()
        self.response_class = functools.partial(StrictResponse, attempt=attempt)  # http.client makes each answer by it
        if attempt is not None:
            attempt.attach(self)


def watched(pool_class: type[urllib3.HTTPConnectionPool], tries: Tries) -> type:
    """A urllib3 pool class whose connections are tied to the try under way in `tries`."""
    connection = type(f"Watched{pool_class.ConnectionCls.__name__}", (_Watched, pool_class.ConnectionCls), {"tries": tries})
    return type(f"Watched{pool_class.__name__}", (pool_class,), {"ConnectionCls": connection})


class WatchedAdapter(HTTPAdapter):
    """requests' adapter on watched connections. It retries nothing itself: fetch_page holds the one retry loop."""

    def __init__(self, tries: Tries, **kwargs):
        self.pools = {scheme: watched(pool, tries) for scheme, pool in pool_classes_by_scheme.items()}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        """urllib3's pool manager, making watched connections."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.pools

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        """urllib3's proxy manager, making watched connections too (SOCKS aside)."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS has pool classes of its own
            manager.pool_classes_by_scheme = self.pools
        return manager


class UnredirectedSession(requests.Session):
    """requests' session that never works out where a redirect leads: the job follows none (status_error reads it)."""

    def resolve_redirects(self, *args, **kwargs):
        """No redirect to follow, nor to offer as response.next: requests would parse a Location that may not parse ("http://[::1")."""
        return iter(())


def make_session(settings: Settings, tries: Tries | None = None) -> requests.Session:
    """One pooled, verifying session on connections watched by `tries`, with no retries or redirects of its own."""
    session = UnredirectedSession()
    adapter = WatchedAdapter(tries or Tries(), max_retries=0, pool_connections=1, pool_maxsize=max(settings.concurrency, 1))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.verify = True
    session.headers["User-Agent"] = "random-user-etl/1.0"
    session.headers["Accept-Encoding"] = "gzip"  # the one encoding read_body unpacks
    return session


# What a transport fault is: the innermost exception of its chain of causes that a row names decides,
# by the row whose class is nearest its own (fault_words); the rows' order means nothing. Only the
# class name and these fixed words are ever logged: a fault's own text can carry the answer's bytes
# (a status line or a chunk length that is really JSON, a header that is a person).
TIMED_OUT = "timed out: no whole answer within {timeout:g}s (--timeout)"


REACH, BAD, CUT = "cannot reach {url}: {kind}", "bad answer from {url}: {kind}", "answer cut off"
RESOLVE = "cannot resolve {host}: {kind}"


# A name that does not resolve is a typo or a missing DNS record, not a passing fault: one retry rides
# out a resolver's hiccup, and more would only be half a minute of warnings before the same line.
RESOLVE_RETRIES = 1


FAULTS = (
    ((http.client.RemoteDisconnected,), "closed without an answer", REACH),
    ((ConnectionRefusedError,), "connection refused", REACH),
    ((socket.gaierror, NameResolutionError), "host name does not resolve", RESOLVE),
    ((NewConnectionError,), "cannot connect", REACH),
    ((TimeoutError, urllib3.exceptions.TimeoutError, requests.exceptions.Timeout), "timed out", TIMED_OUT),
    ((ConnectionResetError, ConnectionAbortedError, BrokenPipeError), "connection reset by peer", REACH),
    ((ssl.SSLError, urllib3.exceptions.SSLError, requests.exceptions.SSLError), "TLS failed", REACH),
    ((InvalidChunkLength, BrokenFraming), "broken chunked framing", BAD),
    ((http.client.IncompleteRead,), "connection broken, answer cut off", CUT),
    ((http.client.HTTPException,), "not an HTTP answer", BAD),
    # urllib3's own check of the headers (Content-Length: 5, 6), raised before requests has a response.
    ((urllib3.exceptions.InvalidHeader, requests.exceptions.InvalidHeader), "not an HTTP answer", BAD),
)


# The faults that mean the service could not be reached at all, where the offline ways in can help.
UNREACHABLE = frozenset({"connection refused", "host name does not resolve", "cannot connect"})


# Everything a request and its streamed read can raise short of our own checks.
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class Fault(Exception):
    """A transport fault reduced to its kind: what the retry line says, what the last line says, and the most retries it is worth."""

    def __init__(self, reason: str, line: str, retries: int = MOST_RETRIES, unreachable: bool = False):
        super().__init__(reason)
        self.reason, self.line, self.retries = reason, line, retries
        self.unreachable = unreachable  # no connection could be made at all: no internet, no DNS, nothing listening


def causes(exc: BaseException) -> list[BaseException]:
    """An exception and every exception it wraps (in its args, reason, cause or context), outermost first."""
    chain: list[BaseException] = []
    todo: list[object] = [exc]
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
    said = line.format(url=shown_url(settings.api_url), host=shorten(urlsplit(settings.api_url).hostname), kind=kind)
    return Fault(kind, said, RESOLVE_RETRIES if line == RESOLVE else MOST_RETRIES, unreachable=words in UNREACHABLE)


def fault_words(chain: list[BaseException], reading: bool, timed_out: bool) -> tuple[str, str]:
    """The fixed words for a fault, and the template of the line that ends a run on it."""
    if timed_out:  # a socket shut at the deadline shows as whatever that did to the read
        return "timed out", TIMED_OUT
    # The innermost cause says what broke (a refused connect); each wrapper around it says less (cannot connect).
    for exc in reversed(chain):
        row = nearest_row(type(exc))
        if row is not None:
            return row
    return ("connection broken, answer cut off", CUT) if reading else ("transport fault", REACH)


def nearest_row(kind: type) -> tuple[str, str] | None:
    """The words and line of the FAULTS row naming the class nearest `kind` in its MRO (a tie to the words that sort first), or None."""
    # Nearest, not first: IncompleteRead is an HTTPException and NewConnectionError a TimeoutError,
    # yet each has a row of its own that must win over its base's.
    mro = kind.__mro__
    found = [(min(mro.index(c) for c in classes if c in mro), words, line) for classes, words, line in FAULTS if any(c in mro for c in classes)]
    return min(found)[1:] if found else None


@dataclasses.dataclass(frozen=True)
class Answer:
    """One page's answer as it crossed the wire: its bytes, and whether they are gzip."""

    wire: bytes
    gzipped: bool = False


def too_large(limit: int) -> AnswerError:
    """The error for an answer past the size bound."""
    return AnswerError(f"answer larger than the {limit:,}-byte limit (--max-response-mb)")


def wire_limit(limit: int, gzipped: bool) -> int:
    """The most bytes a body of at most `limit` bytes can take on the wire."""
    # Deflate's worst case (stored blocks) adds 5 bytes per 16 kB, plus gzip's header and trailer.
    return limit + (limit // 3000 + 1024 if gzipped else 0)


def framing_allowance(most: int) -> int:
    """The bytes chunked framing may add to a body of `most` bytes: its size lines and their ends, an eighth again and one long line."""
    # A server's chunks are kilobytes each, 5 to 10 bytes of framing apiece; chunks of a few bytes
    # each, or extensions that carry the stream, are refused at this bound, not read to their end.
    return most // 8 + CHUNK_LINE_MOST


def read_body(response: requests.Response, limit: int, attempt: Attempt | None = None) -> Answer:
    """A streamed answer's bytes as sent, refused once they cannot hold a body within the bound."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        named = f": {encoding!r}" if re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,19}", encoding) else ""  # a token, never free text
        raise AnswerError(f"answer in an encoding that was not asked for{named}")
    # Unpacked later by unpack(), not by urllib3: the gzip bytes are kept as they came, and
    # unpacking on the thread that types the page frees this one for the next request.
    gzipped, most = encoding == "gzip", wire_limit(limit, encoding == "gzip")
    length = response.raw.length_remaining  # urllib3's reading of Content-Length; None when chunked
    if length is not None and length > most:
        raise too_large(limit)  # said to be too large: refused before a byte of it is read
    # Read in steps of at most READ_STEP: a page in one read, copied once (1 MB steps cost 2 ms a
    # page, on the critical path at concurrency 1), and never a read sized by the bound, which an
    # answer with no length would allocate whole. A body cut short ends in urllib3's IncompleteRead.
    # Read by read(), not stream(): stream() reads chunked framing by urllib3's own parser, whose size
    # lines have no length limit and whose "-1" reads to the end; read() goes through StrictResponse.
    if attempt is not None:  # whatever the framing, what is read past the headers counts (Metered)
        attempt.bound, attempt.read = most + framing_allowance(most), 0
    wire, size = [], 0
    try:
        while chunk := response.raw.read(min(most + 1, READ_STEP), decode_content=False):
            size += len(chunk)
            if size > most:
                raise too_large(limit)
            wire.append(chunk)
    except Overrun as exc:
        raise too_large(limit) from exc
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
    except zlib.error as exc:
        raise AnswerError("the answer is not valid gzip") from exc
    if len(body) > limit or stream.unconsumed_tail:
        raise too_large(limit)
    if not stream.eof or stream.unused_data:
        raise AnswerError("the answer's gzip stream is cut short or followed by other data")
    return body


class Transport:
    """The one code that knows HTTP: one run's session, each try whole within --timeout and cut by the run's end, every fault translated."""

    def __init__(self, settings: Settings, stop: Stop):
        self.settings, self.stop, self.tries = settings, stop, Tries()
        self.session = make_session(settings, self.tries)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info) -> None:
        self.session.close()

    def ask(self, params: dict, unread) -> tuple[requests.Response, Answer | None]:
        """One try of a GET of the API with `params`: the answer, and its bytes unless unread(answer) says to close it unread."""
        response = None
        with Attempt(self.settings.timeout) as attempt, self.tries.trying(attempt), self.stop.cutting(attempt.cut):
            try:
                # A redirect is not followed: it could lead to plain http on another host.
                response = self.session.get(self.settings.api_url, params=params, timeout=self.settings.timeout, stream=True, allow_redirects=False)
                with response:
                    if unread(response):
                        return response, None  # closed unread: a huge or endless error body never fills memory
                    answer = read_body(response, self.settings.max_response_bytes, attempt)
                if attempt.expired:  # shut at the deadline: what came before is not the whole answer
                    raise requests.exceptions.Timeout()
                return response, answer
            except TRANSPORT_ERRORS as exc:
                if self.stop.ending:  # cut by the run's end, not by the network
                    raise self.stop.reason() from exc
                raise fault_of(exc, self.settings, reading=response is not None, timed_out=attempt.expired) from exc
