"""Every wait is bounded: --timeout bounds a whole answer, --max-wait bounds any wait on
the service, and the lines a fault leaves say what happened and never carry personal data.

Every case runs in-process, each on a helper thread with a bound, so a job that would hang fails
the test instead of holding it; cases about the exit status and the one error line run main(argv).
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import (
    PAGED,
    PREFIX,
    RETRY_LINE,
    assert_one_error_line,
    assert_pura_landed,
    batch_files,
    fast_env,
    fixture_bytes,
    leaked,
    pii_of,
    raw_users,
    retry_lines,
)
from fake_api import FakeRandomUser, rate_limited, raw, reset, status, trickle, truncated

import random_user_etl as etl
from _random_user_etl import client
from random_user_config import Settings, load_settings

TIMEOUT = 0.5  # --timeout of the trickle cases: a whole answer, not one socket read
TRICKLE = 0.05  # the fake sends 4 bytes this often: each read is quick, the answer never ends
BOUND = 15.0  # a run still going after this long is hung (every wait in these tests is under a second)


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) on a helper thread; the test fails if it is still running after `seconds`."""
    pool = futures.ThreadPoolExecutor(1, thread_name_prefix="bounded")
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=seconds)
    except futures.TimeoutError:
        pytest.fail(f"still running after {seconds:g}s")  # the fake's stop at teardown then ends the run
    finally:
        pool.shutdown(wait=False)


def cli_within(cli, seconds: float, *args, **kwargs):
    """cli(*args) (in-process main), failing the test if it is still running after `seconds`; with its elapsed time."""
    started = time.monotonic()
    result = within(seconds, cli, *args, **kwargs)
    return result, time.monotonic() - started


# ------------------------------------------------------------------ --timeout bounds a whole answer


@pytest.mark.parametrize("headers", [False, True], ids=["body-trickles", "headers-trickle"])
def test_a_trickled_answer_is_cut_at_the_timeout_and_retried(api, settings, caplog, headers):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(trickle(TRICKLE, headers=headers))  # then normal answers
    started = time.monotonic()
    batch = within(BOUND, etl.run, settings(seed="pura", timeout=TIMEOUT))
    elapsed = time.monotonic() - started

    assert_pura_landed(batch.path)
    assert [r.answer for r in api.requests] == ["trickle_headers" if headers else "trickle", "normal"]
    (line,) = retry_lines(caplog.records)
    assert line[4] == f"timed out: no whole answer within {TIMEOUT:g}s (--timeout)", line[0]
    assert TIMEOUT <= elapsed < TIMEOUT + 5


def test_a_trickle_on_every_try_ends_the_run_with_one_line_saying_it_timed_out(api, out, raw, cli):
    api.script(trickle(TRICKLE), trickle(TRICKLE, headers=True))
    env = fast_env(api.url, out, raw, RANDOM_USER_TIMEOUT=TIMEOUT, RANDOM_USER_RETRIES=1)
    result, elapsed = cli_within(cli, BOUND, "--seed", "pura", env=env)
    assert result.returncode == 1, result.stderr
    line = assert_one_error_line(result.stderr, "")
    assert line == PREFIX + f"page 1: timed out: no whole answer within {TIMEOUT:g}s (--timeout), gave up after 1 retry"
    assert len(api.requests) == 2 and elapsed < 2 * TIMEOUT + 8
    assert batch_files(out) == []


# ------------------------------------------------------------------ --max-wait bounds every wait


def test_max_wait_is_a_setting_from_its_flag_or_variable_with_a_default():
    assert Settings().max_wait == 900
    assert load_settings({"max_wait": "12.5"}, environ={}).max_wait == 12.5
    assert load_settings({}, environ={"RANDOM_USER_MAX_WAIT": "60"}).max_wait == 60
    assert load_settings({"max_wait": "5"}, environ={"RANDOM_USER_MAX_WAIT": "60"}).max_wait == 5


# Retry-After values far past the default --max-wait of 900 s; the line says how long was asked.
FAR = {
    "seconds": ("99999", r"99999s"),
    "http-date": ("Fri, 31 Dec 2100 23:59:59 GMT", r"\d{10}s"),
    "thousands-of-digits": ("9" * 5000, r"1000000000000000s"),  # as a float, inf ("wait infs")
}


@pytest.mark.parametrize("case", FAR)
def test_a_retry_after_beyond_max_wait_ends_the_run_at_once(api, out, raw, case, cli):
    value, asked = FAR[case]
    api.script(rate_limited(retry_after=value))
    result, elapsed = cli_within(cli, BOUND, "--seed", "pura", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(
        result.stderr,
        rf"^{PREFIX}page 1: HTTP 429, the service asks to wait {asked} \(Retry-After\), longer than --max-wait 900s$",
    )
    assert len(api.requests) == 1, "not retried: the wait asked for is longer than the run may wait"
    assert not RETRY_LINE.search(result.stderr)
    assert batch_files(out) == []


def test_a_retry_after_within_max_wait_is_waited(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(status(503, headers={"Retry-After": "1"}))
    started = time.monotonic()
    within(BOUND, etl.run, settings(seed="pura", max_wait=1))
    assert time.monotonic() - started >= 0.95
    (line,) = retry_lines(caplog.records)
    assert line[4] == "HTTP 503, waiting 1s as the service asks (Retry-After)"


def test_no_backoff_sleep_is_longer_than_max_wait(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(status(503), status(503))
    started = time.monotonic()
    batch = within(BOUND, etl.run, settings(seed="pura", backoff=60, retries=2, max_wait=0.15))
    assert_pura_landed(batch.path)
    assert 0.3 <= time.monotonic() - started < 0.3 + 5  # two sleeps of max_wait, not of 60 s and 120 s
    assert len(retry_lines(caplog.records)) == 2


def test_the_rate_limit_pause_is_no_longer_than_max_wait(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(rate_limited())
    started = time.monotonic()
    batch = within(BOUND, etl.run, settings(seed="pura", rate_limit_wait=60, max_wait=0.15))
    assert_pura_landed(batch.path)
    assert 0.15 <= time.monotonic() - started < 0.15 + 5
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.endswith("HTTP 429, pausing all requests, asking again in 0.15s")


def test_backoff_is_capped_by_max_wait():
    settings = Settings(backoff=10.0, retries=8, max_wait=25)
    assert [client.backoff_time(settings, retry) >= 10 * 2 ** (retry - 1) for retry in (1, 2)] == [True, True]
    assert [client.backoff_time(settings, retry) for retry in (3, 4, 8)] == [25, 25, 25]


def test_every_kind_of_fault_draws_on_one_retry_budget(api, settings, caplog):
    # Two retry engines once ran a request: each cut-off body restarted urllib3's count, so --retries 3 made 6.
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(status(503), reset(), truncated(), rate_limited(retry_after=0), status(503), reset())
    with pytest.raises(etl.EtlError, match=r"^page 1: HTTP 429: the service says .*, after 3 retries$"):
        within(BOUND, etl.run, settings(seed="pura", retries=3))
    assert [(m[1], m[2]) for m in retry_lines(caplog.records)] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert len(api.requests) == 4


# ------------------------------------------------------------------ lines that say what happened


def test_a_single_404_says_http_404_and_no_retries(api, settings):
    api.script(status(404, '{"error":"no such page"}'))
    with pytest.raises(etl.EtlError) as caught:
        within(BOUND, etl.run, settings(seed="pura", retries=3))
    assert str(caught.value) == "page 1: HTTP 404: the service says 'no such page'"
    assert len(api.requests) == 1


def test_an_error_after_retries_counts_the_retries_made(api, settings):
    api.script(status(503), status(404, '{"error":"no such page"}'))
    with pytest.raises(etl.EtlError) as caught:
        within(BOUND, etl.run, settings(seed="pura", retries=3))
    assert str(caught.value) == "page 1: HTTP 404: the service says 'no such page', after 1 retry"


@pytest.mark.parametrize("retries, says", [(0, "page 1: answer cut off"), (2, "page 1: answer cut off, gave up after 2 retries")])
def test_a_body_shorter_than_its_content_length_says_it_was_cut_off(api, settings, caplog, retries, says):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(*[truncated()] * (retries + 1))
    with pytest.raises(etl.EtlError) as caught:
        within(BOUND, etl.run, settings(seed="pura", retries=retries))
    assert str(caught.value) == says
    assert [m[4] for m in retry_lines(caplog.records)] == ["ProtocolError (connection broken, answer cut off)"] * retries


@pytest.mark.parametrize("cut", [b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"], ids=["in-the-status-line", "in-the-headers"])
def test_a_connection_closed_inside_the_headers_says_the_answer_was_cut_off(api, settings, caplog, cut):
    # http.client takes the close for the end of the headers: the answer looks like an empty body.
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(raw(cut), raw(cut))
    with pytest.raises(etl.EtlError) as caught:
        within(BOUND, etl.run, settings(seed="pura", retries=1))
    assert str(caught.value) == "page 1: answer cut off, gave up after 1 retry"
    assert len(retry_lines(caplog.records)) == 1 and len(api.requests) == 2


# ------------------------------------------------------------------ no personal data, whatever the transport does

SERVED = PAGED[0]  # seed "paged", page 1 of 40 users: under 64 kB, so one line of it is read whole
HOSTILE = {
    # The answer's bytes with no status line: http.client's BadStatusLine holds all of them.
    "no-status-line": lambda: raw(fixture_bytes(SERVED)),
    # Chunked by its headers, plain JSON in fact: InvalidChunkLength holds the "chunk length" line.
    "chunked-in-name-only": lambda: status(
        200, fixture_bytes(SERVED), headers={"Transfer-Encoding": "chunked", "Content-Encoding": "identity", "Connection": "close"}
    ),
    # A header line that is a person: urllib3 logs the headers it could not parse (the answer lands).
    "person-in-the-headers": lambda: raw(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n\r\n%s"
        % (len(fixture_bytes(SERVED)), "{first} {last} {email} {phone}".format(**person(raw_users(SERVED)[0])).encode(), fixture_bytes(SERVED))
    ),
}
CASES = [f"{name}:{times}" for name in HOSTILE for times in ("once", "always") if name != "person-in-the-headers" or times == "once"]


def person(user: dict) -> dict:
    """A raw user's name, email and phone."""
    return dict(first=user["name"]["first"], last=user["name"]["last"], email=user["email"], phone=user["phone"])


def run_hostile(case: str, folder: Path, cli) -> SimpleNamespace:
    """Serve a hostile answer once (then good ones) or on every try; run the CLI with -v against it."""
    name, times = case.split(":")
    out, raw_dir = folder / "out", folder / "raw"
    with FakeRandomUser() as api:
        api.script(*[HOSTILE[name]() for _ in range(1 if times == "once" else 3)])
        env = fast_env(api.url, out, raw_dir, RANDOM_USER_RETRIES=2)
        result = within(60, cli, "-v", "--seed", "paged", "--n", "40", env=env)
        return SimpleNamespace(result=result, requests=len(api.requests), errors=api.errors)


@pytest.mark.parametrize("case", CASES)
def test_no_personal_data_in_any_line_whatever_the_transport_does(case, tmp_path, cli):
    outcome = run_hostile(case, tmp_path, cli)
    stderr = outcome.result.stderr
    if case.endswith("once"):
        assert outcome.result.returncode == 0, stderr
        assert "landed 40 rows" in stderr
        assert "retry 1 of 2" in stderr or case.startswith("person"), stderr  # the log did speak of the fault
    else:
        assert outcome.result.returncode == 1, stderr
        assert stderr.rstrip().splitlines()[-1].startswith(PREFIX + "page 1: ")
        assert outcome.requests == 3
    assert leaked(stderr, pii_of(raw_users(SERVED))) == [], stderr[-2000:]
    assert "Traceback" not in stderr and outcome.errors == []
