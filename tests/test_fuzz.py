"""Fuzzing the transform with Hypothesis over mutated real answers.

Property: `transform(body)` raises EtlError or returns exactly the rows oracle.reference_rows
works out from Python's json; never another exception, never a different value. And the reverse:
an answer the reference accepts is not refused, save for a key written twice (refused on purpose)
and, anywhere in the body, a number beyond a float's range or some lone surrogate escapes (Polars'
reader cannot read those at all).

Profiles: "ci" (the default, well under a minute) and "long" (HYPOTHESIS_PROFILE=long, for the
benchmark's machine). No example database is written into the repository.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import os
import re

import pytest
from support import LONE_SURROGATE, Refused, fixture_json, reference_rows
from fake_api import page_body
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import random_user_etl as etl
from _random_user_etl import answer

# ci: 300 examples (about 2 s), each of the 5 answers under each of the 5 mutations a dozen times over;
# no example database, so every run draws new ones and the runs add up. long: 20,000, for a change to the transform.
settings.register_profile("ci", max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INGESTED = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
SOURCES = [
    "noseed_results-5.json",
    "noinfo_seed-noinfo_results-5.json",
    "nat-gb_seed-gbonly_results-25.json",
    "nat-ca-no-fr_seed-mixnat_results-25.json",
    "paged_seed-paged_results-40_page-2.json",
]
REFUSED = "refused"


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text written as is: numbers Python would never write (1.5e3, 1E400, -0.0), or invalid tokens."""

    text: str


@dataclasses.dataclass
class Pairs:
    """A JSON object as key/value pairs, so a key may appear twice."""

    items: list


def dump(value, ascii_only: bool, pretty: bool) -> str:
    """JSON text of a value tree holding Raw numbers and Pairs objects."""
    space = " " if pretty else ""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, (dict, Pairs)):
        items = value.items if isinstance(value, Pairs) else list(value.items())
        return "{" + ",".join(f"{dump(k, ascii_only, pretty)}:{space}{dump(v, ascii_only, pretty)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(dump(v, ascii_only, pretty) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def paths(value, here=()):
    """Every path (keys and indexes) to a value in a tree, the root excluded."""
    found = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found.append((*here, key))
        found += paths(child, (*here, key))
    return found


def at(tree, path):
    """The container holding the last step of a path."""
    for step in path[:-1]:
        tree = tree[step]
    return tree


NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            Raw(t)
            for t in (
                "1.5e3",
                "1E400",
                "-1e400",
                "1e-400",
                "-0.0",
                "-0",
                "41.0",
                "1.50",
                "123456789012345678901234567890",
                "5e-324",
                "9007199254740993",
                "NaN",
                "Infinity",
            )
        ]
    ),
)
TEXTS = st.one_of(
    st.sampled_from(
        [
            "",
            "NaN",
            "nan",
            "inf",
            "-Infinity",
            "1e5",
            "+41",
            "041",
            " 41",
            "41.0",
            "4_1",
            "١٢",
            ".5",
            "5.",
            "0x10",
            "x" * 10_000,
            "😀",
            "שלום עולם",
            "\u202eevil",
            "a\x00b",
            "\ud800X",
            "\udc00",
            "\ud83d\ude00",
            "Z",
            "1961-04-14T13:40:33Z",
            "1961-04-14T13:40:33.1234567+02:00",
            "1961-4-14T13:40:33Z",
            "1961-04-14T13:40:60Z",
            "1961-04-14T13:40:33.374z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            " 1961-04-14T13:40:33Z",
            "1961-04-14T13:40:33.374+02:",
            "+1961-04-14T13:40:33Z",
            "1961-02-30T00:00:00Z",
            "1",
            "0",
        ]
    ),
    st.text(max_size=30),
)
VALUES = st.one_of(
    st.none(), st.booleans(), NUMBERS, TEXTS, st.builds(dict), st.builds(list), st.builds(lambda: {"a": "b"}), st.builds(lambda: ["x"])
)  # fresh: never a shared object


def pick(data, paths_, label):
    """One of these paths, or None when there is none (an earlier mutation took them all)."""
    return data.draw(st.sampled_from(paths_), label=label) if paths_ else None


def replace_leaf(doc, data):
    path = pick(data, [p for p in paths(doc) if not isinstance(at(doc, p)[p[-1]], (dict, list, Pairs))], "leaf")
    if path:
        at(doc, path)[path[-1]] = data.draw(VALUES, label="value")
    return doc


def replace_any(doc, data):
    path = pick(data, paths(doc), "node")
    if path:
        at(doc, path)[path[-1]] = data.draw(VALUES, label="value")
    return doc


def delete_key(doc, data):
    path = pick(data, [p for p in paths(doc) if isinstance(p[-1], str)], "key")
    if path:
        del at(doc, path)[path[-1]]
    return doc


def duplicate_user(doc, data):
    users = doc.get("results") if isinstance(doc, dict) else None
    if isinstance(users, list) and users:
        copy_ = copy.deepcopy(users[data.draw(st.integers(0, len(users) - 1), label="user")])
        if data.draw(st.booleans(), label="new id") and isinstance(copy_, dict) and isinstance(copy_.get("login"), dict):
            copy_["login"]["uuid"] = f"copy-{len(users)}"  # the same person under another id: lands twice
        users.insert(data.draw(st.integers(0, len(users)), label="at"), copy_)
        if isinstance(doc.get("info"), dict) and data.draw(st.booleans(), label="recount"):
            doc["info"]["results"] = len(users)
    return doc


def duplicate_key(doc, data):
    path = pick(data, [p for p in paths(doc) if isinstance(at(doc, p)[p[-1]], dict) and at(doc, p)[p[-1]]], "object")
    if not path:
        return doc
    obj = at(doc, path)[path[-1]]
    key = data.draw(st.sampled_from(list(obj)), label="key")
    again = data.draw(st.one_of(st.just(obj[key]), VALUES), label="value again")
    items = list(obj.items())
    items.insert(data.draw(st.integers(0, len(items)), label="at"), (key, again))
    at(doc, path)[path[-1]] = Pairs(items)
    return doc


MUTATIONS = [replace_leaf, replace_any, delete_key, duplicate_user, duplicate_key]


def sometimes(one_in: int):
    """True once in `one_in` draws (shrinking toward False): most examples then keep a readable answer."""
    return st.integers(1, one_in).map(lambda n: n == one_in)


def outcome(call):
    """What a reading gives: its rows, or REFUSED."""
    try:
        return call()
    except (etl.EtlError, Refused):
        return REFUSED


@given(data=st.data())
def test_the_transform_refuses_or_lands_what_the_standard_reader_reads(data):
    doc = fixture_json(data.draw(st.sampled_from(SOURCES), label="answer"))
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2), label="mutations"):
        doc = mutation(doc, data)
    text = dump(doc, ascii_only=data.draw(st.booleans(), label="ascii"), pretty=data.draw(sometimes(4), label="pretty"))
    body = text.encode("utf-8", "surrogatepass")
    if data.draw(sometimes(8), label="truncate"):
        body = body[: data.draw(st.integers(0, len(body) - 1), label="cut")]
    if data.draw(sometimes(4), label="bom"):
        body = b"\xef\xbb\xbf" + body
    expected = outcome(lambda: reference_rows(body, INGESTED))
    got = outcome(lambda: etl.transform(body, ingested_at=INGESTED).to_dicts())
    event(f"reference {'refuses' if expected == REFUSED else 'accepts'}, transform {'refuses' if got == REFUSED else 'accepts'}")
    if got != REFUSED:
        assert got == expected
    elif expected != REFUSED:
        assert refused_on_purpose(body), "the reference reads this answer, yet the transform refuses it"


def refused_on_purpose(body: bytes) -> bool:
    """True for answers the reference reads but the job refuses by design: a key written twice (refused
    on purpose), or, anywhere in the body, even in a field the contract does not use, what Polars'
    reader cannot read: a number beyond a float's range, some lone surrogate escapes."""
    found = []

    def pairs(items):
        found.append(len(dict(items)) < len(items))
        return dict(items)

    doc = json.loads(body, object_pairs_hook=pairs, parse_float=lambda text: found.append(math.isinf(float(text))))
    return any(found) or LONE_SURROGATE.search(json.dumps(doc, ensure_ascii=False)) is not None


@pytest.mark.parametrize("source", SOURCES)
def test_the_unmutated_answers_land_as_the_reference_reads_them(source):
    body = json.dumps(fixture_json(source)).encode()
    assert etl.transform(body, ingested_at=INGESTED).to_dicts() == reference_rows(body, INGESTED)


WHITESPACE = st.text(alphabet=" \t\n\r", max_size=3)  # JSON's own whitespace, nothing else


def shuffled(value, rng):
    """A JSON value with the keys of every object in an order drawn from `rng`."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {key: shuffled(value[key], rng) for key in keys}
    return [shuffled(item, rng) for item in value] if isinstance(value, list) else value


@given(data=st.data())
def test_any_layout_of_an_answer_lands_what_the_standard_reader_reads(data):
    # Keys in any order, any JSON whitespace between tokens: the same rows as the compact answer.
    doc = fixture_json(data.draw(st.sampled_from(SOURCES), label="answer"))
    doc = shuffled(doc, data.draw(st.randoms(use_true_random=False), label="key order"))
    indent = data.draw(st.one_of(st.none(), st.integers(0, 4), WHITESPACE), label="indent")
    around = [data.draw(WHITESPACE, label="space") for _ in range(4)]
    separators = (f"{around[0]},{around[1]}", f"{around[2]}:{around[3]}")
    text = data.draw(WHITESPACE) + json.dumps(doc, indent=indent, separators=separators, ensure_ascii=data.draw(st.booleans())) + data.draw(WHITESPACE)
    body = text.encode()
    compact = json.dumps(doc).encode()
    assert etl.transform(body, ingested_at=INGESTED).to_dicts() == reference_rows(body, INGESTED) == reference_rows(compact, INGESTED)


# ---------------------------------------------------------------- a page in the service's layout, read in pieces

PIECE_BYTES = 2048  # pieces of two or three users, so a small page is cut a dozen times
IN_PIECES = page_body("pieces", 1, 24)
# Texts that look like the layout's own cuts and ends, with a quote, a backslash or a lone surrogate.
CUT_TEXTS = ['},{"gender":"x', '],"info":{', '"},{"gender":"', "\\", '\\"},{"gender":', "\ud800", "😀", "\n", '}],"info":{"seed":"pieces"}}']
# Raw bytes that leave the layout (a key twice, whitespace, an escape) or JSON itself (a stray quote).
SNIPPETS = [b',"nat":"XX"', b" ", b"\n", b'\\"', b"\\ud800", b"\\u0041", b'"', b'},{"gender":', b'],"info":{', b"\\", b"\x01"]

TWICE = [b'"gender":', b'"first":', b'"city":', b'"postcode":', b'"uuid":', b'"date":', b'"value":', b'"nat":']


USER_STARTS = [found.start() for found in re.finditer(rb'\{"gender":', IN_PIECES)]  # json.dumps writes no space: every user starts alike


def user_span(user: int) -> tuple[int, int]:
    """Where the page's user number `user` starts and ends."""
    last = user + 1 == len(USER_STARTS)
    return USER_STARTS[user], (IN_PIECES.rindex(b'],"info":{') if last else USER_STARTS[user + 1] - 1)


def off_the_layout(data) -> bytes:
    """The page with one user, or its tail, changed: in a text, in its raw bytes, or after its users."""
    doc = json.loads(IN_PIECES)
    user = data.draw(st.integers(0, len(doc["results"]) - 1), label="user")
    kind = data.draw(st.sampled_from(["text", "twice", "raw", "tail"]), label="kind")
    if kind == "text":
        place = doc["results"][user]["location"]
        place[data.draw(st.sampled_from(["city", "state", "country"]), label="field")] = "".join(
            data.draw(st.lists(st.sampled_from(CUT_TEXTS), min_size=1, max_size=3), label="text")
        )
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=data.draw(st.booleans(), label="ascii")).encode("utf-8", "surrogatepass")
    start, stop = user_span(user)
    if kind == "twice":  # a key of the user written twice, another value first: Polars would keep that one
        key = data.draw(st.sampled_from(TWICE), label="key")
        at = IN_PIECES.index(key, start, stop)
        return IN_PIECES[:at] + key + data.draw(st.sampled_from([b'"Elsewhere"', b"null", b"7"]), label="first value") + b"," + IN_PIECES[at:]
    if kind == "raw":
        # Anywhere in the user, or where a key could follow a value: before a comma or a closing brace.
        between = [m.start() for m in re.finditer(rb'(?=,"[a-z0-9]+":|\})', IN_PIECES[:stop]) if m.start() >= start]
        at = data.draw(st.one_of(st.sampled_from(between), st.integers(start, stop)), label="at")
        return IN_PIECES[:at] + data.draw(st.sampled_from(SNIPPETS), label="snippet") + IN_PIECES[at:]
    end = IN_PIECES.rindex(b'],"info":{')
    tail = data.draw(
        st.sampled_from(
            [
                b'],\n  "info": ' + json.dumps(doc["info"], indent=2).encode() + b"\n}",
                IN_PIECES[end:] + b" ",
                IN_PIECES[end:] + IN_PIECES[end:],
                IN_PIECES[end:-1],
            ]
        ),
        label="tail",
    )
    return IN_PIECES[:end] + tail


@given(data=st.data())
def test_a_page_that_leaves_the_layout_in_a_later_piece_refuses_or_lands_what_the_standard_reader_reads(data):
    # A page that starts in the service's layout is read a piece at a time, each matched against the
    # layout as it is parsed: whichever piece leaves it, the answer is read as Python's json reads it.
    body = off_the_layout(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(answer, "PIECE_BYTES", PIECE_BYTES)
        got = outcome(lambda: etl.transform(body, ingested_at=INGESTED).to_dicts())
    expected = outcome(lambda: reference_rows(body, INGESTED))
    event(f"reference {'refuses' if expected == REFUSED else 'accepts'}, transform {'refuses' if got == REFUSED else 'accepts'}")
    if got != REFUSED:
        assert got == expected
    elif expected != REFUSED:
        assert refused_on_purpose(body), "the reference reads this answer, yet the transform refuses it"
