"""The transform against the raw JSON: every contract column, value by value."""

from __future__ import annotations

import datetime as dt
import json
import re
from concurrent import futures

import polars as pl
import pytest
from support import COLUMNS, assert_rows_are, fixture_bytes, fixture_json, reference_rows
from fake_api import _dumps, page_body

import random_user_etl as etl
from _random_user_etl import answer

CONTRACT = pl.Schema(COLUMNS)  # the oracle's own statement of the columns, not the job's schemas

RECORDED = [
    "default_seed-pura_results-100.json",
    "paged_seed-paged_results-40_page-2.json",
    "nat-gb_seed-gbonly_results-25.json",
    "nat-ca-no-fr_seed-mixnat_results-25.json",
    "noseed_results-5.json",
    "noinfo_seed-noinfo_results-5.json",
]
CREDENTIALS = ("password", "salt", "md5", "sha1", "sha256")
INGESTED = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def assert_every_column_is_raw(frame: pl.DataFrame, body: bytes) -> None:
    """Every row and column of a transformed answer, against the oracle's reading of its raw JSON, in the answer's order."""
    assert frame.schema == CONTRACT
    expected = reference_rows(body, INGESTED)
    assert frame["user_id"].to_list() == [row["user_id"] for row in expected]
    for row, want in zip(frame.to_dicts(), expected, strict=True):
        for name in CONTRACT:
            assert row[name] == want[name], (row["user_id"], name)


@pytest.mark.parametrize("name", [name for name in RECORDED if "noinfo" not in name])
def test_every_recorded_answer_with_an_info_is_read_the_fast_way_in_the_services_layout(name):
    # The layout check names the kind of value the service writes under each key: were one wrong, every
    # real page would be read whole and then again by Python's json: rightly, but slowly.
    assert answer.read_in_layout(fixture_bytes(name), 5000) is not None


@pytest.mark.parametrize("name", RECORDED)
def test_every_column_matches_the_raw_json(name):
    assert_every_column_is_raw(etl.transform(fixture_bytes(name), ingested_at=INGESTED), fixture_bytes(name))


def test_a_large_answer_matches_the_raw_json():
    body = page_body("large", 3, 2000)
    assert_every_column_is_raw(etl.transform(body, ingested_at=INGESTED), body)


@pytest.mark.parametrize("users", [100, 5000])
def test_an_answer_cut_short_is_malformed_json(users):
    with pytest.raises(etl.EtlError, match=r"the answer is not JSON of the randomuser.me 1.4 shape \(malformed JSON"):
        etl.transform(page_body("cut", 3, users)[:-100])


def reordered(value):
    """A JSON value with the keys of every object in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(value)}
    return [reordered(item) for item in value] if isinstance(value, list) else value


RELAYOUTS = {
    "indented": lambda doc: json.dumps(doc, indent=2),
    "keys-reordered": lambda doc: json.dumps(reordered(doc), separators=(",", ":")),
    "indented-and-reordered": lambda doc: json.dumps(reordered(doc), indent="\t", separators=(" ,", " : ")),
}


@pytest.mark.parametrize("relayout", RELAYOUTS.values(), ids=RELAYOUTS)
def test_a_full_page_in_another_layout_lands_the_rows_of_the_compact_one(relayout):
    # A proxy that re-indents, or a person replaying a page saved pretty-printed: the same answer.
    page = page_body("relaid", 2, 5000)
    doc = json.loads(page)
    body = relayout(doc).encode()
    assert len(body) > 5_000_000 and body != page
    assert_rows_are(etl.transform(body), doc["results"])
    assert etl.transform(body, ingested_at=INGESTED).equals(etl.transform(page, ingested_at=INGESTED))


def test_string_and_integer_postcodes_in_one_page_keep_their_text():
    raw = fixture_json("nat-ca-no-fr_seed-mixnat_results-25.json")["results"]
    kinds = {type(u["location"]["postcode"]) for u in raw}
    assert kinds == {int, str}, "the recording should mix both kinds"
    frame = etl.transform(fixture_bytes("nat-ca-no-fr_seed-mixnat_results-25.json"))
    postcodes = dict(frame.select("user_id", "postcode").rows())
    for user in raw:
        assert postcodes[user["login"]["uuid"]] == str(user["location"]["postcode"])
    # Norwegian postcodes are four digits that may start with 0: never reshaped to a number.
    norwegian = [str(u["location"]["postcode"]) for u in raw if u["nat"] == "NO"]
    assert norwegian and all(len(p) == 4 for p in norwegian)


def test_british_string_postcodes_survive_a_page_that_starts_with_numbers():
    # A page whose first rows have integer postcodes is what makes schema inference drop strings.
    body = fixture_json("default_seed-pura_results-100.json")
    gb = fixture_json("nat-gb_seed-gbonly_results-25.json")["results"]
    body["results"] = body["results"][:10] + gb
    body["info"]["results"] = len(body["results"])
    frame = etl.transform(json.dumps(body).encode())
    postcodes = dict(frame.select("user_id", "postcode").rows())
    for user in gb:
        assert postcodes[user["login"]["uuid"]] == user["location"]["postcode"]
        assert not user["location"]["postcode"].isdigit()


def test_empty_and_null_national_ids_become_null_and_real_ones_stay():
    raw = fixture_json("default_seed-pura_results-100.json")["results"]
    frame = etl.transform(fixture_bytes("default_seed-pura_results-100.json"))
    ids = {row[0]: row[1:] for row in frame.select("user_id", "national_id_type", "national_id").rows()}
    empty = [u for u in raw if u["id"]["value"] is None]
    assert empty, "the recording should hold users with no national id"
    for user in raw:
        id_type, id_value = ids[user["login"]["uuid"]]
        assert id_type == (user["id"]["name"] or None)
        assert id_value == user["id"]["value"]


def test_credentials_never_reach_the_frame():
    raw = fixture_json("default_seed-pura_results-100.json")["results"]
    frame = etl.transform(fixture_bytes("default_seed-pura_results-100.json"))
    secrets = {u["login"][key] for u in raw for key in CREDENTIALS}
    cells = {value for row in frame.rows() for value in row}
    assert not secrets & cells
    assert not set(frame.columns) & set(CREDENTIALS)


def test_an_empty_page_gives_an_empty_frame_with_the_contract_schema():
    frame = etl.transform(b'{"results":[],"info":{"seed":"x","results":"0","page":1,"version":"1.4"}}')
    assert frame.height == 0
    assert frame.schema == CONTRACT


def test_expectations_are_checked_against_info():
    body = fixture_bytes("paged_seed-paged_results-40_page-2.json")
    etl.transform(body, etl.PageRequest("paged", 2, 40))
    with pytest.raises(etl.EtlError, match="page 3"):
        etl.transform(body, etl.PageRequest("paged", 3, 40))
    with pytest.raises(etl.EtlError, match="seed 'other'"):
        etl.transform(body, etl.PageRequest("other", 2, 40))
    with pytest.raises(etl.EtlError, match="asked for 41 users"):
        etl.transform(body, etl.PageRequest("paged", 2, 41))


def test_a_field_the_contract_needs_but_the_answer_lacks_is_named():
    # The service's inc= drops whole fields: such an answer cannot fill the contract.
    with pytest.raises(etl.EtlError) as error:
        etl.transform(fixture_bytes("inc-gender-name-nat_seed-narrow_results-10.json"))
    assert "login.uuid is missing or null in 10 records" in str(error.value)
    assert "location.city is missing or null in 10 records" in str(error.value)


def test_numbers_are_not_silently_truncated():
    body = fixture_json("noseed_results-5.json")
    body["results"][0]["dob"]["age"] = 41.5
    body["results"][1]["location"]["street"]["number"] = True
    with pytest.raises(etl.EtlError) as error:
        etl.transform(json.dumps(body).encode())
    assert "dob.age does not parse as a whole number in 1 records" in str(error.value)
    assert "location.street.number does not parse as a whole number in 1 records" in str(error.value)


def test_a_national_id_written_as_empty_text_or_null_is_null_either_way():
    body = fixture_json("noseed_results-5.json")
    body["results"][0]["id"] = {"name": None, "value": ""}
    body["results"][1]["id"] = {"name": "", "value": None}
    frame = etl.transform(json.dumps(body).encode())
    ids = dict((row[0], row[1:]) for row in frame.select("user_id", "national_id_type", "national_id").rows())
    assert ids[body["results"][0]["login"]["uuid"]] == (None, None)
    assert ids[body["results"][1]["login"]["uuid"]] == (None, None)
    third = body["results"][2]["id"]
    assert ids[body["results"][2]["login"]["uuid"]] == (third["name"] or None, third["value"] or None)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"results": "99"}, "info.results=99 but holds 100 users"),
        ({"page": "abc"}, "info.page 'abc' is not a page number"),
        ({"page": "0"}, "info.page '0' is not a page number"),
    ],
)
def test_an_info_that_contradicts_the_answer_is_refused(change, says):
    body = fixture_json("default_seed-pura_results-100.json")
    body["info"].update(change)
    with pytest.raises(etl.EtlError, match=says):
        etl.transform(json.dumps(body).encode())


# ---------------------------------------------------------------- hostile data: what json reads, or a refusal

NOSEED = "noseed_results-5.json"


def compact(doc: dict) -> bytes:
    """An answer in the service's own compact layout."""
    return _dumps(doc).encode()


def first_user_text(old: str, new: str) -> bytes:
    """The compact noseed answer with one piece of its first user's text replaced (raw JSON text)."""
    body = compact(fixture_json(NOSEED)).decode()
    assert old in body
    return body.replace(old, new, 1).encode()


def assert_lands_as_json_reads(body: bytes) -> None:
    """The transform lands exactly the reference's rows (Python's json by the contract's rules)."""
    assert etl.transform(body, ingested_at=INGESTED).to_dicts() == reference_rows(body, INGESTED)


def test_a_utf8_byte_order_mark_is_accepted_as_json_reads_it():
    # json.loads(bytes) skips one UTF-8 BOM; so does the job, in the service's layout and off it alike.
    for body in (fixture_bytes(NOSEED), page_body("bom", 3, 2000)):
        assert_lands_as_json_reads(b"\xef\xbb\xbf" + body)


def test_a_full_page_whose_text_holds_escapes_lands_as_json_reads_it():
    # The service writes a double quote in a Mexican city as \": a 5,000-user page with one is still
    # the service's layout, read once by Polars (not refused as too large to read twice).
    body = page_body("quoted", 1, 5000).replace(b'"city":"', b'"city":"Ciudad \\"Vieja\\" \\/ ', 1)
    assert len(body) > 5_000_000 and b'\\"' in body
    assert_lands_as_json_reads(body)


def test_two_byte_order_marks_are_refused_as_json_refuses_them():
    for body in (fixture_bytes(NOSEED), page_body("bom", 3, 2000)):
        with pytest.raises(json.JSONDecodeError):
            json.loads(b"\xef\xbb\xbf\xef\xbb\xbf" + body)
        with pytest.raises(etl.EtlError):
            etl.transform(b"\xef\xbb\xbf\xef\xbb\xbf" + body)


@pytest.mark.parametrize("escape", [r"\ud800X", r"X\udc00", r"\ude00\ud83d", r"\ud800\u0041", r"\ud800\ud800"])
def test_a_lone_surrogate_escape_is_refused_naming_the_field(escape):
    first = fixture_json(NOSEED)["results"][0]["name"]["first"]
    body = first_user_text(f'"first":"{first}"', f'"first":"{escape}"')
    with pytest.raises(etl.EtlError, match=r"name\.first holds a lone UTF-16 surrogate in 1 records"):
        etl.transform(body)


def test_a_lone_surrogate_in_a_thousand_user_answer_is_refused_too():
    body = page_body("many", 3, 1000).replace(b'"nat":"', b'"nat":"\\udbff', 1)
    with pytest.raises(etl.EtlError, match=r"nat holds a lone UTF-16 surrogate in 1 records"):
        etl.transform(body)


@pytest.mark.parametrize("escape, reads", [(r"\ud83d\ude00", "😀"), (r"\uD83D\uDE00x", "😀x"), (r"\u00e9\u0000\/", "é\x00/")])
def test_escaped_pairs_and_other_escapes_land_as_json_reads_them(escape, reads):
    first = fixture_json(NOSEED)["results"][0]["name"]["first"]
    body = first_user_text(f'"first":"{first}"', f'"first":"{escape}"')
    assert json.loads(body)["results"][0]["name"]["first"] == reads
    assert_lands_as_json_reads(body)


DUPLICATES = {
    # Polars keeps the first of a repeated key, Python's json the last: such an answer is refused.
    "a text": ('"title":"', '"title":"Dr","title":"'),
    "a national id, null first": ('"id":{"name":"', '"id":{"value":null,"name":"'),
    "a whole object": ('"name":{"title"', '"name":{"title":"Mr","first":"A","last":"B"},"name":{"title"'),
    "the users": ('{"results":[', '{"results":[],"results":['),
    "a key written with an escape": ('"title":"', '"titl\\u0065":"Dr","title":"'),
    "info.seed": ('"info":{"seed":"', '"info":{"seed":"other","seed":"'),
}


@pytest.mark.parametrize("where", DUPLICATES)
def test_a_key_written_twice_in_one_object_is_refused(where):
    old, new = DUPLICATES[where]
    body = first_user_text(old, new)
    with pytest.raises(etl.EtlError, match=r"holds? a key twice"):
        etl.transform(body)


@pytest.mark.parametrize(
    "date",
    [
        "1961-4-14T13:40:33.374Z",  # a one-digit month
        "1961-04-14T13:40:60.000Z",  # a leap second: Polars rolls it into the next minute
        " 1961-04-14T13:40:33.374Z",  # leading space
        "+1961-04-14T13:40:33.374Z",
        "1961-04-14T13:40:33.374+02:",  # an offset cut short
        "0001-01-01T00:00:00.000+01:00",  # an instant before year 1 in UTC: no reader can hold it
        "9999-12-31T23:59:59.000-01:00",  # after year 9999 in UTC
    ],
)
def test_a_date_a_standard_reader_would_not_read_is_refused(date):
    old = fixture_json(NOSEED)["results"][0]["dob"]["date"]
    with pytest.raises(etl.EtlError, match=r"dob\.date (does not parse as a date|lies outside the years 1 to 9999) in 1 records"):
        etl.transform(first_user_text(old, date))


@pytest.mark.parametrize("date", ["1961-04-14T13:40:33Z", "1961-04-14T13:40:33.123456789+02:00", "1961-04-14T13:40:33.5-00:30"])
def test_dates_in_other_iso_forms_land_as_the_reference_reads_them(date):
    old = fixture_json(NOSEED)["results"][0]["dob"]["date"]
    assert_lands_as_json_reads(first_user_text(old, date))


def test_a_page_number_in_other_digits_is_refused():
    doc = fixture_json(NOSEED)
    doc["info"]["page"] = "1\u0661"  # Arabic-Indic one: Python's int() reads "11"
    with pytest.raises(etl.EtlError, match="is not a page number"):
        etl.transform(compact(doc))


@pytest.mark.parametrize("text", ['x},{"gender":"y', "x},{\\u0022gender\\u0022:", '"]},{"gender":"male"}],"info":{'])
def test_a_text_that_looks_like_the_cut_between_users_lands_as_written(text):
    # The service's layout is parsed in pieces cut between users: no text is ever cut.
    doc = json.loads(page_body("cut", 1, 2000))
    doc["results"][700]["location"]["city"] = text
    doc["results"][1400]["name"]["last"] = text
    body = compact(doc)
    assert_rows_are(etl.transform(body), doc["results"])


@pytest.mark.parametrize("user", [0, 2500, 4999])
def test_a_key_written_twice_anywhere_in_a_full_page_is_refused(user):
    # The layout of a full page is checked piece by piece: a key twice in any piece is caught.
    body = page_body("twice", 1, 5000)
    at = -1
    for _ in range(user + 1):
        at = body.index(b',"nat":"', at + 1)
    body = body[:at] + b',"nat":"XX"' + body[at:]
    with pytest.raises(etl.EtlError, match=r"1 JSON object\(s\) hold a key twice \(nat\)"):
        etl.transform(body)


def transformed(body: bytes, expect: etl.PageRequest | None = None):
    """What the transform gives: the users' ids, or the one line of its refusal."""
    try:
        return etl.transform(body, expect)["user_id"].to_list()
    except etl.EtlError as exc:
        return str(exc)


def test_pages_transformed_at_once_from_many_threads_read_each_as_alone(monkeypatch):
    # The parsing threads are shared by every page typed at once: one page's refusal, or a piece of it
    # found off the layout, must never reach another's pieces (which would then be read whole).
    monkeypatch.setattr(answer, "PIECE_BYTES", 4096)  # a dozen pieces to a page of 60 users
    good = page_body("shared", 1, 60)
    doc = json.loads(good)
    at = good.index(b'"city":"', len(good) * 3 // 4)
    cases = {
        "in the layout": (good, None, [u["login"]["uuid"] for u in doc["results"]]),
        "a space in a late piece": (good[:at] + b'"city": ' + good[at + 7 :], None, [u["login"]["uuid"] for u in doc["results"]]),
        "a key twice in a late piece": (good[:at] + b'"city":"X",' + good[at:], None, "1 contract check(s) failed: 1 JSON object(s) hold a key twice (city)"),
        "a control character in a late piece": (good[:at] + b'"city":"\x01' + good[at + 8 :], None, "the answer is not JSON"),
        "more values than its users hold": (good, etl.PageRequest("shared", 1, 10), "JSON values, more than 10 users hold"),
    }
    read_whole, whole = answer.read_whole, []
    monkeypatch.setattr(answer, "read_whole", lambda body: whole.append(body) or read_whole(body))
    pages = [name for _ in range(12) for name in cases]  # interleaved: a page in the layout after each kind of refusal
    with futures.ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda name: transformed(*cases[name][:2]), pages))
    for name, read in zip(pages, got, strict=True):
        expected = cases[name][2]
        assert read == expected if isinstance(expected, list) else expected in read, name
    assert whole and good not in whole, "the page in the layout was read whole: another page's reading reached it"


def leading_zero(body: bytes, key: bytes, nth: int) -> tuple[bytes, int]:
    """The body with the `nth` number written after `key` given a leading zero (JSON allows none), and where that number starts."""
    at = [m.end() for m in re.finditer(re.escape(key) + rb"(?=[0-9])", body)][nth]
    return body[:at] + b"0" + body[at:], at


@pytest.mark.parametrize("where", ["a late user", "the info"])
def test_a_number_no_json_reader_reads_is_placed_where_it_is_in_the_answer(where):
    # A page in the service's layout is parsed a piece at a time: a fault is still said at its place in
    # the answer, not in the piece it was parsed in.
    page = page_body("placed", 1, 1500)
    assert len(page) > 2 * (1 << 19), "in three pieces or more"
    body, at = leading_zero(page, b'"postcode":', 1000) if where == "a late user" else leading_zero(page, b'"results":', 0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    with pytest.raises(etl.EtlError, match=r"malformed JSON at character [0-9]+\)$") as refused:
        etl.transform(body)
    said = int(str(refused.value).rsplit(" ", 1)[1].rstrip(")"))
    assert at <= said <= at + 8, f"said at character {said:,}; the number starts at byte {at:,}"
