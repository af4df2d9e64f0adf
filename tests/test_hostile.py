"""Hostile input: seeds that try to leave the output folder, a huge answer, plain http,
and no PII in the logs.

The CLI cases run main(argv) in-process (the `cli` fixture), each in its own folder: the exit status
and the one error line are checked as the command gives them; bad settings start no server.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import polars as pl
from support import (
    LOG_LINE,
    PAGED,
    PREFIX,
    PURA,
    assert_one_error_line,
    assert_rows_are,
    batch_files,
    duplicate_first_id,
    fast_env,
    info,
    landed,
    leaked,
    pii_of,
    raw_users,
    run_cli,
    users,
)
from fake_api import FakeRandomUser, chunk_framing, chunked, huge, mutate, page_body, rate_limited, status, unframed
from fake_api import raw as raw_bytes

import random_user_etl as etl
from _random_user_etl import store, wire
from random_user_config import Settings, SettingsError, load_settings

# Seeds that try to leave the output folder, or to be a file name no file system wants.
SEEDS = {
    "dotdot": "../../x",
    "absolute": "/etc/x",
    "climb-from-inside": "a/../../b",
    "10k-chars": "x" * 10_000,
    "date-template-climb": "../{date}",
}
NUL_SEED = "a\x00b"  # neither argv nor the environment can carry NUL: see the API and server cases
SERVER_SEEDS = {**{k: v for k, v in SEEDS.items() if k != "date-template-climb"}, "nul-byte": NUL_SEED, "empty": ""}
ETC_X_EXISTED = Path("/etc/x").exists()

REMOTE_HTTP = "http://example.com/api/1.4/"


def files_under(folder: Path) -> list[str]:
    """Every file under a folder, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def proxied_to(url: str) -> dict:
    """Proxy variables that send any plain-http request to a loopback address, never to the internet."""
    proxy = url.split("/api/")[0]
    return dict(HTTP_PROXY=proxy, http_proxy=proxy, HTTPS_PROXY=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")


def wrong_type_name(doc):
    """User 1's name as one string instead of an object: the answer no longer fits the raw schema."""
    user = doc["results"][0]
    user["name"] = f"{user['name']['first']} {user['name']['last']}"
    return doc


# ------------------------------------------------------------------ the CLI cases


def run_case(case: str, folder: Path, cli, nowhere: str) -> SimpleNamespace:
    """Run one CLI case in its own folder tree; say what it left behind.

    Settings cases start no server: they point at `nowhere` (a loopback port that refuses), so a
    run that went on to make a request would fail with exit 1, not be refused with exit 2.
    """
    kind, source, name = (case.split(":") + [""])[:3]
    base = folder / "d1" / "d2"  # deep, so a climbing seed would still land inside `folder`
    out, raw, cwd = base / "out", base / "raw", base / "cwd"
    cwd.mkdir(parents=True)
    args: list[str] = ["--n", "5"]
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(FakeRandomUser()) if kind in ("pii", "seed") and source in ("server", "run") else None
        env = fast_env(api.url if api else nowhere, out, raw)
        if kind == "seed":
            seed = SERVER_SEEDS[name] if source == "server" else SEEDS[name]
            if source == "flag":
                args += ["--seed", seed]
            elif source == "variable":
                env["RANDOM_USER_SEED"] = seed
            else:
                api.script(mutate(info(seed=seed)))
        elif kind == "http":
            env.update(proxied_to(nowhere))
            url = REMOTE_HTTP if name != "file" else "file:///etc/passwd"
            if source == "flag":
                args += ["--api-url", url]
            else:
                env["RANDOM_USER_API_URL"] = url
        elif kind == "pii":
            args = ["-v", "--seed", "paged", "--n", "120", "--page-size", "40", "--concurrency", "2"]
            script = {
                "success": [status(503), rate_limited()],
                "contract": [status(503), mutate(users(duplicate_first_id))],
                "wrong-type": [mutate(wrong_type_name)],
            }[name]
            api.script(*script)
        result = cli(*args, env=env, cwd=cwd)
        return SimpleNamespace(
            result=result,
            files=files_under(folder),
            out=out,
            raw=raw,
            requests=len(api.requests) if api else None,
            errors=api.errors if api else [],
        )


# ------------------------------------------------------------------ seeds


@pytest.mark.parametrize("case", [f"seed:{source}:{name}" for source in ("flag", "variable") for name in SEEDS])
def test_a_hostile_seed_setting_is_refused_before_anything_is_written(case, tmp_path, cli, nowhere):
    outcome = run_case(case, tmp_path / "case", cli, nowhere)
    assert outcome.result.returncode == 2, outcome.result.stderr
    assert_one_error_line(outcome.result.stderr, r"--seed \(RANDOM_USER_SEED\) must be 1 to 100 letters")
    assert len(outcome.result.stderr.splitlines()) == 1  # exit 2, not 1: no request was tried (see run_case)
    assert outcome.files == []  # nothing anywhere in the test's tree: not in out, raw, cwd, nor above them
    assert ETC_X_EXISTED or not Path("/etc/x").exists()


@pytest.mark.parametrize("case", [f"seed:server:{name}" for name in SERVER_SEEDS])
def test_a_hostile_seed_from_the_server_fails_the_run_before_anything_is_written(case, tmp_path, cli, nowhere):
    outcome = run_case(case, tmp_path / "case", cli, nowhere)
    stderr = outcome.result.stderr
    assert outcome.result.returncode == 1, stderr
    assert_one_error_line(stderr, r"page 1: the service('s seed .* is not safe as a file name| picked no seed)")
    assert "\x00" not in stderr and len(stderr) < 2000
    assert outcome.requests == 1
    assert outcome.files == []
    assert ETC_X_EXISTED or not Path("/etc/x").exists()


@pytest.mark.parametrize("seed", [*SEEDS.values(), NUL_SEED], ids=[*SEEDS, "nul-byte"])
def test_a_hostile_seed_is_refused_by_the_python_api_too(api, tmp_path, settings, seed):
    with pytest.raises(SettingsError, match="seed"):
        Settings(seed=seed)
    with pytest.raises(SettingsError, match="seed"):
        load_settings({"seed": seed}, environ={})
    with pytest.raises(SettingsError, match="RANDOM_USER_SEED"):
        load_settings({}, environ={"RANDOM_USER_SEED": seed})
    with pytest.raises(SettingsError):
        etl.run(settings(), seed=seed)
    with pytest.raises(etl.EtlError, match="not safe as a file name"):
        store.batch_path(str(tmp_path / "out"), seed)  # the last guard before any path is built
    assert api.requests == []
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------ huge answers


def test_a_huge_answer_fails_clearly_and_memory_stays_bounded(api, out, raw):
    api.script(huge(200_000_000))
    started = time.monotonic()
    proc = run_cli("--seed", "pura", "--max-response-mb", "1", env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert_one_error_line(stderr, r"page 1: answer larger than the 1,000,000-byte limit \(--max-response-mb\)")
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    assert elapsed < 15
    assert batch_files(out) == [] and landed(raw) == {}
    assert set(landed(out)) <= {".staging/pura.lock"}  # only the seed's (empty) lock file


FRAMINGS = {
    "closed-connection": unframed(),
    "chunked": chunked(),
    "chunked-and-length-0": chunked({"Content-Length": "0"}),  # chunking overrides a Content-Length
    "chunked-and-length-not-a-number": chunked({"Content-Length": "\u00b2"}),
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_an_answer_with_no_length_to_trust_is_read_as_it_comes(api, settings, framing):
    # No length to read by: what is held must follow the bytes that came (a full page, 1.6 MB of gzip),
    # not the bound (here 1 GB, the largest allowed), and the read must not go by a length that chunking overrides.
    api.script(FRAMINGS[framing])
    tracemalloc.start()  # Python's own allocations, where a read's buffers are made
    try:
        batch = etl.run(settings(seed="framing", n=5000, max_response_mb=1000, retries=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert api.requests[0].answer == "reframed"
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB allocated at the peak"
    assert_rows_are(pl.read_parquet(batch.path), json.loads(page_body("framing", 1, 5000))["results"])


def test_an_answer_whose_content_length_is_past_the_bound_is_refused_unread(api, out, settings):
    api.script(huge(2_000_000_000, declared=True))
    with pytest.raises(etl.EtlError, match=r"page 1: answer larger than the 64,000,000-byte limit"):
        etl.run(settings(seed="pura", max_response_mb=64, retries=0))
    # Refused from its Content-Length: what got through is what the sockets' buffers held, not 64 MB.
    assert api.huge_bytes_sent < 32_000_000, api.huge_bytes_sent
    assert batch_files(out) == []


def test_a_huge_error_answer_that_is_retried_is_not_read_into_memory(api, out, raw):
    # urllib3 reads a retried answer's body to reuse the connection; this one never ends in time.
    api.script(huge(300_000_000, status=503))  # then normal answers
    proc = run_cli("--seed", "pura", "--retries", "1", env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    assert proc.returncode == 0, stderr
    assert "retry 1 of 1" in stderr and "HTTP 503" in stderr
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB: the 503 body was read"
    assert batch_files(out) == ["random_users_pura.parquet"]


def test_the_size_bound_counts_the_answer_as_unpacked_not_as_sent(api, out, settings):
    # The fake gzips what it sends: 30 MB of JSON padding is a few kB on the wire (a "gzip bomb").
    api.script(status(200, b'{"results":[' + b" " * 30_000_000 + b"]}"))
    with pytest.raises(etl.EtlError, match=r"page 1: answer larger than the 1,000,000-byte limit"):
        etl.run(settings(seed="pura", max_response_mb=1, retries=0))
    assert batch_files(out) == []


# ------------------------------------------------------------------ plain http and TLS


@pytest.mark.parametrize("case", ["http:flag:remote", "http:variable:remote", "http:flag:file"])
def test_plain_http_to_a_remote_host_is_refused(case, tmp_path, cli, nowhere):
    outcome = run_case(case, tmp_path / "case", cli, nowhere)
    assert outcome.result.returncode == 2, outcome.result.stderr
    says = r"plain http:// to example\.com.*--allow-http" if case.endswith("remote") else r"must be an https:// address"
    assert_one_error_line(outcome.result.stderr, says)
    # Exit 2, not 1: no request was tried, not even through the (loopback, refusing) proxy the case sets.
    assert outcome.files == []


def test_allow_http_is_accepted_as_a_setting_only():
    # Checked as settings only: no test ever connects anywhere but loopback.
    with pytest.raises(SettingsError, match="allow-http"):
        load_settings({"api_url": REMOTE_HTTP}, environ={})
    assert load_settings({"api_url": REMOTE_HTTP, "allow_http": "true"}, environ={}).allow_http is True
    by_env = load_settings({}, environ={"RANDOM_USER_API_URL": REMOTE_HTTP, "RANDOM_USER_ALLOW_HTTP": "yes"})
    assert by_env.api_url == REMOTE_HTTP and by_env.allow_http
    flags = vars(etl.build_parser().parse_args(["--api-url", REMOTE_HTTP, "--allow-http"]))
    flags = {k: v for k, v in flags.items() if k not in ("verbose", "replay")}
    assert load_settings(flags, environ={}).allow_http is True
    assert Settings(api_url="http://localhost:8080/api/").allow_http is False  # loopback needs no permission


def test_tls_verification_is_never_switched_off(out, monkeypatch):
    # Empty CA-bundle variables are how a shell switches verification off in curl; requests must still verify.
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    for allow_http in (False, True):
        session = wire.make_session(Settings(output_dir=str(out), allow_http=allow_http))
        assert session.verify is True
        assert session.merge_environment_settings("https://randomuser.me/api/", {}, None, None, None)["verify"] is True
        assert session.get_adapter("https://randomuser.me/").max_retries.total == 0  # fetch_page's loop retries


# ------------------------------------------------------------------ PII in logs


@pytest.mark.parametrize("case", ["pii:run:success", "pii:run:contract", "pii:run:wrong-type"])
def test_no_personal_data_in_the_logs(case, tmp_path, cli, nowhere):
    outcome = run_case(case, tmp_path / "case", cli, nowhere)
    stderr = outcome.result.stderr
    if case.endswith("success"):
        assert outcome.result.returncode == 0, stderr
        assert "retry 1 of 3" in stderr and "landed 120 rows" in stderr  # the log did say things
    else:
        assert outcome.result.returncode == 1, stderr
        assert stderr.rstrip().splitlines()[-1].startswith(PREFIX)
    assert leaked(stderr, pii_of(raw_users(*PAGED))) == [], stderr.rstrip().splitlines()[-1]


def test_a_redirect_is_not_followed(api, out, settings):
    # Following it could take a request to plain http on another host, past the --allow-http guard.
    api.script(status(302, b"", headers={"Location": "http://example.com/api/1.4/?results=100"}))
    with pytest.raises(etl.EtlError, match="page 1: HTTP 302 redirect to example.com, not followed"):
        etl.run(settings(seed="pura"))
    assert len(api.requests) == 1 and batch_files(out) == []


# ------------------------------------------------------------------ framing that would outgrow the bound


BROKEN_FRAMINGS = {
    "size-minus-1": b"-1\r\n",  # read as "to the end of the stream"
    "size-minus-10": b"-10\r\n",
    "size-with-a-sign": b"+40\r\n",
    "size-not-hex": b"4g\r\n",
    "size-line-that-never-ends": b"4",  # the filler follows on the same line, with no end
}


@pytest.mark.parametrize("framing", BROKEN_FRAMINGS)
def test_a_broken_chunk_size_is_a_transport_fault_and_reads_no_further(framing, api, out, raw, cli):
    lead = BROKEN_FRAMINGS[framing]
    filler = b"0" * 65536 if framing.endswith("never-ends") else b'{"results":[' * 5000
    api.script(*[chunk_framing(lead, filler, 100_000_000)] * 2)
    result = cli("--seed", "pura", "--retries", "1", "--max-response-mb", "0.1", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: bad answer from \S+: \w+ \(broken chunked framing\), gave up after 1 retry$")
    assert re.search(r"retry 1 of 1 for \S+: \w+ \(broken chunked framing\)\n", result.stderr), result.stderr
    # Two tries of 100 MB each were offered: what got through is the bound and the sockets' buffers, not the stream.
    assert api.huge_bytes_sent < 32_000_000, api.huge_bytes_sent
    assert batch_files(out) == []


def test_a_chunk_size_past_the_bound_is_cut_at_the_bound(api, out, settings):
    # A size of 2**60: the read must stop at the bound, not wait for (or hold) the chunk it announces.
    api.script(chunk_framing(b"1000000000000000\r\n", b'{"results":[' * 5000, 100_000_000))
    with pytest.raises(etl.EtlError, match=r"page 1: answer larger than the 100,000-byte limit"):
        etl.run(settings(seed="pura", max_response_mb=0.1, retries=0))
    assert api.huge_bytes_sent < 32_000_000, api.huge_bytes_sent


def test_the_bytes_of_the_framing_count_against_the_bound_too(api, out, settings):
    # One byte of body per chunk, each chunk's size line carrying 60 kB of extension: the body stays
    # tiny while the stream is endless. What is read counts, not what the framing says is body.
    chunk = b"1;" + b"x" * 60_000 + b"\r\n{\r\n"
    api.script(chunk_framing(chunk, chunk, 100_000_000))
    with pytest.raises(etl.EtlError, match=r"page 1: answer larger than the 100,000-byte limit"):
        etl.run(settings(seed="pura", max_response_mb=0.1, retries=0))
    assert api.huge_bytes_sent < 32_000_000, api.huge_bytes_sent


def test_a_well_framed_chunked_answer_within_the_bound_lands(api, out, settings):
    # Many small chunks with an extension and a trailer: legal framing, read as it comes.
    page = page_body("pura", 1, 100)
    pieces = b"".join(b"%x;note=1\r\n%b\r\n" % (len(page[i : i + 1000]), page[i : i + 1000]) for i in range(0, len(page), 1000))
    api.script(chunk_framing(pieces + b"0\r\nX-Trailer: 1\r\n\r\n", b"", len(pieces) + 20))
    batch = etl.run(settings(seed="pura", retries=0))
    assert_rows_are(pl.read_parquet(batch.path), raw_users(PURA))


def test_a_chunk_whose_data_runs_past_its_size_is_broken_framing(api, out, raw, cli):
    # A chunk's data must end with CRLF where its size line says: http.client tossed whatever two bytes
    # came there, so a chunk two bytes longer than its size (and no CRLF) lost them from the body and landed.
    page = page_body("pura", 1, 100)
    pieces = b"".join(b"%x\r\n%bZZ" % (len(page[i : i + 1000]), page[i : i + 1000]) for i in range(0, len(page), 1000))
    api.script(chunk_framing(pieces + b"0\r\n\r\n", b"", len(pieces) + 5))
    result = cli("--seed", "pura", "--retries", "0", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: bad answer from \S+: \w+ \(broken chunked framing\)$")
    assert batch_files(out) == []


def test_content_lengths_that_disagree_are_a_bad_answer_not_a_host_out_of_reach(api, out, raw, cli):
    page = page_body("pura", 1, 100)
    api.script(raw_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: %d, %d\r\n\r\n%b" % (len(page), len(page) + 1, page)))
    result = cli("--seed", "pura", "--retries", "0", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: bad answer from \S+: InvalidHeader \(not an HTTP answer\)$")
    assert batch_files(out) == []


# ------------------------------------------------------------------ credentials in the API address


SECRET, TOKEN = "s3cretpass", "t0psecret"


def with_credentials(url: str) -> str:
    """The API address with a user and password in it, and a token in its query."""
    return url.replace("http://", f"http://someone:{SECRET}@", 1) + f"?token={TOKEN}"


def no_secret(stderr: str) -> None:
    """Neither the password nor the token is in what the run printed."""
    assert SECRET not in stderr and TOKEN not in stderr, stderr


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_credentials_in_the_api_address_reach_no_retry_line(verbose, api, out, raw, cli):
    api.script(status(503))
    result = cli("--seed", "pura", *verbose, env=fast_env(with_credentials(api.url), out, raw))
    assert result.returncode == 0, result.stderr
    assert "retry 1 of 3" in result.stderr and "token=" in result.stderr  # the line names the parameter, not its value
    assert api.requests[0].params["token"] == TOKEN  # the address is used as given
    no_secret(result.stderr)


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_credentials_in_the_api_address_reach_no_final_line(verbose, out, raw, cli, nowhere):
    result = cli("--seed", "pura", *verbose, env=fast_env(with_credentials(nowhere), out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: cannot reach http://\S*127\.0\.0\.1:\d+/api/1\.4/")
    no_secret(result.stderr)


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://someone:{SECRET}@example.com/api/?token={TOKEN}",
        f"https://someone:{SECRET}@/api/?token={TOKEN}",  # no host
        f" https://someone:{SECRET}@example.com/api/?token={TOKEN}",
        f"https://someone:{SECRET}@example.com/api/?token={TOKEN}\x1b[31m",
        f"http://someone:{SECRET}@example.com/api/?token={TOKEN}",  # plain http to a remote host
    ],
)
@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_credentials_in_a_refused_api_address_reach_no_line(url, verbose, out, raw, cli, nowhere):
    result = cli(*verbose, "--api-url", url, env=fast_env(nowhere, out, raw))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "--api-url" in result.stderr, result.stderr
    no_secret(result.stderr)


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_a_secret_of_the_api_address_the_service_echoes_reaches_no_line(verbose, api, out, raw, cli):
    # Services echo what they were asked in their error message: "invalid key t0psecret", "no route /api;jsessionid=...".
    echo = json.dumps({"error": f"invalid key {TOKEN} for someone:{SECRET}, session {SECRET}x, no route /api/1.4/"})
    api.script(status(503, echo), status(401, echo))
    result = cli("--seed", "pura", *verbose, env=fast_env(with_credentials(api.url), out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(
        result.stderr, r"page 1: HTTP 401: the service says 'invalid key \*\*\* for someone:\*\*\*, session \*\*\*x, no route /api/1.4/', after 1 retry"
    )
    no_secret(result.stderr)


# ------------------------------------------------------------------ what the service says reaches the terminal escaped


CONTROL_BYTES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def only_job_lines(stderr: str) -> None:
    """Every line a log line of the job's or its one last line, and no control character anywhere."""
    assert not CONTROL_BYTES.search(stderr), repr(stderr)
    lines = stderr.rstrip("\n").split("\n")
    assert all(LOG_LINE.match(line) for line in lines[:-1]) and lines[-1].startswith(PREFIX), stderr
    assert not [line for line in lines if line.startswith("2026-01-01")], stderr  # the forged line is not a line of its own


@pytest.mark.parametrize("results", ["5\n2026-01-01 00:00:00,000 INFO landed 5 rows", "\x1b[31m5\x07", "5\u2028x\u202e", "\r5\x00"])
def test_a_value_from_the_service_reaches_the_terminal_escaped(results, api, out, raw, cli):
    api.script(mutate(info(results=results)))
    result = cli("--seed", "pura", "-v", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: the answer says info\.results=.* but holds 100 users")
    only_job_lines(result.stderr)


# Latin-1 only: a header is sent as Latin-1, so a bidi control cannot be in one; C1's CSI (\x9b) can.
@pytest.mark.parametrize("location", ["http://ex\x1b[31mample.com/api/", "http://[::1", "http://ex\x1bample.com/", "http://exa\x9bmple.com/", "\x07"])
def test_an_odd_redirect_location_is_one_escaped_line(location, api, out, raw, cli):
    api.script(status(302, b"", headers={"Location": location}))
    result = cli("--seed", "pura", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, r"page 1: HTTP 302 redirect to \S+, not followed")
    only_job_lines(result.stderr)


def credentials_in(nowhere: str, form: str) -> str:
    """The refusing loopback address with a secret put into it in one of the odd forms an operator may type."""
    host = nowhere.split("/")[2]
    return {
        "fragment": f"{nowhere}#{SECRET}",
        "path-parameter": nowhere.replace("/api/1.4/", f"/api/1.4;jsessionid={SECRET}/"),
        "bare-path-parameter": nowhere.replace("/api/1.4/", f"/api/1.4;{SECRET}/"),
        "user-only": nowhere.replace(host, f"{SECRET}@{host}"),
        "percent-encoded-at": nowhere.replace(host, f"some%40one:{SECRET}@{host}"),
        "uppercase-scheme": nowhere.replace("http://", f"HTTP://someone:{SECRET}@"),
        "ipv6-host": nowhere.replace(host, f"someone:{SECRET}@[::1]:{host.split(':')[1]}"),
        "at-and-colon-in-password": nowhere.replace(host, f"someone:{SECRET[:4]}@:{SECRET[4:]}@{host}"),
        "question-mark-in-password": nowhere.replace(host, f"someone:{SECRET[:4]}?{SECRET[4:]}@{host}"),
        "hash-in-password": nowhere.replace(host, f"someone:{SECRET[:4]}#{SECRET[4:]}@{host}"),
        "token-with-an-at": f"{nowhere}?token={TOKEN[:4]}@{TOKEN[4:]}",
    }[form]


CREDENTIAL_FORMS = [
    "fragment",
    "path-parameter",
    "bare-path-parameter",
    "user-only",
    "percent-encoded-at",
    "uppercase-scheme",
    "ipv6-host",
    "at-and-colon-in-password",
    "question-mark-in-password",
    "hash-in-password",
    "token-with-an-at",
]


def no_part_of_a_secret(stderr: str) -> None:
    """No piece of the password or token, not even half of one, is in what the run printed."""
    pieces = [SECRET[:4], SECRET[4:], TOKEN[:4], TOKEN[4:]]
    assert not [piece for piece in pieces if piece in stderr], stderr


@pytest.mark.parametrize("form", CREDENTIAL_FORMS)
@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_a_secret_in_any_part_of_the_api_address_reaches_no_line(form, verbose, out, raw, cli, nowhere):
    result = cli("--seed", "pura", "--retries", "1", *verbose, env=fast_env(credentials_in(nowhere, form), out, raw))
    assert result.returncode in (1, 2), result.stderr
    assert_one_error_line(result.stderr, r"--api-url|cannot reach")
    no_part_of_a_secret(result.stderr)


@pytest.mark.parametrize("host", ["\u2764.example", "a" * 64 + ".example", "a..b.example", ".example"])
def test_an_api_address_no_request_can_be_sent_to_is_a_bad_setting(host, out, raw, cli, nowhere):
    # requests cannot prepare it (IDNA 2008), or the socket layer cannot encode its name: refused
    # before any request, never a run that fails later as a storage error or a retried transport fault.
    url = f"https://someone:{SECRET}@{host}/api/1.4/?token={TOKEN}"
    result = cli("--seed", "pura", env={**fast_env(url, out, raw), **proxied_to(nowhere)})
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, r"--api-url \(RANDOM_USER_API_URL\) .*host name")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    no_part_of_a_secret(result.stderr)
    assert files_under(out.parent) == []
