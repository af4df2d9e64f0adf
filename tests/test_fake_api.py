"""The fake randomuser.me server behaves like the real one, and its faults do what they say."""

import collections
import gzip
import json
import re
import threading
import time

import pytest
import requests

from support import wait_until
from fake_api import (
    FIXTURES,
    PICKED_SEED,
    FakeRandomUser,
    body,
    hang,
    huge,
    mutate,
    normal,
    page_body,
    parse_params,
    rate_limited,
    recorded_pages,
    reset,
    status,
    synthetic_users,
    truncated,
)


def fixture_doc(name: str) -> dict:
    """A recorded response, parsed."""
    return json.loads((FIXTURES / name).read_bytes())


@pytest.fixture
def fake():
    """A running fake, stopped after the test."""
    with FakeRandomUser() as server:
        yield server


@pytest.fixture
def http():
    """A client that ignores proxy settings from the environment, so loopback stays local."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


def get(http, fake, **params):
    """GET the API with these query parameters."""
    return http.get(fake.url, params=params, timeout=5)


# --------------------------------------------------------------------------- service behaviour


def test_recorded_page_is_served_byte_for_byte(fake, http):
    raw = (FIXTURES / "default_seed-pura_results-100.json").read_bytes()
    response = http.get(fake.url, params={"results": 100, "seed": "pura"}, headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.content == raw
    assert fake.sent == [raw]
    assert response.json()["results"] == recorded_pages()[("pura", 1)]


def test_smaller_page_holds_the_first_users_of_the_recording(fake, http):
    doc = get(http, fake, results=20, seed="paged", page=3).json()
    assert doc["results"] == fixture_doc("paged_seed-paged_results-40_page-3.json")["results"][:20]
    assert doc["info"] == {"seed": "paged", "results": 20, "page": 3, "version": "1.4"}


def test_bigger_page_tops_recorded_users_up_with_synthetic_ones():
    users = json.loads(page_body("paged", 1, 50))["results"]
    assert users[:40] == recorded_pages()[("paged", 1)]
    assert users[40:] == synthetic_users("paged", 1, 50)[40:]


@pytest.mark.parametrize("asked, served", [("6000", 1), (None, 1), ("abc", 1), ("0", 0)])
def test_results_out_of_range_silently_become_one(fake, http, asked, served):
    params = {"seed": "cap"} | ({} if asked is None else {"results": asked})
    doc = get(http, fake, **params).json()
    assert len(doc["results"]) == served
    assert doc["info"]["results"] == served


def test_results_up_to_the_cap_are_kept():
    assert parse_params({"results": "5000"}).results == 5000
    assert parse_params({"results": "5001"}).results == 1


@pytest.mark.parametrize("page", ["0", "10001", "-3", "x"])
def test_pages_out_of_range_silently_become_page_one(fake, http, page):
    doc = get(http, fake, results=40, seed="paged", page=page).json()
    assert doc["info"]["page"] == 1
    assert doc["results"] == recorded_pages()[("paged", 1)]


def test_without_seed_the_service_picks_a_new_one_for_each_request(fake, http):
    picked = [get(http, fake, results=5).json() for _ in range(3)]
    seeds = [doc["info"]["seed"] for doc in picked]
    assert len(set(seeds)) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", seed) for seed in seeds), seeds
    for doc in picked:  # the users of the seed it picked, as that seed asked for gives them
        assert doc == get(http, fake, results=5, seed=doc["info"]["seed"]).json()
    # The recorded answer to a request with no seed is the page of the seed it picked then.
    assert get(http, fake, results=5, seed=PICKED_SEED).json() == fixture_doc("noseed_results-5.json")


@pytest.mark.parametrize("seed", ["pura", "fresh", "gbonly", "mixnat", "paged"])
@pytest.mark.parametrize("nat, nationalities", [("gb", {"GB"}), ("US", {"US"}), ("ca,no,fr", {"CA", "NO", "FR"}), ("de, ch", {"DE", "CH"})])
def test_nat_gives_users_of_those_nationalities_only(fake, http, seed, nat, nationalities):
    doc = get(http, fake, results=60, seed=seed, page=2 if seed == "paged" else 1, nat=nat).json()
    counts = collections.Counter(user["nat"] for user in doc["results"])
    assert len(doc["results"]) == 60 and set(counts) <= nationalities
    if seed == "fresh":  # no recorded users: each nationality drawn evenly, as the generator does
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len(nationalities), counts
    assert get(http, fake, results=60, seed=seed, page=2 if seed == "paged" else 1, nat=nat).json() == doc  # the same request, the same users
    ids = {user["login"]["uuid"] for user in doc["results"]}
    assert len(ids) == 60
    others = get(http, fake, results=60, seed=seed, page=2 if seed == "paged" else 1, nat="tr" if "TR" not in nationalities else "au").json()
    assert not ids & {user["login"]["uuid"] for user in others["results"]}, "other nationalities are other people"


def test_a_recorded_page_is_served_for_the_nationalities_it_was_recorded_with_or_none(fake, http):
    for seed, nat, name in [("gbonly", "gb", "nat-gb_seed-gbonly_results-25.json"), ("mixnat", "ca,no,fr", "nat-ca-no-fr_seed-mixnat_results-25.json")]:
        recorded = fixture_doc(name)["results"]
        assert get(http, fake, results=25, seed=seed, nat=nat).json()["results"] == recorded
        assert get(http, fake, results=25, seed=seed).json()["results"] == recorded
    pura = get(http, fake, results=100, seed="pura", nat="gb").json()["results"]
    assert {user["nat"] for user in pura} == {"GB"} and pura != fixture_doc("default_seed-pura_results-100.json")["results"]


def test_nat_of_no_known_code_serves_every_nationality(fake, http):
    assert get(http, fake, results=100, seed="pura", nat="xx").json() == fixture_doc("default_seed-pura_results-100.json")


def test_inc_keeps_and_exc_drops_top_level_fields(fake, http):
    included = get(http, fake, results=3, seed="pura", inc="gender,name,nat").json()["results"]
    assert all(list(user) == ["gender", "name", "nat"] for user in included)
    excluded = get(http, fake, results=3, seed="pura", exc="login, ID").json()["results"]
    assert all("login" not in user and "id" not in user and "email" in user for user in excluded)


def test_noinfo_drops_info(fake, http):
    assert list(get(http, fake, results=2, seed="s", noinfo="").json()) == ["results"]


def test_gzip_when_the_client_accepts_it(fake, http):
    zipped = http.get(fake.url, params={"results": 10, "seed": "z"}, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert zipped.headers["Content-Encoding"] == "gzip"
    wire = zipped.raw.read(decode_content=False)
    assert gzip.decompress(wire) == page_body("z", 1, 10) == fake.sent[0]

    plain = http.get(fake.url, params={"results": 10, "seed": "z"}, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert plain.content == page_body("z", 1, 10)


def test_unknown_path_is_404(fake, http):
    assert http.get(fake.url.replace("/api/1.4/", "/apii/"), timeout=5).status_code == 404


def test_requests_are_recorded(fake, http):
    get(http, fake, results=3, seed="rec", page=2, nat="gb")
    [received] = fake.requests
    assert received.path == "/api/1.4/"
    assert received.params == {"results": "3", "seed": "rec", "page": "2", "nat": "gb"}
    assert received.headers["user-agent"].startswith("python-requests")
    assert received.answer == "normal"


# --------------------------------------------------------------------------- synthetic users


def test_synthetic_users_are_deterministic_and_distinct():
    users = synthetic_users("syn", 4, 600)
    assert users == synthetic_users("syn", 4, 600)
    assert synthetic_users("syn", 4, 10) == users[:10]
    for key in (lambda u: u["login"]["uuid"], lambda u: u["login"]["username"], lambda u: u["email"]):
        assert len({key(u) for u in users}) == len(users)
    other_page = {u["login"]["uuid"] for u in synthetic_users("syn", 5, 600)}
    other_seed = {u["login"]["uuid"] for u in synthetic_users("nys", 4, 600)}
    assert not other_page & {u["login"]["uuid"] for u in users}
    assert not other_seed & {u["login"]["uuid"] for u in users}


def test_full_synthetic_page_is_fast_and_valid():
    started = time.perf_counter()
    raw = page_body("bench", 9, 5000)
    elapsed = time.perf_counter() - started
    doc = json.loads(raw)
    assert len({u["login"]["uuid"] for u in doc["results"]}) == 5000
    assert doc["info"] == {"seed": "bench", "results": 5000, "page": 9, "version": "1.4"}
    assert elapsed < 0.5  # about 30 ms here; generous for slow CI


# --------------------------------------------------------------------------- faults


def test_script_answers_requests_in_order_then_serves_normally(fake, http):
    fake.script(status(503), normal(), rate_limited())
    assert [get(http, fake, seed="o").status_code for _ in range(4)] == [503, 200, 429, 200]
    assert [r.answer for r in fake.requests] == ["status", "normal", "status", "normal"]
    assert fake.pending == 0


def test_error_statuses_carry_the_service_bodies(fake, http):
    fake.script(status(500), rate_limited(), rate_limited(retry_after=1), status(418, b"teapot", {"X-Why": "t"}))
    failing = get(http, fake)
    assert failing.status_code == 500 and failing.json() == fixture_doc("error_service.json")
    limited = get(http, fake)
    assert limited.status_code == 429 and limited.json() == fixture_doc("error_429_rate-limit.json")
    assert "Retry-After" not in limited.headers
    assert get(http, fake).headers["Retry-After"] == "1"
    odd = get(http, fake)
    assert (odd.status_code, odd.content, odd.headers["X-Why"]) == (418, b"teapot", "t")
    assert fake.sent == []


def test_body_serves_anything(fake, http):
    fake.script(body(b"<html>down</html>", content_type="text/html"), body('{"error":"x"}', status=200))
    page = get(http, fake)
    assert (page.status_code, page.text, page.headers["Content-Type"]) == (200, "<html>down</html>", "text/html")
    assert get(http, fake).json() == {"error": "x"}


def test_mutate_serves_the_doctored_response(fake, http):
    def wrong_page(doc):
        """Edit in place, returning None."""
        doc["info"]["page"] = 7

    fake.script(mutate(wrong_page), mutate(lambda doc: {"results": doc["results"][:1]}))
    assert get(http, fake, results=3, seed="m").json()["info"]["page"] == 7
    assert list(get(http, fake, results=3, seed="m").json()) == ["results"]


def test_mutate_bug_is_reported_not_hidden(fake, http):
    fake.script(mutate(lambda doc: 1 / 0))
    assert get(http, fake).status_code == 500
    assert [type(e) for e in fake.errors] == [ZeroDivisionError]


def test_reset_is_a_connection_error(fake, http):
    fake.script(reset())
    with pytest.raises(requests.ConnectionError):
        get(http, fake)
    assert get(http, fake).status_code == 200


def test_truncated_body_fails_on_read(fake, http):
    fake.script(truncated(), truncated())
    for encoding in ("identity", "gzip"):
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
            http.get(fake.url, params={"results": 50}, headers={"Accept-Encoding": encoding}, timeout=5)
    assert fake.sent == []


def test_hang_makes_a_read_timeout_and_does_not_delay_stop(http):
    fake = FakeRandomUser().start()
    fake.script(hang(30))
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(fake.url, timeout=0.2)
    started = time.perf_counter()
    fake.stop()
    assert time.perf_counter() - started < 1


def test_hang_then_answers(fake, http):
    fake.script(hang(0.15))
    started = time.perf_counter()
    assert get(http, fake, seed="h").status_code == 200
    assert time.perf_counter() - started >= 0.15


def test_huge_streams_until_the_client_hangs_up(fake, http, capfd):
    fake.script(huge(50_000_000), huge(300_000))
    with http.get(fake.url, stream=True, timeout=5) as response:
        assert response.status_code == 200 and "Content-Length" not in response.headers
        read = 0
        for chunk in response.iter_content(64 * 1024):
            read += len(chunk)
            if read >= 1_000_000:
                break
    assert read >= 1_000_000

    whole = http.get(fake.url, timeout=5)
    assert len(whole.content) == 300_000 and whole.content.startswith(b'{"results":[{')
    with pytest.raises(ValueError):
        json.loads(whole.content)

    wait_until_idle(fake)
    assert "Traceback" not in capfd.readouterr().err
    assert fake.errors == []


def test_disconnects_print_nothing(fake, http, capfd):
    fake.script(reset(), truncated())
    for _ in range(2):
        with pytest.raises(requests.RequestException):
            get(http, fake)
    wait_until_idle(fake)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def wait_until_idle(fake, timeout=10.0):
    """Wait until the fake has no open connection, so its handlers are done."""
    wait_until(lambda: not fake._server.connections, timeout, "the fake's connections closed")


# --------------------------------------------------------------------------- lifecycle


def test_latency_delays_every_answer_but_requests_run_in_parallel(http):
    with FakeRandomUser(latency=0.2) as fake:
        started = time.perf_counter()
        threads = [threading.Thread(target=requests.get, args=(fake.url,)) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        assert 0.2 <= elapsed < 0.8
        assert len(fake.sent) == 5


def answers(http, url: str) -> bool:
    """True if the fake at url answers 200; False while it refuses connections."""
    try:
        return http.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_start_later_refuses_connections_first(http):
    with FakeRandomUser().start_later(0.2) as fake:
        with pytest.raises(requests.ConnectionError):
            http.get(fake.url, timeout=1)
        wait_until(lambda: answers(http, fake.url), 3, "the fake answering once started", step=0.05)


def test_stop_then_start_again_on_the_same_url(http):
    fake = FakeRandomUser().start()
    url = fake.url
    assert http.get(url, timeout=1).status_code == 200  # leaves a keep-alive connection open
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        http.get(url, timeout=1)
    with fake.start():
        assert fake.url == url
        assert http.get(url, timeout=1).status_code == 200


# --------------------------------------------------------------------------- the generator's seed rules


def test_page_k_of_a_seed_holds_page_one_of_the_seed_followed_by_k(fake, http):
    paged = get(http, fake, results=10, seed="demo", page=2).json()
    assert paged["results"] == get(http, fake, results=10, seed="demo2", page=1).json()["results"]
    assert paged["info"] == {"seed": "demo", "results": 10, "page": 2, "version": "1.4"}
    assert get(http, fake, results=10, seed="demo", page=12).json()["results"] == get(http, fake, results=10, seed="demo12").json()["results"]
    # The recorded page 2 of seed "paged" is also page 1 of seed "paged2".
    recorded = fixture_doc("paged_seed-paged_results-40_page-2.json")["results"]
    assert get(http, fake, results=40, seed="paged2").json()["results"] == recorded


def test_a_seed_of_18_characters_picks_the_nationality_by_its_last_two_hex_digits(fake, http):
    seed = "abcdefghijklmnop09"  # index 9 of the generator's list: GB
    doc = get(http, fake, results=30, seed=seed, nat="us").json()  # nat= is ignored
    assert {user["nat"] for user in doc["results"]} == {"GB"}
    answered = doc["info"]["seed"]
    assert len(answered) == 20 and answered.startswith(seed)
    # The seed answered does not reproduce the users.
    again = get(http, fake, results=30, seed=answered).json()["results"]
    assert [u["login"]["uuid"] for u in again] != [u["login"]["uuid"] for u in doc["results"]]
    assert {user["nat"] for user in get(http, fake, results=30, seed="abcdefghijklmnop0d").json()["results"]} == {"MX"}


@pytest.mark.parametrize("seed", ["abcdefghijklmnopzz", "abcdefghijklmnop15", "abcdefghijklmnopff"])
def test_a_seed_of_18_characters_with_no_valid_index_gets_no_answer(fake, http, seed):
    with pytest.raises(requests.ConnectionError):
        get(http, fake, results=5, seed=seed)
    assert fake.sent == [] and fake.errors == []


# --------------------------------------------------------------------------- the rate limit


def test_the_rate_limit_counts_users_per_window_and_refuses_for_free(http):
    with FakeRandomUser(rate_limit=(100, 0.6)) as fake:
        start = fake.window_start(time.monotonic())
        if time.monotonic() - start > 0.2:  # keep the first four requests well inside one window
            time.sleep(fake.next_reset(time.monotonic()) - time.monotonic())
        codes = [get(http, fake, seed="w", results=n).status_code for n in (40, 40, 40, 20, 1)]
        # 40 + 40 fit; 40 more would pass 100 and is refused, and a refusal is not counted: 20 still fit.
        assert codes == [200, 200, 429, 200, 429]
        refused = get(http, fake, seed="w", results=1)
        assert refused.json() == fixture_doc("error_429_rate-limit.json") and "Retry-After" not in refused.headers
        assert [r.answer for r in fake.requests] == ["normal", "normal", "limited", "normal", "limited", "limited"]
        time.sleep(max(fake.next_reset(time.monotonic()) - time.monotonic(), 0) + 0.02)
        assert get(http, fake, seed="w", results=100).status_code == 200  # every count reset together on the fake's clock
        assert get(http, fake, seed="w", results=1).status_code == 429


def test_the_rate_limit_windows_are_fixed_on_the_fake_clock():
    with FakeRandomUser(rate_limit=(10, 0.5)) as fake:
        now = time.monotonic()
        start, reset = fake.window_start(now), fake.next_reset(now)
        assert start <= now < reset and reset - start == pytest.approx(0.5)
        assert fake.next_reset(reset + 1e-6) == pytest.approx(reset + 0.5)  # fixed, not sliding


def test_the_fake_started_by_hand_serves_the_job_and_stops_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys

    import polars as pl
    from support import FAST, PURA, TESTS, assert_rows_are, raw_users

    import random_user_etl as etl
    from random_user_config import Settings

    command = [sys.executable, str(TESTS / "fake_api.py"), "--port", "0", "--latency", "0.01"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = server.stdout.readline()
        url = line.split()[3]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/1.4/"), line
        batch = etl.run(Settings(**FAST, api_url=url, seed="pura", output_dir=str(tmp_path / "out"), raw_dir=None))
        assert_rows_are(pl.read_parquet(batch.path), raw_users(PURA))
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=10) == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        server.kill()
        server.wait()


def test_the_fake_started_by_hand_on_a_busy_port_says_so_in_one_line():
    import socket
    import subprocess
    import sys

    from support import TESTS

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(TESTS / "fake_api.py"), "--port", str(port)], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"fake_api.py: error: cannot listen on 127.0.0.1:{port}: address already in use"], result.stderr


def accepts(port: int) -> bool:
    """True if something accepts a connection on the loopback port."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_the_fake_started_by_hand_stops_on_a_signal_even_when_its_shell_ignores_sigint(signame):
    # A background job of a non-interactive shell starts with SIGINT ignored, and a child keeps that.
    import signal
    import subprocess
    import sys

    from support import TESTS
    from fake_api import free_port

    port = free_port()
    command = [sys.executable, str(TESTS / "fake_api.py"), "--port", str(port)]
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, preexec_fn=ignore_sigint)
    try:
        wait_until(lambda: accepts(port), 20, "the fake listening", step=0.02)
        server.send_signal(getattr(signal, signame))
        try:
            code = server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still serving 10s after {signame}")
        assert code == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        server.kill()
        server.wait()
