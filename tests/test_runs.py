"""Runs in one process at once: each run has its own stop, session and rate gate, so one run's failure or stop ends no other."""

from __future__ import annotations

import logging
import threading

import polars as pl
import pytest
from fake_api import held, mutate, normal
from support import assert_rows_are, duplicate_first_id, served_users, users, wait_until

import random_user_etl as etl


class InThread:
    """One call of fn on a thread of its own: its result, or what it raised (a KeyboardInterrupt too)."""

    def __init__(self, fn, *args, **kwargs):
        self.result = self.error = None
        self.thread = threading.Thread(target=self.call, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def call(self, fn, args, kwargs) -> None:
        """Keep what fn returned or raised."""
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # Stopped is a KeyboardInterrupt: kept, not lost with the thread
            self.error = exc

    def join(self) -> InThread:
        """Wait for the call to end (it is bounded by the runs' own deadlines)."""
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the run did not end"
        return self


def test_two_runs_at_once_each_land_their_own_rows(api, settings):
    one = InThread(etl.run, settings(seed="one", n=120, page_size=40, concurrency=2))
    two = InThread(etl.run, settings(seed="two", n=90, page_size=30, concurrency=2))
    for run, (seed, n, size) in ((one.join(), ("one", 120, 40)), (two.join(), ("two", 90, 30))):
        assert run.error is None, run.error
        assert_rows_are(pl.read_parquet(run.result.path), served_users(seed, n, size))


def test_a_run_that_fails_does_not_stop_another_under_way(api, settings):
    # The other run's first page is held at the service until this one has failed: a failure that
    # wound down every run in the process would cut that request, and the other run with it.
    failed = threading.Event()
    api.script(held(failed.is_set, normal()))
    other = InThread(etl.run, settings(seed="other", n=80, page_size=40, concurrency=1))
    wait_until(lambda: len(api.requests) == 1, what="the other run's first request")
    api.script(mutate(users(duplicate_first_id)))
    with pytest.raises(etl.EtlError, match=r"login\.uuid repeats"):
        etl.run(settings(seed="bad", n=40, page_size=40, concurrency=1))
    failed.set()
    other.join()
    assert other.error is None, f"the other run ended with {other.error!r}"
    assert_rows_are(pl.read_parquet(other.result.path), served_users("other", 80, 40))


def test_a_run_stopped_by_its_stop_ends_and_another_lands(api, settings, out):
    stop = etl.Stop()
    api.script(held(lambda: stop.asked, normal()))
    stopped = InThread(etl.run, settings(seed="stopped", n=80, page_size=40, concurrency=1), stop)
    wait_until(lambda: len(api.requests) == 1, what="the stopped run's first request")
    stop.stop()
    assert isinstance(stopped.join().error, etl.Stopped)
    landed = etl.run(settings(seed="landed", n=80, page_size=40, concurrency=1))
    assert_rows_are(pl.read_parquet(landed.path), served_users("landed", 80, 40))
    assert not (out / "random_users_stopped.parquet").exists()


def test_a_replay_whose_stop_was_asked_before_it_started_lands_nothing(api, settings, out, raw):
    etl.run(settings(seed="kept", n=80, page_size=40))
    (out / "random_users_kept.parquet").unlink()
    stop = etl.Stop()
    stop.stop()
    with pytest.raises(etl.Stopped):  # no network to cut: the replay itself must see its stop
        etl.replay(raw / "kept", settings(), stop)
    assert not (out / "random_users_kept.parquet").exists()


def test_a_run_whose_pages_are_all_staged_still_honours_a_stop_asked_before_it(api, settings, out):
    held_back = threading.Event()
    api.script(normal(), held(held_back.is_set, normal()))
    stop = etl.Stop()
    # The first run stages page 1, then is stopped on page 2; the rerun is asked to stop before it starts.
    first = InThread(etl.run, settings(seed="resumed", n=80, page_size=40, concurrency=1), stop)
    wait_until(lambda: len(api.requests) == 2, what="the second page's request")
    stop.stop()
    assert isinstance(first.join().error, etl.Stopped)
    held_back.set()
    again = etl.Stop()
    again.stop()
    with pytest.raises(etl.Stopped):
        etl.run(settings(seed="resumed", n=40, page_size=40, concurrency=1), again)  # page 1 alone: staged already
    assert not (out / "random_users_resumed.parquet").exists()


def waiting_for_the_lock(caplog, seed: str) -> bool:
    """True once a run has said it waits for another run of `seed`."""
    return any(f"another run of seed {seed} is under way" in record.getMessage() for record in caplog.records)


def test_two_runs_of_one_seed_take_turns_and_both_land_its_rows(api, settings, caplog):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    released = threading.Event()
    api.script(held(released.is_set, normal(), seconds=30))  # within the first run's own --timeout: it holds the lock
    first = InThread(etl.run, settings(seed="same", n=80, page_size=40, concurrency=1, timeout=30))
    wait_until(lambda: len(api.requests) == 1, what="the first run's first request")
    second = InThread(etl.run, settings(seed="same", n=80, page_size=40, concurrency=1))
    wait_until(lambda: waiting_for_the_lock(caplog, "same"), what="the second run waiting on the seed's lock")
    released.set()
    for run in (first.join(), second.join()):
        assert run.error is None, run.error
        assert_rows_are(pl.read_parquet(run.result.path), served_users("same", 80, 40))


def test_a_run_waiting_on_its_seeds_lock_ends_when_its_stop_is_asked(api, settings, caplog, out):
    caplog.set_level(logging.INFO, logger="random_user_etl")
    released = threading.Event()
    api.script(held(released.is_set, normal(), seconds=30))  # within the first run's own --timeout: it holds the lock
    first = InThread(etl.run, settings(seed="same", n=80, page_size=40, concurrency=1, timeout=30))
    wait_until(lambda: len(api.requests) == 1, what="the first run's first request")
    stop = etl.Stop()
    waiting = InThread(etl.run, settings(seed="same", n=80, page_size=40, concurrency=1), stop)
    wait_until(lambda: waiting_for_the_lock(caplog, "same"), what="the second run waiting on the seed's lock")
    stop.stop()
    try:
        wait_until(lambda: not waiting.thread.is_alive(), 10, "the stopped run to end while the other holds the lock")
    finally:
        released.set()
    assert isinstance(waiting.join().error, etl.Stopped)
    assert first.join().error is None
    assert_rows_are(pl.read_parquet(out / "random_users_same.parquet"), served_users("same", 80, 40))


def test_a_stop_kept_for_the_next_run_after_a_failed_one_lets_that_run_land(api, settings):
    # A caller may hold one Stop for its runs one after another: the failed run's wind-down was that
    # run's, and must not cut every try of the next.
    stop = etl.Stop()
    api.script(normal(), mutate(users(duplicate_first_id)))
    with pytest.raises(etl.EtlError, match=r"login\.uuid repeats"):
        etl.run(settings(seed="bad", n=120, page_size=40, concurrency=2), stop)
    batch = etl.run(settings(seed="next", n=80, page_size=40, concurrency=2), stop)
    assert_rows_are(pl.read_parquet(batch.path), served_users("next", 80, 40))


def test_a_page_source_used_for_a_second_run_asks_that_runs_service(api, settings):
    from fake_api import FakeRandomUser
    from _random_user_etl.run import Run
    from _random_user_etl.sources import ServicePages

    source = ServicePages()
    Run(settings(seed="first", n=40, page_size=40), source).land()
    with FakeRandomUser() as other:
        second = Run(settings(seed="second", n=40, page_size=40, api_url=other.url), source).land()
        assert len(other.requests) == 1 and len(api.requests) == 1, "the second run asked the first run's service"
    assert_rows_are(pl.read_parquet(second.path), served_users("second", 40, 40))
