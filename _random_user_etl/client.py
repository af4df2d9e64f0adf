"""The one retry loop: a page's request tried again on a fault or a status worth it, waits bounded and stoppable."""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit
import requests
from _random_user_etl.shown import shorten, shown_url
from random_user_config import Settings
from schemas import INCLUDED_FIELDS
from _random_user_etl.answer import PageRequest
from _random_user_etl.errors import EtlError, ServiceError, on_page
from _random_user_etl.stop import Stop
from _random_user_etl.wire import Answer, Fault, Transport, unpack

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


# Said once, on the last line of a run that could not reach the service at all.
OFFLINE_WAYS = "; with no internet, --replay a recorded answer or run the fake service (README: Try it offline)"


RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class RateGate:
    """The service's rate limit, shared by every worker: shut on a bare 429, one request probes it, a success opens it."""

    # A bare 429 says nothing of when the limit lifts, so after one every worker waits here while a
    # single request asks again every --rate-limit-wait; refused requests cost the service nothing.
    def __init__(self, stop: Stop) -> None:
        self.stop = stop  # the run's: a stop or wind-down ends a wait here at once
        self._lock = threading.Lock()
        self._resume_at = 0.0  # when the next probe may go
        self._prober: object | None = None  # the token of the one request probing now
        self.limited_since: float | None = None  # the first refusal of the stretch under way
        self.gave_up: ServiceError | None = None  # what ended the run, raised again in every worker
        self.fetched = 0  # users served so far
        self.resets: list[tuple[float, int]] = []  # each reset seen: when, and the users served before it
        self.watch: Callable[[float | None], None] | None = None  # called with the seconds rate limited on each refusal, None when the gate opens

    def enter(self) -> object | None:
        """Wait until a request may go: a token if it is the probe of a shut gate, else None."""
        while True:
            with self._lock:
                if self.gave_up:
                    raise ServiceError(self.gave_up.reason, page=self.gave_up.page)
                if self.limited_since is None:
                    return None
                left = self._resume_at - time.monotonic()
                if left <= 0 and self._prober is None:
                    self._prober = object()
                    return self._prober
            self.stop.hold(left if left > 0 else PROBE_POLL)  # the probe's answer decides: look again soon

    def refused(self, settings: Settings, page: int | None, token: object | None) -> tuple[float, float]:
        """Count a bare 429: shut the gate, and say how long it has been shut and when to ask again."""
        with self._lock:
            now = time.monotonic()
            self.limited_since = self.limited_since or now
            self._release(token)
            waited = now - self.limited_since
            if waited >= settings.max_wait:
                self.gave_up = ServiceError(
                    f"HTTP 429, rate limited for {seconds_text(waited)}, longer than --max-wait {settings.max_wait:g}s; staged pages are kept for a rerun",
                    page=page,
                )
                raise self.gave_up
            seconds = min(settings.rate_limit_wait, settings.max_wait - waited)
            self._resume_at = max(self._resume_at, now + seconds)
        if self.watch:
            self.watch(waited)
        return waited, seconds

    def served(self, users: int, token: object | None) -> None:
        """Count a page served; the probe's success opens the gate for every worker (a reset was seen)."""
        with self._lock:
            self.fetched += users
            if token is None or token is not self._prober:
                return  # sent before the limit shut the gate: it says nothing of a reset
            self._prober = None
            self.resets.append((time.monotonic(), self.fetched - users))
            self.limited_since = None
        if self.watch:
            self.watch(None)

    def release(self, token: object | None) -> None:
        """The probe ended neither served nor refused (a fault, a stop): let another request probe."""
        with self._lock:
            self._release(token)

    def _release(self, token: object | None) -> None:
        """Give up the probe, if `token` holds it (the lock held)."""
        if token is not None and token is self._prober:
            self._prober = None

    def limited_for(self) -> float | None:
        """Seconds since the limit shut the gate, or None while it is open."""
        since = self.limited_since
        return None if since is None else time.monotonic() - since

    def pace(self) -> tuple[int, float] | None:
        """Users per window and the window's seconds, as seen between the last two resets; None before two."""
        with self._lock:
            if len(self.resets) < 2:
                return None
            (before, users_before), (last, users_last) = self.resets[-2:]
        return users_last - users_before, last - before

    def time_left(self, remaining: int) -> float | None:
        """Seconds until `remaining` more users can be served, counted in windows; None unless the limit binds."""
        pace = self.pace()
        if pace is None or not pace[0] or pace[1] <= 0:
            return None
        per_window, window = pace
        with self._lock:
            last, users_last = self.resets[-1]
            taken = self.fetched - users_last  # users served since the last reset
        this_window, now = max(per_window - taken, 0), time.monotonic()  # still to be had before the next reset
        if remaining <= this_window:  # the limit no longer binds: the pace since the reset does
            return remaining * (now - last) / taken if taken else None
        next_reset = last + window * max(1, math.ceil((now - last) / window))
        return next_reset - now + (math.ceil((remaining - this_window) / per_window) - 1) * window


PROBE_POLL = 0.05  # seconds between looks at a shut gate while its probe is out


def seconds_text(seconds: float) -> str:
    """A duration for a line: '912s', or '0.4s' under ten seconds."""
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


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


class Service:
    """One run's way to the service: its settings, its transport (or one swapped in), its rate gate and its stop."""

    def __init__(self, settings: Settings, stop: Stop | None = None, transport: Transport | None = None):
        self.settings, self.stop = settings, stop or Stop()
        self.transport = transport or Transport(settings, self.stop)
        self.gate = RateGate(self.stop)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info) -> None:
        self.transport.__exit__(*exc_info)

    def fetch_page(self, request: PageRequest) -> Answer:
        """One page's answer, by the run's one retry loop."""
        # How long a page may take: at most --retries + 1 tries of at most --timeout each, with a wait
        # before each retry of at most --max-wait (a jittered backoff, or the service's Retry-After),
        # plus any stretches of the rate limit (a bare 429), each ended within --max-wait; they draw
        # nothing on --retries. A stop ends any wait or try at once. One log line per retry.
        settings, gate = self.settings, self.gate
        params = page_params(settings, request)
        where = shown_url(requests.Request("GET", settings.api_url, params=params).prepare().url, path_only=True)
        retry = 0  # retries made so far
        while True:
            token = gate.enter()
            most = settings.retries
            last = retry >= most
            try:
                response, answer = self.transport.ask(params, functools.partial(unread, last=last))
            except Fault as fault:
                gate.release(token)
                most = min(most, fault.retries)  # fewer for a fault that retrying does not mend
                if retry >= most:
                    hint = OFFLINE_WAYS if fault.unreachable else ""
                    raise ServiceError(f"{fault.line}{retries_made(retry, 'gave up after')}{hint}", page=request.page) from fault
                retry += 1
                why, seconds = fault.reason, backoff_time(settings, retry)
            except BaseException as exc:
                gate.release(token)
                if isinstance(exc, EtlError):
                    raise on_page(exc, request.page) from exc
                raise
            else:
                if response.status_code == 200:
                    assert answer is not None  # every 200 is read
                    gate.served(request.results or 0, token)
                    return answer
                if rate_limit_refusal(response):
                    waited, seconds = gate.refused(settings, request.page, token)
                    log.warning("rate limited for %s at %s: HTTP 429, pausing all requests, asking again in %gs", seconds_text(waited), where, seconds)
                    continue
                gate.release(token)
                if answer is not None or response.is_redirect:
                    raise status_error(response, answer, settings, request.page, retry)
                retry += 1
                why, seconds = status_wait(response, retry_after(response), settings, retry, request.page)
            log.warning("retry %d of %d for %s: %s", retry, most, where, why)
            self.stop.hold(seconds)


def unread(response: requests.Response, last: bool) -> bool:
    """True for an answer whose body is not worth reading: a redirect, the rate limit, or a status still to retry."""
    return response.is_redirect or rate_limit_refusal(response) or (response.status_code in RETRIED_STATUSES and not last)


def rate_limit_refusal(response: requests.Response) -> bool:
    """A 429 that says nothing of when to come back: the service's rate limit, waited out, never a retry."""
    return response.status_code == 429 and retry_after(response) is None


def retries_made(count: int, verb: str = "after") -> str:
    """', after 3 retries' (or another verb), or nothing when no retry was made."""
    return f", {verb} {count} {'retry' if count == 1 else 'retries'}" if count else ""


def status_error(response: requests.Response, answer: Answer | None, settings: Settings, page: int | None, retries: int) -> ServiceError:
    """The error that ends the run on an answer that is not 200: a redirect, or an error status with the service's word."""
    if response.is_redirect:
        return ServiceError(f"HTTP {response.status_code} redirect to {redirect_host(response)}, not followed", page=page)
    says = service_says(answer, settings.max_response_bytes) if answer is not None else ""
    return ServiceError(f"HTTP {response.status_code}{says}{retries_made(retries)}", page=page)


def redirect_host(response: requests.Response) -> str:
    """The host a redirect points to, fit for a line; "elsewhere" when its Location names none, or none that parses."""
    try:
        host = urlsplit(response.headers.get("Location", "")).hostname
    except ValueError:  # "http://[::1": a bracket left open
        host = None
    return shorten(host) if host else "elsewhere"


def status_wait(response: requests.Response, asked: float | None, settings: Settings, retry: int, page: int | None) -> tuple[str, float]:
    """Why a status is retried, and how long to wait first (`asked`: its Retry-After, if any)."""
    why = f"HTTP {response.status_code}"
    if asked and asked > settings.max_wait:
        raise ServiceError(f"{why}, the service asks to wait {asked:.0f}s (Retry-After), longer than --max-wait {settings.max_wait:g}s", page=page)
    if asked:
        return f"{why}, waiting {asked:g}s as the service asks (Retry-After)", asked
    return why, backoff_time(settings, retry)


LONGEST_RETRY_AFTER = 10**15  # seconds: what a longer Retry-After is read as (any of them is past --max-wait)


def retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds, whole or to an HTTP date; None if absent or unreadable ("soon", "0.5")."""
    # Read here, not by urllib3, which caps the value at 6 hours: a longer wait is reported as asked.
    value = response.headers.get("Retry-After", "").strip()
    if re.fullmatch(r"[0-9]+", value):
        digits = value.lstrip("0") or "0"  # thousands of digits would read as inf, or past int()'s limit
        return float(int(digits)) if len(digits) <= 15 else float(LONGEST_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no zone said
        when = when.replace(tzinfo=dt.UTC)
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


def backoff_time(settings: Settings, retry: int) -> float:
    """The sleep before retry k (from 1): base, 2·base, 4·base..., jittered, capped at 32 bases and at --max-wait."""
    grown = settings.backoff * 2.0 ** min(retry - 1, 5) + random.random() * settings.backoff / 2
    return min(grown, settings.backoff * 32, settings.max_wait)


SERVICE_SAYS_BYTES = 64 * 1024  # the most of an error answer read for the service's message


def service_says(answer: Answer, limit: int) -> str:
    """The service's own error message in an answer, as ': message', or ''."""
    try:  # the service's own error bodies are short: a longer one is not read (a reader builds a node per value)
        message = json.loads(unpack(answer, min(limit, SERVICE_SAYS_BYTES))).get("error")
    except (EtlError, ValueError, AttributeError, RecursionError):
        return ""
    return f": the service says '{shorten(message, 200)}'" if message else ""
