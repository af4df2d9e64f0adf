"""The fault matrix: transient faults are retried and the run lands the right data;
persistent faults and contract breaks end the run with exit 1, one clear line, nothing written.

Every case drives the real job against the loopback fake (`fake_api.py`), scripted per request.
Transient cases call run() (caplog shows the retry lines); persistent cases call the CLI's
main(argv) in-process, because exit status and "one line on stderr" are what an operator sees.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from pathlib import Path

import polars as pl
import pytest
from support import (
    FAST,
    LOG_LINE,
    RETRY_LINE,
    assert_one_error_line,
    assert_pura_landed,
    batch_files,
    digests,
    duplicate_first_id,
    fast_env,
    info,
    landed,
    retry_lines,
    users,
)
from fake_api import FakeRandomUser, body, hang, interim, mutate, page_body, rate_limited, reset, status, truncated

import random_user_etl as etl
from _random_user_etl import client
from random_user_config import Settings
from schemas import OUTPUT_SCHEMA


# ------------------------------------------------------------------ helpers


DROP = object()  # edit(..., DROP): delete the field


def edit(path: str, value, count: int | None = 1):
    """A mutate fn setting a dotted user field (DROP deletes it) in the first `count` users (None: all)."""

    def change(results):
        for user in results if count is None else results[:count]:
            *parents, last = path.split(".")
            node = user
            for name in parents:
                node = node[name]
            if value is DROP:
                del node[last]
            else:
                node[last] = value

    return users(change)


def both(*fns):
    """Several mutate fns in a row."""

    def fn(doc):
        for f in fns:
            doc = f(doc)
        return doc

    return fn


def one_more(results):
    extra = copy.deepcopy(results[0])
    extra["login"]["uuid"] = "00000000-0000-5000-8000-000000000000"
    results.append(extra)


def without_results(doc):
    return {k: v for k, v in doc.items() if k != "results"}


def with_extra_fields(doc):
    """What a future service might add: new top-level, nested, info and envelope fields."""
    for user in doc["results"]:
        user["favourite_colour"] = "teal"
        user["login"]["password_hint"] = {"nested": [1, 2, 3]}
        user["location"]["coordinates"]["altitude"] = "12.5"
        user["dob"]["zodiac"] = None
    doc["info"]["generated_by"] = "randomuser 1.5"
    doc["warnings"] = ["some future field"]
    return doc


# ------------------------------------------------------------------ transient faults

# id: (script, settings changes, retry lines expected, reason pattern, least elapsed seconds)
TRANSIENT = {
    "http-500": ([status(500)], {}, 1, r"HTTP 500", 0),
    "http-502": ([status(502)], {}, 1, r"HTTP 502", 0),
    "http-503": ([status(503)], {}, 1, r"HTTP 503", 0),
    "http-504": ([status(504)], {}, 1, r"HTTP 504", 0),
    "http-503-until-the-last-retry": ([status(503)] * 3, {"retries": 3}, 3, r"HTTP 503", 0),
    "connection-reset": ([reset()], {}, 1, r"(?i)reset by peer|connection aborted", 0),
    "read-timeout": ([hang(1.0)], {"timeout": 0.3}, 1, r"(?i)timed out", 0.3),
    "truncated-body": ([truncated()], {}, 1, r"(?i)incompleteread|connection broken", 0),
    "429-retry-after-1-honoured": ([rate_limited(retry_after=1)], {"rate_limit_wait": 0.01}, 1, r"HTTP 429", 0.95),
    "429-retry-after-0": ([rate_limited(retry_after=0)], {}, 1, r"HTTP 429", 0),  # a bare 429 is no retry: tests/test_pace.py
    "503-retry-after-fractional": ([status(503, headers={"Retry-After": "0.5"})], {}, 1, r"HTTP 503", 0),
    "several-kinds-in-a-row": (
        [status(502), reset(), truncated(), rate_limited(retry_after=0)],
        {"retries": 4},  # one budget for every kind: four faults need four retries
        4,
        r"HTTP 502|(?i:reset|aborted|broken|incompleteread)|HTTP 429",
        0,
    ),
}


@pytest.mark.parametrize("script, changes, retries, reason, least", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_a_transient_fault_is_retried_and_the_run_lands_the_right_data(api, out, settings, caplog, script, changes, retries, reason, least):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(*script)
    started = time.monotonic()
    batch = etl.run(settings(seed="pura", **changes))
    elapsed = time.monotonic() - started

    assert batch.rows == 100 and batch_files(out) == ["random_users_pura.parquet"]
    assert_pura_landed(batch.path)
    assert len(api.requests) == len(script) + 1  # one try per fault, then the good answer: no hammering
    assert least <= elapsed < least + 5

    # One line per retry, saying what (the page's query) and why; nothing else is a warning.
    lines = retry_lines(caplog.records)
    assert len(lines) == retries, caplog.text
    for line in lines:
        assert "page=1" in line[3] and "seed=pura" in line[3] and "://" not in line[3]
        assert re.search(reason, line[4]), line[0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "random_user_etl"]
    assert len(warnings) == retries, [r.getMessage() for r in warnings]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_retry_lines_count_up_to_the_budget(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(*[status(503)] * 3)
    etl.run(settings(seed="pura", retries=3))
    assert [(m[1], m[2]) for m in retry_lines(caplog.records)] == [("1", "3"), ("2", "3"), ("3", "3")]


def test_a_bare_429_says_it_pauses_for_the_rate_limit_wait(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(rate_limited())
    etl.run(settings(seed="pura", rate_limit_wait=0.2))
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("rate limited for 0.0s at /api/1.4/?") and line.endswith("HTTP 429, pausing all requests, asking again in 0.2s")


def test_connection_refused_until_the_service_comes_up(out, raw, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    late = FakeRandomUser().start_later(0.3)
    with late:
        values = dict(api_url=late.url, output_dir=str(out), raw_dir=str(raw), timeout=0.5, retries=5, backoff=0.05)
        batch = etl.run(Settings(seed="pura", **values))
        assert len(late.requests) == 1
    assert_pura_landed(batch.path)
    lines = retry_lines(caplog.records)
    assert lines and all(re.search(r"(?i)refused", m[4]) for m in lines)
    assert "Traceback" not in caplog.text


def test_extra_fields_the_service_may_add_are_ignored(api, out, settings):
    api.script(mutate(with_extra_fields))
    batch = etl.run(settings(seed="pura"))
    assert_pura_landed(batch.path)
    assert pl.read_parquet(batch.path).schema == OUTPUT_SCHEMA


# ------------------------------------------------------------------ persistent faults

HTML = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

# id: (script, pattern the error line must match)
PERSISTENT = {
    "every-retry-used-up-503": ([status(503)] * 4, r"page 1: HTTP 503: the service says .*after 3 retries"),
    "every-retry-used-up-reset": ([reset()] * 4, r"page 1: cannot reach .*(?i:reset|aborted)"),
    "every-retry-used-up-truncated": ([truncated()] * 4, r"page 1: answer cut off, gave up after 3 retries"),
    "every-retry-used-up-timeout": ([hang(1.0)] * 4, r"page 1: .*(?i:timed out)"),
    "html-page-with-200": ([body(HTML, content_type="text/html")], r"page 1: the answer is an HTML page, not JSON"),
    "error-body-with-200": ([status(200)], r"page 1: the service answered with an error: 'Uh oh"),
    "error-body-with-500": ([status(500)] * 4, r"page 1: HTTP 500: the service says 'Uh oh.*after 3 retries"),
    "not-json": ([body("this is not json {")], r"page 1: the answer is not JSON"),
    "empty-body": ([body("")], r"page 1: the answer is not JSON"),
    "results-missing": ([mutate(without_results)], r"page 1: the answer has no results"),
    "fewer-users": ([mutate(users(lambda r: r.pop()))], r"asked for 100 users, the answer holds 99"),
    "more-users": ([mutate(users(one_more))], r"asked for 100 users, the answer holds 101"),
    "another-page": ([mutate(info(page=2))], r"asked for page 1, the answer is for page 2"),
    "another-seed": ([body(page_body("gbonly", 1, 100))], r"asked for seed 'pura', the answer is for seed 'gbonly'"),
    "info-seed-differs": ([mutate(info(seed="someoneelse"))], r"asked for seed 'pura', the answer is for seed 'someoneelse'"),
    "uuid-missing": ([mutate(edit("login.uuid", DROP, 1))], r"login\.uuid is missing or null in 1 records"),
    "uuid-null": ([mutate(edit("login.uuid", None, 3))], r"login\.uuid is missing or null in 3 records"),
    "uuid-duplicate": ([mutate(users(duplicate_first_id))], r"login\.uuid repeats in 1 records"),
    "latitude-not-a-number": (
        [mutate(edit("location.coordinates.latitude", "north", 2))],
        r"location\.coordinates\.latitude does not parse as a number in 2 records",
    ),
    "latitude-out-of-range": (
        [mutate(edit("location.coordinates.latitude", "90.5", 1))],
        r"latitude lies outside \[-90, 90\] in 1 records",
    ),
    "longitude-out-of-range": (
        [mutate(edit("location.coordinates.longitude", "-180.01", 3))],
        r"longitude lies outside \[-180, 180\] in 3 records",
    ),
    "date-does-not-parse": ([mutate(edit("dob.date", "31/02/1990", 2))], r"dob\.date does not parse as a date in 2 records"),
    "registered-date-does-not-parse": (
        [mutate(edit("registered.date", "yesterday", 1))],
        r"registered\.date does not parse as a date in 1 records",
    ),
    "email-dropped-from-every-user": ([mutate(edit("email", DROP, None))], r"email is missing or null in 100 records"),
    "name-last-dropped": ([mutate(edit("name.last", DROP, 4))], r"name\.last is missing or null in 4 records"),
    "two-checks-at-once": (
        [mutate(both(edit("location.coordinates.latitude", "-91", 1), edit("dob.date", "soon", 2)))],
        r"2 contract check\(s\) failed: .*dob\.date does not parse as a date in 2 records.*latitude lies outside \[-90, 90\] in 1 records",
    ),
}


@dataclasses.dataclass
class Outcome:
    """What one CLI run against a scripted fake left behind."""

    result: object  # support.Ran
    before: dict[str, bytes]
    after: dict[str, bytes]
    batches: list[str]
    requests: int
    errors: list


def run_persistent(case: str, folder: Path, cli) -> Outcome:
    """Land a batch of seed pura, then run the CLI for pura against the case's faults."""
    script, _ = PERSISTENT[case]
    out, raw = folder / "out", folder / "raw"
    with FakeRandomUser() as api:
        etl.run(Settings(**FAST, seed="pura", api_url=api.url, output_dir=str(out), raw_dir=str(raw)))
        before = landed(out)  # holds .staging/pura.lock (empty) from that run: compared as is, it must not change
        api.clear()
        api.script(*script)
        # A short read timeout only where the case is about timeouts: elsewhere a loaded machine could trip it.
        timeout = ["--timeout", "0.1"] if case.endswith("timeout") else []
        result = cli("--seed", "pura", *timeout, env=fast_env(api.url, out, raw))
        return Outcome(result, before, landed(out), batch_files(out), len(api.requests), api.errors)


@pytest.mark.parametrize("case", PERSISTENT)
def test_a_persistent_fault_fails_with_one_line_and_changes_nothing(case, tmp_path, cli):
    outcome = run_persistent(case, tmp_path, cli)
    result, says = outcome.result, PERSISTENT[case][1]
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, says)
    assert outcome.batches == ["random_users_pura.parquet"]
    assert digests(outcome.after) == digests(outcome.before)  # every earlier file byte for byte, and no new file at all
    assert outcome.errors == []
    if case.startswith("every-retry-used-up"):  # exactly the budget: 1 try + 3 retries, one line each
        # A try cut at a 0.1 s deadline on a loaded machine may end before its request reached the fake:
        # it is still a try, so the retry lines are the budget, and the fake saw at most that many.
        assert outcome.requests == 4 if not case.endswith("timeout") else 1 <= outcome.requests <= 4
        assert len(RETRY_LINE.findall(result.stderr)) == 3, result.stderr


def test_the_cli_logs_one_line_per_retry_and_no_traceback(api, out, raw, cli):
    api.script(status(503), reset(), truncated(), rate_limited(retry_after=0))
    result = cli("--seed", "pura", env=fast_env(api.url, out, raw, RANDOM_USER_RETRIES=4))
    assert result.returncode == 0, result.stderr
    assert_pura_landed(out / "random_users_pura.parquet")
    lines = result.stderr.rstrip("\n").splitlines()
    assert all(LOG_LINE.match(line) for line in lines), result.stderr
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 4 and all(RETRY_LINE.search(line) for line in warnings), result.stderr
    assert [re.search(r": (HTTP \d+|\w+)", w.split("seed=pura", 1)[1])[1] for w in warnings] == [
        "HTTP 503",
        "ProtocolError",
        "ProtocolError",
        "HTTP 429",
    ]
    assert "Traceback" not in result.stderr and "landed 100 rows" in lines[-1]


def test_a_rejected_answer_keeps_the_raw_answers_of_an_earlier_good_run(api, out, raw, settings):
    etl.run(settings(seed="pura"))
    kept = landed(raw)
    assert list(kept) == ["pura/page-00001.json.gz"]
    api.script(mutate(users(duplicate_first_id)))
    with pytest.raises(etl.EtlError, match="repeats"):
        etl.run(settings(seed="pura"))
    after = landed(raw)
    # The good answer kept earlier survives a bad answer for the same page; the bad one is kept aside.
    assert digests({"pura/page-00001.json.gz": after["pura/page-00001.json.gz"]}) == digests(kept)
    assert sorted(after) == ["pura/page-00001.json.gz", "pura/rejected-page-00001.json.gz"]


def test_an_answer_that_claims_gzip_but_is_not_fails_clearly(api, out, settings):
    api.script(status(200, b"this is not gzip", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(etl.EtlError, match="page 1: the answer is not valid gzip"):
        etl.run(settings(seed="pura", retries=0))
    assert batch_files(out) == []


def test_an_answer_in_an_encoding_not_asked_for_is_refused(api, out, settings):
    api.script(status(200, b"\x00\x01", headers={"Content-Encoding": "br"}))
    with pytest.raises(etl.EtlError, match="encoding that was not asked for: 'br'"):
        etl.run(settings(seed="pura", retries=0))
    assert api.requests[0].headers["accept-encoding"] == "gzip"


def test_an_encoding_header_that_is_not_a_token_is_not_echoed(api, out, settings):
    # A header is the service's free text: a person's name and email there must not reach the line.
    who = "flavie flavie.faure@example.com"
    api.script(status(200, b"\x00\x01", headers={"Content-Encoding": who}))
    with pytest.raises(etl.EtlError) as refused:
        etl.run(settings(seed="pura", retries=0))
    assert str(refused.value) == "page 1: answer in an encoding that was not asked for"


def test_backoff_grows_from_the_first_retry_with_jitter_and_a_cap():
    settings = Settings(backoff=1.0, retries=8)
    waits = [client.backoff_time(settings, retry) for retry in range(1, 9)]
    # base 1 s doubling from the first retry, plus up to half a base of jitter, capped at 32 bases.
    for k, wait in enumerate(waits[:5]):
        assert 2**k <= wait <= 2**k + 0.5, waits
    assert waits[5] == waits[6] == waits[7] == 32.0
    assert len({client.backoff_time(settings, 1) for _ in range(20)}) > 1, "no jitter"


@pytest.mark.parametrize("error_body", [b'{"error":' + b"[" * 100_000, b'{"error":[' + b"[]," * 3_000_000 + b"[]]}"], ids=["deep", "wide"])
def test_an_error_answer_of_nested_or_tiny_values_is_not_read_for_its_message(api, settings, error_body):
    # The service's own error bodies are short: a hostile one must not crash the reading or fill memory.
    api.script(status(404, error_body))
    with pytest.raises(etl.EtlError) as refused:
        etl.run(settings(seed="pura"))
    assert str(refused.value) == "page 1: HTTP 404"


# ------------------------------------------------------------------ informational answers


def test_endless_informational_answers_are_a_transport_fault_not_read_on_and_on(api, settings):
    # Each is small, but a service sending them without end would be read past for as long as --timeout lets it.
    api.script(interim(103, times=10_000), interim(103, times=10_000))
    with pytest.raises(etl.EtlError, match=r"^page 1: bad answer from .*: .*\(not an HTTP answer\), gave up after 1 retry$"):
        etl.run(settings(seed="pura", retries=1))


@pytest.mark.parametrize("codes", [(103,), (102, 103), (100, 103, 102)], ids=["103", "102-103", "100-103-102"])
def test_informational_answers_before_the_real_one_are_skipped(codes, api, out, settings, caplog):
    api.script(interim(*codes))
    batch = etl.run(settings(seed="pura", retries=0))
    assert_pura_landed(batch.path)
    assert [r.answer for r in api.requests] == ["interim"]
