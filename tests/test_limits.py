"""Memory and settings: every number has a range, every path is clean text, memory is bounded.

Ranges and texts are checked in-process through load_settings and Settings (Python callers get the
same refusals), and once per kind of refusal through the CLI. Peak memory is measured on the job in
its own process, fed by the fake over loopback.
"""

from __future__ import annotations

import json
import math
import tracemalloc

import polars as pl
import pytest
from support import PREFIX, PURA, assert_one_error_line, assert_rows_are, batch_files, fast_env, fixture_json, run_cli
from fake_api import body, mutate, page_body, status
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import random_user_etl as etl
from _random_user_etl import client
from random_user_config import SETTINGS, Settings, SettingsError, load_settings

LARGEST_N = 5000 * 10_000  # 10,000 pages of the default 5,000 users

# name: (lowest accepted, highest accepted, just below, just above); timeout and the size bound take any value above 0.
ABOVE_ZERO = ("timeout", "max_response_mb")
RANGES = {
    "n": (1, LARGEST_N, 0, LARGEST_N + 1),
    "page_size": (1, 5000, 0, 5001),
    "concurrency": (1, 64, 0, 65),
    "retries": (0, 100, -1, 101),
    "timeout": (0.01, 3600, 0.0099, 3600.001),
    "max_wait": (0.01, 86400, 0.0099, 86400.001),
    "backoff": (0, 100, -0.001, 100.001),
    "rate_limit_wait": (0.01, 3600, 0.0099, 3600.001),
    "max_response_mb": (0.01, 1000, 0.0099, 1000.001),
}
# The values that crashed the job before they had a range, and a rate-limit pause of 3e300 years.
CRASHED = {"timeout": "1e10", "backoff": "1e308", "max_response_mb": "1e20", "retries": "1000", "rate_limit_wait": "1e308"}

FLAG = {s.name: s.flag for s in SETTINGS}
ENV = {s.name: s.env for s in SETTINGS}


def load(name: str, text: str) -> Settings:
    """Settings from one flag's text, with no environment."""
    return load_settings({name: text}, environ={})


# ------------------------------------------------------------------ numeric ranges


@pytest.mark.parametrize("end", ["lowest", "highest"])
@pytest.mark.parametrize("name", RANGES)
def test_each_end_of_a_range_is_accepted(name, end):
    value = RANGES[name][0 if end == "lowest" else 1]
    assert getattr(load(name, str(value)), name) == value
    assert getattr(Settings(**{name: value}), name) == value


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("name", RANGES)
def test_a_value_just_outside_a_range_is_refused_naming_the_setting(name, side):
    value = RANGES[name][2 if side == "below" else 3]
    for make in (lambda: load(name, str(value)), lambda: Settings(**{name: value})):
        with pytest.raises(SettingsError) as refused:
            make()
        assert f"{FLAG[name]} ({ENV[name]}) must be" in str(refused.value)


@pytest.mark.parametrize("name", CRASHED)
def test_the_values_that_crashed_the_job_are_refused(name):
    with pytest.raises(SettingsError, match=rf"^{FLAG[name]} \({ENV[name]}\) must be"):
        load(name, CRASHED[name])


# --max-wait's texts that are no plain finite number, refused from its flag and from its variable, each naming its
# source. (Numbers outside its range: test_a_value_just_outside_a_range_is_refused_naming_the_setting.)
@pytest.mark.parametrize("text", ["nan", "inf", "soon", "", "\u0661", "1_000"])
def test_a_max_wait_that_is_no_finite_ascii_number_is_refused_naming_where_it_came_from(text):
    with pytest.raises(SettingsError, match=r"--max-wait"):
        load("max_wait", text)
    with pytest.raises(SettingsError, match=r"RANDOM_USER_MAX_WAIT"):
        load_settings({}, environ={"RANDOM_USER_MAX_WAIT": text})


@pytest.mark.parametrize(
    "flag, says",
    [
        ("--timeout", r"--timeout \(RANDOM_USER_TIMEOUT\) must be between 0.01 and 3600"),
        ("--max-wait", r"--max-wait \(RANDOM_USER_MAX_WAIT\) must be between 0.01 and 86400"),  # the one check of its bounds' words
    ],
    ids=["timeout", "max-wait"],
)
def test_a_number_out_of_range_stops_the_cli_with_one_line_before_any_request(nowhere, out, raw, cli, flag, says):
    # No server: the API address refuses, so a run that went on to make a request would exit 1, not 2.
    result = cli("--seed", "pura", flag, "1e10", env=fast_env(nowhere, out, raw))
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, says)
    assert not out.exists() and not raw.exists()


@pytest.mark.parametrize("name", ["n", "retries"])
def test_a_whole_number_of_5000_digits_is_refused_in_plain_words(name):
    with pytest.raises(SettingsError, match=rf"^{FLAG[name]} \({ENV[name]}\) (must be|is too large)") as refused:
        load(name, "9" * 5000)
    assert "sys." not in str(refused.value) and len(str(refused.value)) < 200


NUMBER_TEXTS = st.one_of(
    st.text(),
    st.text(alphabet="0123456789+-.eE_ infa"),
    st.floats().map(repr),
    st.integers().map(str),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(RANGES)), text=NUMBER_TEXTS)
def test_any_text_for_a_number_gives_settings_in_range_or_a_settings_error(name, text):
    try:
        value = getattr(load(name, text), name)
    except SettingsError as exc:
        assert str(exc).startswith(FLAG[name]) and "\n" not in str(exc) and "sys." not in str(exc)
        return
    if name == "n":
        return  # its top depends on the page size; the default one is in RANGES
    low, high = (0, RANGES[name][1]) if name in ABOVE_ZERO else RANGES[name][:2]
    assert math.isfinite(value) and low <= value <= high and (value > 0 or name not in ABOVE_ZERO)


def test_the_largest_retries_and_waits_work_in_a_run(api, settings):
    # 1000 retries once ran out of stack (urllib3 retried by calling itself); 100 all used must still land.
    api.script(*[status(503)] * 100)
    top = dict(timeout=3600, rate_limit_wait=3600, max_response_mb=1000, concurrency=64)
    landed_batch = etl.run(settings(seed="pura", retries=100, backoff=0, **top))
    assert landed_batch.rows == 100 and len(api.requests) == 101


def test_the_largest_backoff_waits_at_most_an_hour_after_every_retry():
    largest = Settings(backoff=100, retries=100, max_wait=86_400)
    assert all(0 <= client.backoff_time(largest, retry) <= 3600 for retry in range(1, 101))


# ------------------------------------------------------------------ path and URL texts

PATHS = {"output_dir": "/data/lake", "raw_dir": "/data/raw", "api_url": "https://randomuser.me/api/1.4/"}
DIRTY = {
    "leading-space": lambda text: " " + text,
    "trailing-space": lambda text: text + " ",
    "trailing-newline": lambda text: text + "\n",
    "leading-tab": lambda text: "\t" + text,
    "trailing-no-break-space": lambda text: text + "\u00a0",
    "newline-inside": lambda text: text[:5] + "\n" + text[5:],
    "nul-inside": lambda text: text[:5] + "\x00" + text[5:],
    "escape-inside": lambda text: text[:5] + "\x1b[2J" + text[5:],
    "delete-inside": lambda text: text[:5] + "\x7f" + text[5:],
    "c1-control-inside": lambda text: text[:5] + "\x9b" + text[5:],
}


@pytest.mark.parametrize("dirt", DIRTY)
@pytest.mark.parametrize("name", PATHS)
def test_a_path_or_url_with_whitespace_at_an_end_or_a_control_character_is_refused(name, dirt):
    text = DIRTY[dirt](PATHS[name])
    with pytest.raises(SettingsError, match=rf"^{FLAG[name]} \({ENV[name]}\) (has whitespace|holds a control)"):
        Settings(**{name: text})
    if "\x00" not in text:  # no environment variable can hold a NUL
        with pytest.raises(SettingsError, match=rf"^{FLAG[name]} \({ENV[name]}\)"):
            load_settings(environ={ENV[name]: text})


def test_a_space_inside_a_path_is_kept(api, settings, tmp_path):
    etl.run(settings(seed="pura", output_dir=str(tmp_path / "my lake"), raw_dir=str(tmp_path / "my raw")))
    assert batch_files(tmp_path / "my lake") == ["random_users_pura.parquet"]
    assert (tmp_path / "my raw" / "pura").is_dir()


def test_an_output_folder_with_a_leading_space_stops_the_cli_and_creates_nothing(nowhere, out, raw, tmp_path, cli):
    result = cli(env=fast_env(nowhere, f" {out}", raw, RANDOM_USER_SEED="pura"), cwd=tmp_path)
    assert result.returncode == 2  # not 1: no request was tried (the API address refuses)
    assert_one_error_line(result.stderr, r"--output-dir \(RANDOM_USER_OUTPUT_DIR\) has whitespace at its start or end")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_replay_path_with_a_trailing_newline_is_refused(api, out, raw, settings, cli):
    etl.run(settings(seed="pura"))
    result = cli("--replay", f"{raw / 'pura'}\n", env=fast_env(api.url, out, raw))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, r"--replay holds a control character|--replay has whitespace")


# ------------------------------------------------------------------ memory

TEXT_FIELDS = {  # every text field of the contract: where it is in a raw user, and its column
    ("gender",): "gender",
    ("name", "title"): "title",
    ("name", "first"): "first_name",
    ("name", "last"): "last_name",
    ("email",): "email",
    ("login", "username"): "username",
    ("phone",): "phone",
    ("cell",): "cell",
    ("location", "street", "name"): "street_name",
    ("location", "city"): "city",
    ("location", "state"): "state",
    ("location", "country"): "country",
    ("location", "postcode"): "postcode",
    ("location", "timezone", "offset"): "timezone_offset",
    ("location", "timezone", "description"): "timezone_description",
    ("id", "name"): "national_id_type",
    ("id", "value"): "national_id",
    ("nat",): "nationality",
    ("picture", "large"): "picture_url",
}


def holder(user: dict, path: tuple[str, ...]) -> dict:
    """The object of a raw user that holds the field at path."""
    for key in path[:-1]:
        user = user[key]
    return user


FAT_BYTES = 40_000_000


def fat_first_name(doc):
    """The first user's name.first made 40 MB long: a page far under the 64 MB bound, all in one field."""
    doc["results"][0]["name"]["first"] = "a" * FAT_BYTES
    return doc


def test_four_answers_each_with_a_40_mb_name_stay_within_the_pods_memory(api, out, raw):
    # Four pages in flight at the default concurrency (4) and size bound (64 MB); the CronJob's limit is 1 GiB.
    api.script(*[mutate(fat_first_name)] * 4)
    proc = run_cli("--seed", "fat", "--n", "40", "--page-size", "10", "--timeout", "30", env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    assert [r.answer for r in api.requests] == ["mutate"] * 4
    assert max(len(body) for body in api.sent) > FAT_BYTES  # the 40 MB names did cross the wire
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == 1, stderr
    assert_one_error_line(stderr, r"page [1-4]: 1 contract check\(s\) failed: name\.first is longer than 256 bytes in 1 records$")
    assert batch_files(out) == []


LONGEST = "\u00e9" * 128  # 256 bytes of UTF-8, 128 characters


@pytest.mark.parametrize("path", [("name", "first"), ("location", "timezone", "description")])
def test_a_field_of_256_bytes_lands_as_sent(api, settings, path):
    api.script(mutate(lambda doc: holder(doc["results"][3], path).update({path[-1]: LONGEST})))
    batch = etl.run(settings(seed="pura"))
    sent = json.loads(api.sent[0])["results"][3]
    frame = pl.read_parquet(batch.path).filter(pl.col("user_id") == sent["login"]["uuid"])
    assert frame[TEXT_FIELDS[path]].to_list() == [holder(sent, path)[path[-1]]] == [LONGEST]
    assert len(LONGEST.encode()) == 256


def test_a_field_of_257_bytes_is_refused_naming_the_field(api, out, settings):
    api.script(mutate(lambda doc: doc["results"][7]["location"]["street"].update(name=LONGEST + "x")))
    with pytest.raises(etl.EtlError, match=r"^page 1: 1 contract check\(s\) failed: location\.street\.name is longer than 256 bytes in 1 records$"):
        etl.run(settings(seed="pura", retries=0))
    assert batch_files(out) == []


def widest(doc):
    """Every text field of every user at the 256-byte bound, each value its own."""
    for number, user in enumerate(doc["results"]):
        for path in TEXT_FIELDS:
            holder(user, path)[path[-1]] = f"{doc['info']['page']}-{number:05d}-{path[-1]}".ljust(256, "w")
    return doc


def test_full_pages_with_every_text_field_at_the_bound_land_within_the_pods_memory(api, out, raw):
    # The widest rows the contract accepts, 20,000 of them: what sorting and landing hold is bounded by rows.
    api.script(*[mutate(widest)] * 4)
    proc = run_cli("--seed", "wide", "--n", "20000", "--timeout", "60", env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == 0, stderr
    sent = [user for body in api.sent for user in json.loads(body)["results"]]
    frame = pl.read_parquet(out / "random_users_wide.parquet").sort("user_id")
    for path, column in TEXT_FIELDS.items():
        expected = {user["login"]["uuid"]: holder(user, path)[path[-1]] for user in sent}
        assert dict(zip(frame["user_id"], frame[column], strict=True)) == expected, column


# ------------------------------------------------------------------ memory: answers made of tiny values


def tiny_values_answer(total_bytes: int) -> bytes:
    """The recorded pura answer with an unknown key holding empty arrays up to `total_bytes`: valid JSON, all of it nodes."""
    body = json.dumps(fixture_json(PURA), separators=(",", ":")).encode()
    count = (total_bytes - len(body)) // 3
    return body[:-1] + b',"x":[' + b"[]," * (count - 1) + b"[]]}"


def minimal_users_answer(total_bytes: int) -> bytes:
    """An answer in the service's compact layout of as many users with empty values as fit in `total_bytes`."""
    doc = json.loads(page_body("tiny", 1, 1))

    def emptied(value):
        return {k: emptied(v) for k, v in value.items()} if isinstance(value, dict) else "" if isinstance(value, str) else value

    user = json.dumps(emptied(doc["results"][0]), separators=(",", ":")).encode()
    users = b",".join([user] * (total_bytes // (len(user) + 1)))
    return b'{"results":[' + users + b'],"info":' + json.dumps(doc["info"], separators=(",", ":")).encode() + b"}"


def with_junk_values(values: int) -> bytes:
    """The recorded pura answer (100 users) with an unknown key holding `values` zeros: valid JSON, small."""
    doc = fixture_json(PURA)
    doc["junk"] = [0] * values
    return json.dumps(doc, separators=(",", ":")).encode()


TOO_MANY_VALUES = r"holds up to [0-9,]+ JSON values, more than 100 users hold \(at most 7,400\): refused$"


@pytest.mark.parametrize(
    "answer",
    [lambda: tiny_values_answer(60_000_000), lambda: minimal_users_answer(60_000_000)],
    ids=["60-mb-of-empty-arrays", "60-mb-of-empty-users"],
)
def test_an_answer_of_tiny_values_is_refused_unread_within_the_pods_memory(api, out, raw, answer):
    # A JSON reader builds a node per value: 60 MB of "[]," took Polars to a 2.2 GB peak, and the answer landed.
    api.script(body(answer()))
    proc = run_cli("--seed", "pura", "--n", "100", "--timeout", "30", env=fast_env(api.url, out, raw), measure=True)
    peak_mb, stderr = proc.peak_mb, proc.stderr
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == 1, stderr
    assert_one_error_line(stderr, rf"^{PREFIX}page 1: the answer {TOO_MANY_VALUES}")
    assert batch_files(out) == []


@pytest.mark.parametrize(
    "answer",
    [lambda: tiny_values_answer(1_000_000), lambda: with_junk_values(3_000), lambda: json.dumps(json.loads(with_junk_values(3_000)), indent=1).encode()],
    ids=["1-mb-of-empty-arrays", "a-page-with-junk-values", "the-same-indented"],
)
def test_an_answer_holding_more_values_than_its_users_is_refused_unread_whatever_its_size(api, out, raw, cli, answer):
    # Bounded by what it holds, not by its layout or its size: these are small, and used to land.
    api.script(body(answer()))
    result = cli("--seed", "pura", "--retries", "0", env=fast_env(api.url, out, raw))
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, rf"^{PREFIX}page 1: the answer {TOO_MANY_VALUES}")
    assert batch_files(out) == []


def with_values(doc: dict, values: int) -> bytes:
    """The answer in the service's compact layout, commas added to street names until it counts `values` (one more than its ",[{" bytes)."""
    compact = lambda: json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
    missing = values - (1 + sum(compact().count(mark) for mark in (b",", b"[", b"{")))
    for user in doc["results"]:
        street = user["location"]["street"]
        added = min(missing, 256 - len(street["name"].encode()))  # a text field holds at most 256 bytes
        street["name"] += "," * added
        missing -= added
    assert missing == 0
    return compact()


@pytest.mark.parametrize("layout", ["compact", "indented"])
@pytest.mark.parametrize("past", [0, 1], ids=["at-the-bound", "one-past-it"])
def test_a_page_is_bounded_by_its_whole_count_of_values_whatever_its_layout(past, layout):
    # In the service's layout the count is made a piece at a time, each piece just before it is
    # parsed: the pieces, the commas between them, the head and the envelope must add up to the whole
    # answer's count, exactly, so the same page re-indented meets the same bound.
    doc = json.loads(page_body("commas", 1, 1000))
    answer = with_values(doc, 1000 * 64 + 1000 + past)  # the bound for 1,000 users
    assert len(answer) > 2 * (1 << 19), "in three pieces or more"
    if layout == "indented":
        answer = json.dumps(json.loads(answer), indent=2, ensure_ascii=False).encode()
    request = etl.PageRequest("commas", 1, 1000)
    if past:
        with pytest.raises(etl.EtlError, match=r"holds up to 65,001 JSON values, more than 1000 users hold \(at most 65,000\): refused$"):
            etl.transform(answer, request)
    else:
        assert_rows_are(etl.transform(answer, request), json.loads(answer)["results"])


def test_a_page_with_junk_values_within_the_allowance_lands(api, settings):
    doc = json.loads(with_junk_values(2_000))
    api.script(body(json.dumps(doc, indent=2)))
    batch = etl.run(settings(seed="pura"))
    assert_rows_are(pl.read_parquet(batch.path), doc["results"])


def test_a_full_page_reindented_by_a_proxy_lands(api, settings):
    doc = json.loads(page_body("pura", 1, 5000))
    api.script(body(json.dumps(doc, indent=2)))
    batch = etl.run(settings(seed="pura", n=5000, page_size=5000))
    assert_rows_are(pl.read_parquet(batch.path), doc["results"])


def test_a_small_answer_off_the_layout_is_still_read_as_json_reads_it(api, settings):
    # Pretty-printed, with an unknown key: not the service's layout, but small, so it is read (twice) and lands.
    doc = fixture_json(PURA)
    doc["extra"] = [[], {}]
    api.script(body(json.dumps(doc, indent=2)))
    batch = etl.run(settings(seed="pura"))
    assert_rows_are(pl.read_parquet(batch.path), doc["results"])


@pytest.mark.parametrize("name", ["n", "retries", "concurrency", "timeout", "backoff"])
@pytest.mark.parametrize("text", ["\u0663", "1_000", "\uff15"], ids=["arabic-indic-3", "underscored", "fullwidth-5"])
def test_a_number_is_written_in_ascii_digits(name, text):
    # int() and float() read other scripts' digits and underscores: a setting takes what a person types as ASCII.
    with pytest.raises(SettingsError, match=rf"^{FLAG[name]} \({ENV[name]}\) must be"):
        load(name, text)


# ------------------------------------------------------------------ memory: checking an answer's layout


def with_escaped_quote(body: bytes) -> bytes:
    """The answer with a double quote, escaped as the service writes it, in the first user's city."""
    doc = json.loads(body)
    doc["results"][0]["location"]["city"] = 'Santa "Ana"'
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("escapes", [False, True], ids=["plain", "escaped-quote"])
def test_checking_a_full_page_holds_no_memory_per_user(escapes):
    # The layout check's regular expression kept a backtracking entry per user: 26 MB on a full page,
    # twice at once on two staging threads. What Python allocates while typing a page stays small.
    page = page_body("roomy", 1, 5000)
    page = with_escaped_quote(page) if escapes else page
    expected = json.loads(page)["results"]
    tracemalloc.start()
    try:
        frame = etl.transform(page)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB allocated at the peak"
    assert_rows_are(frame, expected)


# ------------------------------------------------------------------ empty values

BLANK = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=4)  # "" among them


@hypothesis_settings(max_examples=200, deadline=None)
@given(name=st.sampled_from([s.name for s in SETTINGS]), text=BLANK)
def test_an_empty_or_blank_value_of_any_setting_is_refused_naming_where_it_came_from(name, text):
    # Never the default, never off: an empty RANDOM_USER_RAW_DIR once turned the raw archive off in silence.
    with pytest.raises(SettingsError, match=rf"^{ENV[name]} is set but empty; unset it for the default"):
        load_settings({}, environ={ENV[name]: text})
    with pytest.raises(SettingsError, match=rf"^{FLAG[name]} is empty; leave it out for the default"):
        load_settings({name: text}, environ={})


def test_an_empty_raw_folder_says_how_to_keep_no_raw_answers():
    with pytest.raises(SettingsError, match=r"^RANDOM_USER_RAW_DIR is set but empty; unset it for the default, or 'off' to keep no raw answers$"):
        load_settings({}, environ={"RANDOM_USER_RAW_DIR": ""})
    with pytest.raises(SettingsError, match=r"^--raw-dir \(RANDOM_USER_RAW_DIR\) must not be empty; use None or 'off'"):
        Settings(raw_dir="")


@pytest.mark.parametrize("word", ["off", "OFF", "Off"])
def test_off_in_any_case_keeps_no_raw_answers_from_a_flag_a_variable_or_python(word):
    assert load("raw_dir", word).raw_dir is None
    assert load_settings({}, environ={"RANDOM_USER_RAW_DIR": word}).raw_dir is None
    assert Settings(raw_dir=word).raw_dir is None


@pytest.mark.parametrize("word", ["none", "no", "false", "0", "NONE"])
def test_a_word_that_looks_like_off_is_refused_not_made_a_folder(word):
    # Read as a folder name, a setting written in one of these words would keep raw answers unasked.
    with pytest.raises(SettingsError, match=rf"^RANDOM_USER_RAW_DIR is not a word for off: only 'off' keeps no raw answers \(write \./{word} "):
        load_settings({}, environ={"RANDOM_USER_RAW_DIR": word})
    assert load("raw_dir", f"./{word}").raw_dir == f"./{word}"


@pytest.mark.parametrize("word", ["off", "no", "false", "0", "OFF"])
def test_a_boolean_keeps_its_words_for_false(word):
    assert load("allow_http", word).allow_http is False
