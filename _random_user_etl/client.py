"""The one retry loop: a page's request tried again on a fault or a status worth it, waits bounded and stoppable."""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import json
import logging
import random
import re
import threading
import time
from urllib.parse import urlsplit
import requests
from random_user_config import Settings, shorten
from schemas import INCLUDED_FIELDS
from _random_user_etl.answer import PageRequest
from _random_user_etl.errors import EtlError, ServiceError, Stopped, on_page
from _random_user_etl.wire import Answer, Attempt, Fault, STOP, TRANSPORT_ERRORS, fault_of, hold, read_body, redact, unpack

log = logging.getLogger("random_user_etl")  # one logger for the job: the CLI lets only its records carry text


RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


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


def fetch_page(session: requests.Session, settings: Settings, request: PageRequest, gate: RateGate | None = None) -> Answer:
    """One page's answer, by the run's one retry loop."""
    # A transport fault, a cut-off answer or a status worth retrying is tried again, up to --retries
    # times, after the rate-limit pause, the service's Retry-After or a jittered backoff; no wait is
    # longer than --max-wait, and a stop ends any of them at once. One log line per retry.
    gate = gate or RateGate()
    params = page_params(settings, request)
    where = redact(requests.Request("GET", settings.api_url, params=params).prepare().url)
    for retry in itertools.count(1):
        gate.wait()
        most = settings.retries
        last = retry > most
        try:
            response, answer = ask(session, settings, params, last)
        except Fault as fault:
            most = min(most, fault.retries)  # fewer for a fault that retrying does not mend
            if retry > most:
                raise ServiceError(f"{fault.line}{retries_made(retry - 1, 'gave up after')}", page=request.page) from fault
            why, seconds, shared = fault.reason, backoff_time(settings, retry), False
        except EtlError as exc:
            raise on_page(exc, request.page) from exc
        else:
            if response.status_code == 200:
                return answer
            if answer is not None or response.is_redirect:
                raise status_error(response, answer, settings, request.page, retry - 1)
            why, seconds, shared = status_wait(response, settings, retry, request.page)
        log.warning("retry %d of %d for %s: %s", retry, most, where, why)
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
                raise Stopped() from exc
            raise fault_of(exc, settings, reading=response is not None, timed_out=attempt.expired) from exc


def retries_made(count: int, verb: str = "after") -> str:
    """', after 3 retries' (or another verb), or nothing when no retry was made."""
    return f", {verb} {count} {'retry' if count == 1 else 'retries'}" if count else ""


def status_error(response: requests.Response, answer: Answer | None, settings: Settings, page: int, retries: int) -> ServiceError:
    """The error that ends the run on an answer that is not 200: a redirect, or an error status with the service's word."""
    if response.is_redirect:
        target = urlsplit(response.headers.get("Location", "")).hostname or "elsewhere"
        return ServiceError(f"HTTP {response.status_code} redirect to {shorten(target)}, not followed", page=page)
    says = service_says(answer, settings.max_response_bytes)
    return ServiceError(f"HTTP {response.status_code}{says}{retries_made(retries)}", page=page)


def status_wait(response: requests.Response, settings: Settings, retry: int, page: int) -> tuple[str, float, bool]:
    """Why a status is retried, how long to wait first, and whether every worker waits (the rate limit)."""
    why, asked = f"HTTP {response.status_code}", retry_after(response)
    if asked and asked > settings.max_wait:
        raise ServiceError(
            f"{why}, the service asks to wait {asked:.0f}s (Retry-After), longer than --max-wait {settings.max_wait:g}s", page=page
        )
    if asked:
        return f"{why}, waiting {asked:g}s as the service asks (Retry-After)", asked, False
    if response.status_code == 429 and asked is None:  # randomuser.me's own 429 says nothing of when
        seconds = min(settings.rate_limit_wait, settings.max_wait)
        return f"{why}, rate limited: pausing all requests for {seconds:g}s", seconds, True
    return why, backoff_time(settings, retry), False


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

