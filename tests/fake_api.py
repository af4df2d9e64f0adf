"""A fake randomuser.me API 1.4: a real HTTP server on loopback, scriptable per request.

It serves the recorded responses in `fixtures/` byte for byte, and deterministic synthetic
users for every other (seed, page), so tests and benchmarks can pull any number of pages.
It follows the generator's seed rules: page k of seed S is page 1 of seed S followed by k's
digits, and an 18-character seed picks one nationality by its last two characters (no answer at
all when they index none). It serves only the nationalities nat= asks for, and picks a new seed
for each request that sends none.
Faults (error statuses, resets, hangs, trickles, truncated or endless bodies, bytes with no
status line, doctored JSON) are queued with `FakeRandomUser.script(...)` and hit the next
requests in arrival order.

    with FakeRandomUser() as fake:
        fake.script(rate_limited(), normal())
        ...  # point the job at fake.url
        assert [r.answer for r in fake.requests][:2] == ["status", "normal"]

The service's rate limit: `FakeRandomUser(rate_limit=(users, seconds))` serves each client at most
`users` users per window; every count resets together every `seconds` on the fake's own clock
(fixed windows from its creation, not sliding). The check comes before a request is served, a
refused request is not counted, and the refusal is the service's 429 with no Retry-After.

Connection refused: `FakeRandomUser().start_later(0.5)` reserves a port at once (`.url`
works) and only starts listening after the delay, so early connects are refused.

Standard library only: the job's own dependencies must not be needed to fake its source.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import itertools
import json
import math
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs, urlsplit

FIXTURES = Path(__file__).parent / "fixtures"

HOST = "127.0.0.1"
API_PATH = "/api/1.4/"
VERSION = "1.4"
MAX_RESULTS = 5000
MAX_PAGE = 10000

# The service's top-level user fields, in the order it emits them.
USER_FIELDS = (
    "gender",
    "name",
    "location",
    "email",
    "login",
    "dob",
    "registered",
    "phone",
    "cell",
    "id",
    "picture",
    "nat",
)

# (seed, page) pairs recorded from the real service, with the nationalities they were asked for
# (none: all); `narrow` (inc) and `noinfo` are left out because their users are not what a plain
# request for that seed returns.
_RECORDED_FILES = (
    ("default_seed-pura_results-100.json", ""),
    ("paged_seed-paged_results-40_page-1.json", ""),
    ("paged_seed-paged_results-40_page-2.json", ""),
    ("paged_seed-paged_results-40_page-3.json", ""),
    ("nat-gb_seed-gbonly_results-25.json", "gb"),
    ("nat-ca-no-fr_seed-mixnat_results-25.json", "ca,no,fr"),
    ("noseed_results-5.json", ""),
)

RATE_LIMIT_BODY = (FIXTURES / "error_429_rate-limit.json").read_bytes()
SERVICE_ERROR_BODY = (FIXTURES / "error_service.json").read_bytes()
# The seed the service picked for the recorded request with no seed (each such request gets a new one).
PICKED_SEED: str = json.loads((FIXTURES / "noseed_results-5.json").read_bytes())["info"]["seed"]

JSON_TYPE = "application/json; charset=utf-8"

# The generator's nationality list: an 18-character seed's last two characters, read as hex, index it.
SEEDED_NATIONALITIES = tuple("AU BR CA CH DE DK ES FI FR GB IE IN IR MX NL NO NZ RS TR UA US".split())
NAT_SEED_LENGTH = 18

# Fixed namespace so synthetic uuids are stable across runs and machines.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://randomuser.me/api/1.4/")
# Placeholders spliced into pre-serialized templates; they occur in no recorded user.
_UUID_MARK = "@@fake-uuid@@"
_SUFFIX_MARK = "@@fake-suffix@@"
_UUID_MARK_B = _UUID_MARK.encode()
_SUFFIX_MARK_B = _SUFFIX_MARK.encode()
# uuid5 hashes namespace + name: hashing the namespace once saves time on every user.
_NAMESPACE_SHA1 = hashlib.sha1(_UUID_NAMESPACE.bytes)


def _dumps(value: Any) -> str:
    """Serialize like the service does: compact JSON with raw (unescaped) unicode."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- users


@functools.cache
def _recorded() -> dict[tuple[str, int], list[dict]]:
    """Parse the recorded pages once; callers must not mutate the result."""
    return {key: users for key, (nats, users) in _recorded_with_nat().items()}


@functools.cache
def _recorded_with_nat() -> dict[tuple[str, int], tuple[tuple[str, ...], list[dict]]]:
    """Each recorded (seed, page): the nationalities it was asked for (see nationalities) and its users."""
    pages = {}
    for name, nat in _RECORDED_FILES:
        doc = json.loads((FIXTURES / name).read_bytes())
        pages[(doc["info"]["seed"], doc["info"]["page"])] = (nationalities(nat), doc["results"])
    return pages


def recorded_pages() -> dict[tuple[str, int], list[dict]]:
    """Return the users of each recorded (seed, page), as a fresh copy the caller may mutate."""
    return copy.deepcopy(_recorded())


@functools.cache
def _recorded_by_generator_seed() -> dict[str, tuple[tuple[str, ...], list[dict]]]:
    """The recorded pages (nationalities asked for, users) by the seed the generator seeds itself with (see generator_seed)."""
    return {generator_seed(seed, page): recorded for (seed, page), recorded in _recorded_with_nat().items()}


def nationalities(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A nat= value as the generator reads it: the known codes, upper case, once each, sorted; () for all."""
    return tuple(sorted({code.upper() for code in _split_fields(value)} & set(SEEDED_NATIONALITIES)))


def picked_seed() -> str:
    """A seed for a request that sends none: a new one each time, 16 hex digits like the service's."""
    return secrets.token_hex(8)


class GeneratorCrash(Exception):
    """The real generator crashes on this request: the connection closes with no answer."""


def seed_nationality(seed: str) -> str | None:
    """The nationality an 18-character seed picks (its last two characters as hex); None for other seeds."""
    if len(seed) != NAT_SEED_LENGTH:
        return None
    index = int(seed[-2:], 16) if all(c in "0123456789abcdefABCDEF" for c in seed[-2:]) else len(SEEDED_NATIONALITIES)
    if index >= len(SEEDED_NATIONALITIES):
        raise GeneratorCrash(f"no nationality at index {seed[-2:]!r}")
    return SEEDED_NATIONALITIES[index]


def generator_seed(seed: str, page: int) -> str:
    """What the generator seeds itself with: an 18-character seed's first 16, then page k's digits (k >= 2)."""
    if len(seed) == NAT_SEED_LENGTH:
        seed = seed[:16]
    return seed if page == 1 else f"{seed}{page}"


@functools.cache
def _templates(nats: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """Every recorded user carrying all fields (of these nationalities, if any), in a fixed order, as synthetic templates."""
    users = []
    for path in sorted(FIXTURES.glob("*.json")):
        doc = json.loads(path.read_bytes())
        users += [u for u in doc.get("results", []) if set(u) == set(USER_FIELDS) and (not nats or u["nat"] in nats)]
    if len(nats) < 2:
        return tuple(users)
    # The generator draws each user's nationality evenly from those asked for: take them in turn,
    # not in the proportions the recordings happen to hold.
    each = [[u for u in users if u["nat"] == nat] for nat in nats]
    return tuple(group[turn % len(group)] for turn in range(max(map(len, each))) for group in each)


@functools.lru_cache(maxsize=64)
def _template_json(fields: tuple[str, ...], nats: tuple[str, ...] = ()) -> tuple[bytes, ...]:
    """Serialize each template once (only `fields`), with marks where per-user values go.

    Bytes, not str: splicing and joining UTF-8 bytes skips re-encoding megabytes per page.
    """
    out = []
    for user in _templates(nats):
        user = copy.deepcopy(user)
        user["login"]["uuid"] = _UUID_MARK
        user["login"]["username"] += _SUFFIX_MARK
        local, _, domain = user["email"].partition("@")
        user["email"] = f"{local}{_SUFFIX_MARK}@{domain}"
        out.append(_dumps({k: v for k, v in user.items() if k in fields}).encode("utf-8"))
    return tuple(out)


def _synthetic_json(seed: str, page: int, start: int, stop: int, fields: tuple[str, ...], nats: tuple[str, ...] = ()) -> list[bytes]:
    """Serialized synthetic users `start`..`stop-1` of (seed, page) of these nationalities (all if none), keeping only `fields`."""
    picked = seed_nationality(seed)  # an 18-character seed picks one and ignores nat=
    templates = _template_json(fields, (picked,) if picked else nats)
    # Page k of seed S is page 1 of seed S followed by k's digits, as in the generator; other
    # nationalities asked for are other people, so they are part of every user's identity.
    key = f"{generator_seed(seed, page)}/1" + (f"/nat={','.join(nats)}" if nats and not picked else "")
    # A per-page rotation, so different pages do not all begin with the same person.
    offset = uuid.uuid5(_UUID_NAMESPACE, key).int % len(templates)
    out = []
    for index in range(start, stop):
        user_id = _uuid5(f"{key}/{index}").encode()
        text = templates[(offset + index) % len(templates)]
        out.append(text.replace(_UUID_MARK_B, user_id).replace(_SUFFIX_MARK_B, b"_" + user_id[:8] + user_id[9:13]))
    return out


def _uuid5(name: str) -> str:
    """str(uuid.uuid5(_UUID_NAMESPACE, name)), four times faster: 5000-user pages need speed."""
    digest = _NAMESPACE_SHA1.copy()
    digest.update(name.encode("utf-8"))
    raw = bytearray(digest.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def synthetic_users(seed: str, page: int, count: int, nat: str | None = None) -> list[dict]:
    """Deterministic full users 0..count-1 of (seed, page, nat), each with its own uuid, username and email."""
    return [json.loads(text) for text in _synthetic_json(seed, page, 0, count, USER_FIELDS, nationalities(nat))]


def _split_fields(value: str | Iterable[str] | None) -> list[str]:
    """Read an inc/exc value the way the service does: comma list, trimmed, lower case."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip().lower() for item in items if item.strip()]


def kept_fields(inc: str | Iterable[str] | None = None, exc: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The top-level user fields a response keeps for these inc/exc values, in service order."""
    wanted = set(_split_fields(inc)) or set(USER_FIELDS)
    wanted -= set(_split_fields(exc))
    return tuple(f for f in USER_FIELDS if f in wanted)


def page_body(
    seed: str,
    page: int,
    results: int,
    *,
    inc: str | Iterable[str] | None = None,
    exc: str | Iterable[str] | None = None,
    noinfo: bool = False,
    nat: str | Iterable[str] | None = None,
) -> bytes:
    """The exact body the fake sends for these (already sanitized) parameters."""
    fields, nats = kept_fields(inc, exc), nationalities(nat)
    recorded_nats, recorded = _recorded_by_generator_seed().get(generator_seed(seed, page), ((), []))
    # A recorded page answers a request for its own nationalities, or (as the tests' fixtures) for all of them.
    recorded = [] if seed_nationality(seed) or nats not in ((), recorded_nats) else recorded[:results]
    users = [_dumps({k: v for k, v in u.items() if k in fields}).encode("utf-8") for u in recorded]
    # "Page k with results=r is the first r users of page k": recorded users come first
    # and synthetic ones continue the page, indexed by their position in it.
    users += _synthetic_json(seed, page, len(recorded), results, fields, nats)
    # An 18-character seed is answered with two more characters (the index again): 20 that do not reproduce the users.
    answered = seed + seed[-2:] if seed_nationality(seed) else seed
    info = {"seed": answered, "results": results, "page": page, "version": VERSION}
    tail = b"}" if noinfo else b',"info":' + _dumps(info).encode("utf-8") + b"}"
    return b"".join((b'{"results":[', b",".join(users), b"]", tail))


@dataclass(frozen=True)
class PageRequest:
    """The sanitized parameters of one API request, as the real service would read them."""

    seed: str
    page: int
    results: int
    inc: str | None = None
    exc: str | None = None
    noinfo: bool = False
    nat: tuple[str, ...] = ()  # as nationalities() reads nat=

    def body(self) -> bytes:
        """The normal response body for this request."""
        return page_body(self.seed, self.page, self.results, inc=self.inc, exc=self.exc, noinfo=self.noinfo, nat=self.nat)


def parse_params(params: dict[str, str]) -> PageRequest:
    """Sanitize query parameters like the service: out-of-range values silently fall back."""
    results = _number(params.get("results"))
    if math.isnan(results) or results < 0 or results > MAX_RESULTS:
        results = 1
    page = _number(params.get("page"))
    # The service keeps fractional pages as distinct seeds; the fake treats them as page 1.
    if math.isnan(page) or page < 1 or page > MAX_PAGE or page != int(page):
        page = 1
    return PageRequest(
        seed=params.get("seed") or picked_seed(),
        page=int(page),
        # The service loops `i < results`, so 2.5 users means 3.
        results=math.ceil(results),
        inc=params.get("inc") or None,
        exc=params.get("exc") or None,
        noinfo="noinfo" in params,
        nat=nationalities(params.get("nat")),
    )


def _number(text: str | None) -> float:
    """JavaScript-ish Number(): NaN for what does not parse, 0 for an empty string."""
    if text is None:
        return math.nan
    if not text.strip():
        return 0.0
    try:
        return float(text)
    except ValueError:
        return math.nan


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    """How the fake answers one request; build it with normal(), status(), reset(), ..."""

    kind: str
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    total_bytes: int = 0
    fn: Callable[[Any], Any] | None = None
    then: Answer | None = None


def normal() -> Answer:
    """Serve as the real service would."""
    return Answer("normal")


def status(code: int, body: bytes | str | None = None, headers: dict[str, str] | None = None) -> Answer:
    """Answer with this status and body (default: the service's own error body for 200/5xx)."""
    if body is None:
        body = RATE_LIMIT_BODY if code == 429 else SERVICE_ERROR_BODY if code == 200 or code >= 500 else b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    return Answer("status", status=code, body=body, headers=dict(headers or {}))


def rate_limited(retry_after: int | float | str | None = None) -> Answer:
    """HTTP 429 with the service's body; no Retry-After unless asked (the real one sends none)."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return status(429, RATE_LIMIT_BODY, headers)


def reset() -> Answer:
    """Drop the connection with a TCP RST, without answering."""
    return Answer("reset")


def hang(seconds: float) -> Answer:
    """Wait `seconds` (cut short by stop()) and then answer normally."""
    return Answer("hang", seconds=seconds)


def held(until: Callable[[], bool], then: Answer, seconds: float = 10.0) -> Answer:
    """Hold the answer until until() is true (at most `seconds`, cut short by stop()), then answer as `then`."""
    return Answer("held", seconds=seconds, fn=until, then=then)


def truncated() -> Answer:
    """Status 200 and the full Content-Length, but only half the body, then close."""
    return Answer("truncated")


def body(bytes_: bytes | str, status: int = 200, content_type: str = "application/json") -> Answer:
    """Answer with an arbitrary body (HTML, non-JSON, an error object...)."""
    if isinstance(bytes_, str):
        bytes_ = bytes_.encode("utf-8")
    return Answer("body", status=status, body=bytes_, content_type=content_type)


def mutate(fn: Callable[[dict], Any]) -> Answer:
    """Serve fn(parsed normal response); fn may return a new value or edit in place and return None."""
    return Answer("mutate", fn=fn)


def unframed() -> Answer:
    """The normal answer with neither Content-Length nor chunking: its end is the connection closing."""
    return Answer("reframed")


def chunked(headers: dict[str, str] | None = None) -> Answer:
    """The normal answer in 64 kB chunks, with any extra headers (a Content-Length that chunking overrides, say)."""
    return Answer("reframed", headers={"Transfer-Encoding": "chunked", **(headers or {})})


def trickle(interval: float, headers: bool = False) -> Answer:
    """The normal answer a few bytes every `interval` seconds: the body, or (headers=True) the status line and headers too."""
    return Answer("trickle_headers" if headers else "trickle", seconds=interval)


def raw(bytes_: bytes | str) -> Answer:
    """These bytes as the whole response, no status line unless they hold one (HTTP/0.9 style), then close."""
    if isinstance(bytes_, str):
        bytes_ = bytes_.encode("utf-8")
    return Answer("raw", body=bytes_)


def huge(total_bytes: int, status: int = 200, declared: bool = False) -> Answer:
    """Stream total_bytes of never-ending-looking JSON: chunked, or with its Content-Length if declared."""
    headers = {"Content-Length": str(total_bytes)} if declared else {"Transfer-Encoding": "chunked"}
    return Answer("huge", status=status, total_bytes=total_bytes, headers=headers)


def chunk_framing(lead: bytes, filler: bytes, total_bytes: int) -> Answer:
    """A chunked 200 whose body is `lead`, then `filler` again and again to total_bytes: framing of the test's making."""
    return Answer("framing", body=lead, total_bytes=total_bytes, fn=lambda: filler)


def interim(*codes: int, times: int = 1) -> Answer:
    """Informational answers (103 Early Hints, 102 Processing, ...) before the normal one, each with a header of its own, each sent `times` times."""
    return Answer("interim", headers={str(code): str(times) for code in codes})


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Received:
    """One request as the fake received it."""

    method: str
    path: str  # without the query string
    params: dict[str, str]  # first value of each query parameter
    headers: dict[str, str]  # names lower-cased, since HTTP names are case-insensitive
    at: float  # time.monotonic() on arrival, to check pacing and concurrency
    answer: str  # kind of the Answer it got ("normal", "status", "reset", ...)


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its fake, its open connections and stays quiet."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, fake: FakeRandomUser, port: int, host: str = HOST):
        """Bind and listen on the port (0: any free one), on loopback unless told otherwise."""
        self.fake = fake
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup, which can stall offline."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        """Track the connection so stop() can wake handlers blocked on it."""
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        """Forget the connection once its handler is done."""
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """Stay silent when clients go away; keep anything else for the test to inspect."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.fake._error(error)

    def close_connections(self) -> None:
        """Shut every open connection, so idle keep-alive handlers stop waiting."""
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Answers one connection's requests following the fake's script."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real service and requests' pools
    server_version = "FakeRandomUser/1.4"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: test output is for the tests."""

    def do_GET(self) -> None:
        """Record the request, apply the latency, then give the scripted (or normal) answer."""
        fake = self.server.fake
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        answer = fake._next_answer()
        if answer.kind == "normal" and not fake._admit(self.client_address[0], query):
            answer = Answer("limited", status=429, body=RATE_LIMIT_BODY)
        fake._record(
            Received(
                method=self.command,
                path=url.path,
                params={k: v[0] for k, v in query.items()},
                headers={k.lower(): v for k, v in self.headers.items()},
                at=time.monotonic(),
                answer=answer.kind,
            )
        )
        if not self._pause(fake.latency):
            return
        # The service reads the last of repeated parameters.
        params = {k: v[-1] for k, v in query.items()}
        try:
            _serve(self, answer, url.path, params)
        except OSError:
            self.close_connection = True  # the client went away; nothing to tell anyone
        except GeneratorCrash:
            self.close_connection = True  # the real generator dies on this request: no answer at all
        except Exception as error:  # a bug in a test's mutate fn, say: report, don't hide
            fake._error(error)
            self._send(500, traceback.format_exc().encode(), "text/plain; charset=utf-8")
            self.close_connection = True

    def _dribble(self, data: bytes, interval: float, step: int = 4) -> None:
        """Write `step` bytes every `interval` seconds, until done, hung up on, or the server stops."""
        for start in range(0, len(data), step):
            self.wfile.write(data[start : start + step])
            if not self._pause(interval):
                return

    def _count_huge(self, size: int) -> None:
        """Count body bytes of huge() written: what the client let through before hanging up."""
        with self.server.fake._lock:
            self.server.fake.huge_bytes_sent += size

    # Helpers.

    def _write_body(self, pieces: Iterable[bytes], chunked: bool, sent: Callable[[int], Any] = lambda size: None) -> None:
        """Write a body piece by piece, in chunked framing or bare, until done or the server stops."""
        for piece in pieces:
            if self.server.stopping.is_set():
                return
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            sent(len(piece))
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _pause(self, seconds: float) -> bool:
        """Wait, but give up at once when the server stops; True if still running."""
        if seconds > 0 and self.server.stopping.wait(seconds):
            self.close_connection = True
            return False
        return not self.server.stopping.is_set()

    def _known_path(self, path: str) -> bool:
        """Serve the API paths only, so a job with a wrong URL fails loudly."""
        if path.rstrip("/") in ("/api/1.4", "/api"):
            return True
        self._send(404, _dumps({"error": f"fake randomuser.me: no route {path}"}).encode())
        return False

    def _encode(self, payload: bytes) -> tuple[bytes, bool]:
        """Gzip the payload when the client accepts it, as the real service does."""
        accepted = self.headers.get("Accept-Encoding", "")
        codings = {part.split(";")[0].strip().lower() for part in accepted.split(",")}
        if payload and "gzip" in codings:
            return self.server.fake._gzip(payload), True
        return payload, False

    def _send_headers(self, code: int, content_type: str, headers: dict[str, str], gzipped: bool) -> None:
        """Send the status line and headers."""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, code: int, payload: bytes, content_type: str = JSON_TYPE, headers: dict[str, str] | None = None) -> None:
        """Send a complete response, logging 200 bodies in fake.sent unless the write fails."""
        # A scripted Content-Encoding means the test sends the bytes as they are (a fake gzip, say).
        wire, gzipped = (payload, False) if "Content-Encoding" in (headers or {}) else self._encode(payload)
        fake = self.server.fake
        # Logged before writing: a client holding the response must already see it in .sent.
        if code == 200:
            fake._record_sent(payload)
        try:
            self._send_headers(code, content_type, {**(headers or {}), "Content-Length": str(len(wire))}, gzipped)
            self.wfile.write(wire)
        except OSError:
            if code == 200:
                fake._unrecord_sent(payload)
            raise


# --------------------------------------------------------------------------- answers on the wire
# One function per Answer.kind, each given the connection's handler: _ANSWERERS maps a kind to it.

Answerer = Callable[[_Handler, Answer, str, dict[str, str]], None]


def _serve(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Give the answer its kind names (a kind with no answerer is a KeyError, reported as the fake's error)."""
    _ANSWERERS[answer.kind](handler, answer, path, params)


def _serve_normal(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Serve the page the real service would."""
    if not handler._known_path(path):
        return
    handler._send(200, handler.server.fake._page(params))


def _serve_hang(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Stall, then serve normally unless the server is stopping."""
    if handler._pause(answer.seconds):
        _serve_normal(handler, answer, path, params)


def _serve_held(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Wait for the test's condition (bounded), then answer as scripted unless the server is stopping."""
    deadline = time.monotonic() + answer.seconds
    while not answer.fn() and time.monotonic() < deadline:
        if not handler._pause(0.002):
            return
    _serve(handler, answer.then, path, params)


def _serve_status(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send the scripted status and body."""
    handler._send(answer.status, answer.body, answer.content_type, answer.headers)


def _serve_mutate(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Serve the test's doctored version of the normal response."""
    doc = json.loads(handler.server.fake._page(params))
    changed = answer.fn(doc)
    handler._send(200, _dumps(doc if changed is None else changed).encode("utf-8"))


def _serve_reset(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Abort the connection: linger 0 makes close() send RST instead of FIN."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    # rfile holds a reference to the socket; the fd (and the RST) goes only when both close.
    handler.rfile.close()
    handler.connection.close()


def _serve_truncated(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Promise the whole body, send half of it, then close."""
    wire, gzipped = handler._encode(handler.server.fake._page(params))
    handler._send_headers(200, JSON_TYPE, {"Content-Length": str(len(wire))}, gzipped)
    handler.wfile.write(wire[: len(wire) // 2])
    handler.close_connection = True


def _serve_reframed(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send the normal body chunked, or with no length at all (its end is the connection closing)."""
    payload = handler.server.fake._page(params)
    wire, gzipped = handler._encode(payload)
    handler.server.fake._record_sent(payload)
    handler._send_headers(200, JSON_TYPE, answer.headers, gzipped)
    handler.close_connection = True
    pieces = (wire[start : start + 64 * 1024] for start in range(0, len(wire), 64 * 1024))
    handler._write_body(pieces, chunked="Transfer-Encoding" in answer.headers)


def _serve_huge(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Stream a JSON-looking body of total_bytes, chunk by chunk, until done or hung up on."""
    handler._send_headers(answer.status, JSON_TYPE, answer.headers, gzipped=False)
    handler.close_connection = True
    handler._write_body(_huge_stream(answer.total_bytes), chunked="Transfer-Encoding" in answer.headers, sent=handler._count_huge)


def _serve_framing(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send chunked headers, then the scripted framing, counting what is written as huge() does."""
    handler._send_headers(200, JSON_TYPE, {"Transfer-Encoding": "chunked"}, gzipped=False)
    handler.close_connection = True
    filler, sent = answer.fn(), 0
    for piece in itertools.chain([answer.body], itertools.repeat(filler)):
        if sent >= answer.total_bytes or handler.server.stopping.is_set():
            return
        handler.wfile.write(piece)
        sent += len(piece)
        handler._count_huge(len(piece))


def _serve_interim(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send each informational answer in turn, then the normal one."""
    reasons = {100: "Continue", 102: "Processing", 103: "Early Hints"}
    for code, times in ((int(code), int(times or 1)) for code, times in answer.headers.items()):
        hint = f"Link: </api/1.4/?hint={code}>; rel=preload\r\n" if code == 103 else ""
        handler.wfile.write(f"HTTP/1.1 {code} {reasons.get(code, 'Informational')}\r\n{hint}\r\n".encode() * times)
    _serve_normal(handler, answer, path, params)


def _serve_trickle(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send the headers at once, then the body a few bytes at a time."""
    wire, gzipped = handler._encode(handler.server.fake._page(params))
    handler._send_headers(200, JSON_TYPE, {"Content-Length": str(len(wire))}, gzipped)
    handler.close_connection = True
    handler._dribble(wire, answer.seconds)


def _serve_trickle_headers(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Send the status line and headers a few bytes at a time, then the body the same way."""
    wire, gzipped = handler._encode(handler.server.fake._page(params))
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {JSON_TYPE}\r\nContent-Length: {len(wire)}\r\n"
    head += "Content-Encoding: gzip\r\n\r\n" if gzipped else "\r\n"
    handler.close_connection = True
    handler._dribble(head.encode() + wire, answer.seconds)


def _serve_raw(handler: _Handler, answer: Answer, path: str, params: dict[str, str]) -> None:
    """Write the scripted bytes as they are, then close."""
    handler.wfile.write(answer.body)
    handler.close_connection = True


_ANSWERERS: dict[str, Answerer] = {
    "normal": _serve_normal,
    "limited": _serve_status,  # the fake's own rate limit refused it
    "status": _serve_status,
    "body": _serve_status,
    "hang": _serve_hang,
    "held": _serve_held,
    "mutate": _serve_mutate,
    "reset": _serve_reset,
    "truncated": _serve_truncated,
    "reframed": _serve_reframed,
    "huge": _serve_huge,
    "framing": _serve_framing,
    "interim": _serve_interim,
    "trickle": _serve_trickle,
    "trickle_headers": _serve_trickle_headers,
    "raw": _serve_raw,
}


def _huge_stream(total_bytes: int, chunk_size: int = 64 * 1024) -> Iterable[bytes]:
    """Yield total_bytes: the start of a results array, then users, with no end in sight."""
    user = _synthetic_json("huge", 1, 0, 1, USER_FIELDS)[0] + b","
    block = (user * (chunk_size // len(user) + 1))[:chunk_size]
    head = b'{"results":['
    sent = 0
    while sent < total_bytes:
        chunk = (head + block)[:chunk_size] if sent == 0 else block
        chunk = chunk[: total_bytes - sent]
        sent += len(chunk)
        yield chunk


def free_port() -> int:
    """A loopback port that is free right now (for start_later or a refused-connection test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class FakeRandomUser:
    """A fake randomuser.me on 127.0.0.1; a context manager, scriptable per request."""

    def __init__(self, latency: float = 0.0, port: int = 0, host: str = HOST, rate_limit: tuple[int, float] | None = None):
        """Configure; nothing listens until start() (or `with`)."""
        self.latency = latency  # seconds before every answer; benchmarks use 0.2
        self.rate_limit = rate_limit  # (users per client per window, window seconds), or no limit
        self.picks: str | None = None  # the seed every request that sends none is given, where a test fixes it
        self._epoch = time.monotonic()  # the fake's clock: windows are counted from here
        self._window = -1  # the window the counts belong to
        self._taken: dict[str, int] = {}  # users served to each client in that window
        self._port = port
        self.host = host
        self._lock = threading.Lock()
        self._script: deque[Answer] = deque()
        self._requests: list[Received] = []
        self._sent: list[bytes] = []
        self.huge_bytes_sent = 0  # body bytes of huge() and chunk_framing() answers written so far
        self._errors: list[BaseException] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        self._cancel_start = threading.Event()

    # Lifecycle.

    def start(self) -> FakeRandomUser:
        """Start listening now (again on the same port after a stop()); returns self."""
        with self._lock:
            if self._server is not None:
                return self
            server = _Server(self, self._port, self.host)
            # Keep the port, so a restarted fake (service back up) is at the same URL.
            self._port = server.server_address[1]
            self._server = server
            # A short poll interval, so stop() returns in 2 ms, not half a second (a test starts and stops one fake
            # or more: at 20 ms, stops alone cost the suite seconds); an idle fake wakes 500 times a second, no more.
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.002},
                name=f"fake-randomuser-{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def start_later(self, delay: float) -> FakeRandomUser:
        """Reserve a port now and listen only after `delay` s: until then connects are refused."""
        if self._port == 0:
            self._port = free_port()
        self._cancel_start.clear()

        def start_after_delay() -> None:
            """Start unless stop() came first."""
            if not self._cancel_start.wait(delay):
                self.start()

        self._starter = threading.Thread(target=start_after_delay, name="fake-randomuser-starter", daemon=True)
        self._starter.start()
        return self

    def stop(self) -> None:
        """Stop promptly, interrupting latency and hangs and closing open connections."""
        self._cancel_start.set()
        if self._starter is not None:
            self._starter.join(timeout=1)
            self._starter = None
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join(timeout=1)

    def __enter__(self) -> FakeRandomUser:
        """Start, unless start_later() is already taking care of it."""
        if self._starter is None:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Stop."""
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (known before start only if given or reserved)."""
        if self._port == 0:
            raise RuntimeError("port not chosen yet: start() first, or pass port=free_port()")
        return self._port

    @property
    def url(self) -> str:
        """The API base URL, like https://randomuser.me/api/1.4/."""
        return f"http://{self.host}:{self.port}{API_PATH}"

    # Script and observations.

    def script(self, *answers: Answer) -> FakeRandomUser:
        """Queue answers for the next requests in arrival order; then it serves normally."""
        with self._lock:
            self._script.extend(answers)
        return self

    @property
    def pending(self) -> int:
        """How many scripted answers no request has used yet."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[Received]:
        """A snapshot of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def sent(self) -> list[bytes]:
        """A snapshot of the complete status-200 bodies sent (before gzip), in order."""
        with self._lock:
            return list(self._sent)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions inside the fake (a failing mutate fn, say); should stay empty."""
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        """Forget the requests, bodies, errors and any unused script."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._sent.clear()
            self._errors.clear()
            self.huge_bytes_sent = 0

    def _page(self, params: dict[str, str]) -> bytes:
        """The normal body for these query parameters."""
        if self.picks and not params.get("seed"):
            params = {**params, "seed": self.picks}
        return self._body(parse_params(params))

    def _body(self, request: PageRequest) -> bytes:
        """The body of one sanitized request, built anew each time (benchmarks/fast_pages.py builds each once)."""
        return request.body()

    def _gzip(self, payload: bytes) -> bytes:
        """Gzip a body as the service sends it."""
        # Level 1 because pages are 5 MB; mtime 0 keeps the bytes reproducible.
        return gzip.compress(payload, compresslevel=1, mtime=0)

    def window_start(self, when: float) -> float:
        """The time.monotonic() at which the rate-limit window holding `when` began."""
        seconds = self.rate_limit[1]
        return self._epoch + (when - self._epoch) // seconds * seconds

    def next_reset(self, when: float) -> float:
        """The time.monotonic() of the first reset of every count after `when`."""
        return self.window_start(when) + self.rate_limit[1]

    def _admit(self, client: str, query: dict[str, list[str]]) -> bool:
        """Count a request's users against its client's window; False (and not counted) if over the limit."""
        if self.rate_limit is None:
            return True
        users, seconds = self.rate_limit
        wanted = parse_params({k: v[-1] for k, v in query.items()}).results
        with self._lock:
            window = int((time.monotonic() - self._epoch) // seconds)
            if window != self._window:  # every client's count resets together
                self._window, self._taken = window, {}
            if self._taken.get(client, 0) + wanted > users:
                return False
            self._taken[client] = self._taken.get(client, 0) + wanted
            return True

    def _next_answer(self) -> Answer:
        """Pop the next scripted answer, or serve normally."""
        with self._lock:
            return self._script.popleft() if self._script else Answer("normal")

    def _record(self, received: Received) -> None:
        """Log a request."""
        with self._lock:
            self._requests.append(received)

    def _record_sent(self, payload: bytes) -> None:
        """Log a status-200 body that was fully written."""
        with self._lock:
            self._sent.append(payload)

    def _unrecord_sent(self, payload: bytes) -> None:
        """Take back a body whose write failed: the client never got it."""
        with self._lock:
            for i in range(len(self._sent) - 1, -1, -1):
                if self._sent[i] is payload:
                    del self._sent[i]
                    break

    def _error(self, error: BaseException | None) -> None:
        """Log an unexpected exception."""
        with self._lock:
            self._errors.append(error)


def serve_by_hand(argv: list[str] | None = None) -> None:
    """`python tests/fake_api.py --port 8000`: serve until Ctrl-C, printing the URL to point the job at."""
    import argparse

    parser = argparse.ArgumentParser(description="A fake randomuser.me API 1.4 for trying the job with no internet.")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one; default 8000)")
    parser.add_argument("--host", default=HOST, help=f"address to listen on (default {HOST}: this machine only)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer (default 0)")
    args = parser.parse_args(argv)
    take_stop_signals()
    try:
        fake = FakeRandomUser(latency=args.latency, port=args.port, host=args.host).start()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"fake_api.py: error: cannot listen on {args.host}:{args.port}: {(exc.strerror or str(exc)).lower()}", file=sys.stderr)
        sys.exit(1)
    print(f"fake randomuser.me listening: {fake.url}  (Ctrl-C to stop)", flush=True)
    try:
        wait_for_stop()
    finally:
        fake.stop()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def take_stop_signals() -> None:
    """From here on SIGINT and SIGTERM wait, blocked in every thread, for wait_for_stop to take them."""
    # Blocked before the server's threads start (they inherit it), so a signal at any moment, mid-start
    # or a second one mid-stop, is never raised inside other code. The disposition is set here because
    # a shell that ignores SIGINT (a background job) passes that on.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


def wait_for_stop() -> None:
    """Wait for Ctrl-C or SIGTERM."""
    if hasattr(signal, "sigwait"):
        signal.sigwait(STOP_SIGNALS)
        return
    with contextlib.suppress(KeyboardInterrupt):  # Windows: Ctrl-C comes as KeyboardInterrupt
        threading.Event().wait()


if __name__ == "__main__":
    serve_by_hand()
