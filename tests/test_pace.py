"""Long pulls at the service's pace: the rate limit is waited out, not retried, probed by one request at a time."""

import logging
import random
import re
import time

import polars as pl
import pytest

from support import assert_one_error_line, assert_rows_are, batch_files, fast_env, served_users
from fake_api import FakeRandomUser, held, normal, rate_limited, status

import random_user_etl as etl
import random_user_config as config

WINDOW = 0.5  # seconds: the service's 300 s window, scaled down
PER_WINDOW = 1000  # users per window: the service's 20,000, scaled down
PAGE = 250
PROBE = 0.05  # --rate-limit-wait in these tests


@pytest.fixture
def limited():
    """A fake randomuser.me with the rate limit: PER_WINDOW users per WINDOW seconds."""
    with FakeRandomUser(rate_limit=(PER_WINDOW, WINDOW)) as server:
        yield server


def limited_settings(fake, out, raw, **changes) -> config.Settings:
    """Settings pointing at a rate-limited fake, probing every PROBE seconds, with one retry."""
    values = dict(
        api_url=fake.url,
        output_dir=str(out),
        raw_dir=str(raw),
        timeout=5.0,
        retries=1,
        backoff=0.01,
        rate_limit_wait=PROBE,
        page_size=PAGE,
        concurrency=4,
    )
    values.update(changes)
    return config.Settings(**values)


def test_waiting_on_the_rate_limit_draws_nothing_on_the_retry_budget(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    api.script(*[rate_limited()] * 6)
    batch = etl.run(settings(seed="pura", retries=1))
    assert batch.rows == 100 and len(api.requests) == 7
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 6 and all("rate limited for" in line and "retry" not in line for line in said), said


def test_a_status_after_the_limit_still_has_its_whole_retry_budget(api, settings):
    api.script(status(503), *[rate_limited()] * 4, status(503))
    assert etl.run(settings(seed="pura", retries=2)).rows == 100  # two 503s, two retries: the 429s took none
    api.clear()
    api.script(status(503), *[rate_limited()] * 4, status(503))
    with pytest.raises(etl.EtlError, match=r"^page 1: HTTP 503: the service says .*, after 1 retry$"):
        etl.run(settings(seed="pura", retries=1))


def test_rate_limited_past_max_wait_exits_1_saying_how_long_and_keeps_staged_pages(api, out, raw, cli):
    api.script(normal(), *[rate_limited()] * 200)
    started = time.monotonic()
    result = cli(
        "--n",
        30,
        "--seed",
        "paged",
        "--page-size",
        10,
        "--concurrency",
        1,
        env=fast_env(api.url, out, raw, RANDOM_USER_RETRIES=1, RANDOM_USER_MAX_WAIT=0.4),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    line = assert_one_error_line(result.stderr, r"page 2: HTTP 429, rate limited for 0\.\ds, longer than --max-wait 0\.4s; staged pages are kept for a rerun$")
    assert float(re.search(r"for (\S+)s,", line)[1]) >= 0.4
    assert elapsed < 0.4 + 10  # a wait past --max-wait, then out: not 200 refusals' worth
    refused = [r for r in api.requests if r.answer == "status"]
    assert 0.4 / 0.05 - 1 <= len(refused) <= 0.4 / 0.05 + 2  # asked again every --rate-limit-wait, no faster
    assert list((out / ".staging" / "paged").glob("part-*.parquet")) and batch_files(out) == []


def test_one_request_probes_the_limit_while_every_worker_waits(limited, out, raw):
    batch = etl.run(limited_settings(limited, out, raw, n=3000, seed="paged"))
    assert batch.rows == 3000
    # Requests already on the wire when a stretch's first refusal came may be refused just after it;
    # from then on one request at a time probes, every --rate-limit-wait, not one per worker.
    stretches, previous = [], "normal"
    for request in limited.requests:
        if request.answer == "limited":
            if previous != "limited":
                stretches.append([])
            stretches[-1].append(request.at)
        previous = request.answer
    assert len(stretches) >= 2, "the pull met the limit more than once"
    probes = [[t for t in stretch if t > stretch[0] + 0.1] for stretch in stretches]
    gaps = [b - a for stretch in probes for a, b in zip(stretch, stretch[1:], strict=False)]
    assert gaps and min(gaps) >= PROBE * 0.8, [round(g, 3) for g in gaps]


def test_a_pull_of_five_windows_finishes_soon_after_the_fourth_reset(limited, out, raw):
    batch = etl.run(limited_settings(limited, out, raw, n=5 * PER_WINDOW, seed="paged"))
    finished = time.monotonic()
    resets = [limited.next_reset(limited.requests[0].at)]
    while len(resets) < 4:
        resets.append(limited.next_reset(resets[-1]))
    reset = resets[-1]
    assert reset <= finished < reset + 2 + PROBE, f"finished {finished - reset:.2f}s after the fourth reset"
    assert any(r.answer == "limited" for r in limited.requests), "the pull never met the limit"
    # Each reset is met soon: the first page served after it comes within one probe interval, as the job
    # spaced its probes in this very run (a loaded machine stretches both alike), and a little.
    served = [r.at for r in limited.requests if r.answer == "normal"]
    asked = sorted(limited.requests, key=lambda r: r.at)
    # Probe after probe while the limit held: two refusals in a row, with no page served between them.
    spacings = [b.at - a.at for a, b in zip(asked, asked[1:], strict=False) if a.answer == b.answer == "limited"]
    interval = max([PROBE, *spacings])
    gaps = [next(t for t in served if t >= at) - at for at in resets]
    late = [round(gap, 3) for gap in gaps if gap > interval + 0.25]
    assert late == [], f"pages served this long after a reset: {late}"
    assert_rows_are(pl.read_parquet(batch.path), served_users("paged", 5 * PER_WINDOW, PAGE))


def test_the_log_says_how_long_it_has_been_rate_limited(limited, out, raw, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    etl.run(limited_settings(limited, out, raw, n=2 * PER_WINDOW, seed="paged", concurrency=1))
    done = time.monotonic()
    waits = [float(m[1]) for r in caplog.records if (m := re.match(r"rate limited for ([0-9.]+)s", r.getMessage()))]
    refused = [r.at for r in limited.requests if r.answer == "limited"]
    assert len(waits) == len(refused) >= 3 and waits == sorted(waits), waits
    # Bounds a loaded machine cannot break (lines show tenths, hence the 0.05): the job waited at least
    # PROBE between refusals, and cannot have been limited for longer than from the first refusal the
    # fake received to the end of the run.
    assert (len(waits) - 1) * PROBE - 0.05 <= waits[-1] <= done - refused[0] + 0.05, (waits, done - refused[0])


def test_time_left_counts_the_windows_still_to_wait(out, raw, caplog):
    # 500 users a 1 s window, pages of 100: once two resets are seen, the time left is the windows to
    # wait, not the users left at the average rate, which (bursts, then waits) is off by a window.
    caplog.set_level(logging.INFO, logger="random_user_etl")
    clock = time.time() - time.monotonic()
    with FakeRandomUser(rate_limit=(500, 1.0)) as fake:
        etl.run(limited_settings(fake, out, raw, n=2000, seed="paged", page_size=100, concurrency=1))
        last = fake.requests[-1].at
        second_reset = fake.next_reset(fake.next_reset(fake.requests[0].at))
    lines = [(r.created - clock, float(m[1])) for r in caplog.records if (m := re.search(r"about ([0-9.]+)s left", r.getMessage()))]
    late = [(at, left) for at, left in lines if at > second_reset + 0.2 and at < last - 0.05]
    assert late, lines
    for at, left in late:
        assert abs(left - (last - at)) < 0.4, f"said {left}s left at {at - second_reset:.2f}s past the second reset, was {last - at:.2f}s"


def test_a_page_that_fails_ends_the_run_at_once_while_another_waits_on_the_limit(api, settings, caplog):
    # One worker holds the rate-limit pause (10 s here); another page's refusal must not wait for it.
    # The 429 waits for the other worker's request, which would else wait behind the shut gate for the
    # probe; the 400 waits until the first worker is in the pause.
    caplog.set_level(logging.INFO, logger="random_user_etl")
    paused = lambda: any("pausing all requests" in r.getMessage() for r in caplog.records)  # noqa: E731
    api.script(held(lambda: len(api.requests) >= 2, rate_limited()), held(paused, status(400)))
    started = time.monotonic()
    with pytest.raises(etl.EtlError, match=r"^page [12]: HTTP 400"):
        etl.run(settings(seed="paged", n=40, page_size=10, concurrency=2, rate_limit_wait=10, max_wait=20))
    assert time.monotonic() - started < 5, "the failed page waited for the other worker's pause"


def test_the_rate_limit_is_waited_out_unread_with_no_retries_left(api, settings):
    # A bare 429 draws nothing on --retries, so with none (--retries 0) its body is not read either: a body
    # past --max-response-mb (or one that trickles) must not turn the pause into a failed page.
    noise = random.Random(429).randbytes(500_000)  # gzip cannot shrink it below the bound
    api.script(status(429, noise), status(429, noise), normal())
    batch = etl.run(settings(seed="pura", retries=0, max_response_mb=0.2))
    assert batch.rows == 100 and len(api.requests) == 3
