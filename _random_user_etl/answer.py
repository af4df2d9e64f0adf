"""An answer's bytes read as JSON, strictly: its shape, its envelope, and where Python's json would read it otherwise."""

from __future__ import annotations

import collections
import dataclasses
from concurrent import futures
import functools
import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar
import polars as pl
from _random_user_etl.shown import shorten
from random_user_config import MAX_PAGE_SIZE
from schemas import RAW_INFO, RAW_RESPONSE, RAW_USER, SOURCE_FIELDS, Dtype
from _random_user_etl.errors import AnswerError


BOM = b"\xef\xbb\xbf"  # json.loads(bytes) skips a UTF-8 byte order mark; so does the transform


# The service's own compact layout of a user, key by key. An answer written in it with no surrogate
# escape (keys are matched as written, so no escape can hide one) holds every key once in every object,
# and Polars reads it as Python's json does; any other answer is read once more by Python's json to check.
USER_LAYOUT = (
    "gender,name{title,first,last},location{street{number,name},city,state,country,postcode,"
    "coordinates{latitude,longitude},timezone{offset,description}},email,"
    "login{uuid,username,password,salt,md5,sha1,sha256},dob{date,age},registered{date,age},phone,cell,"
    "id{name,value},picture{large,medium,thumbnail},nat"
)


INFO_LAYOUT = "seed,results,page,version"


# Where the service's layout starts, cuts between users, and leaves them for the info. None of these
# begins inside a text of valid JSON: its quote would end the text, and no key can follow a text.
USER_HEAD = b'{"gender":'
LAYOUT_HEAD = b'{"results":[' + USER_HEAD
USER_CUT = b"}," + USER_HEAD
LAYOUT_TAIL = b'],"info":{'
PIECE_BYTES = 1 << 19  # about 500 of the service's users
USER_COLUMNS = pl.Schema(RAW_USER.to_schema())
ENVELOPE_FIELDS: dict[str, Dtype] = {"info": RAW_INFO, "error": pl.String}
ENVELOPE = pl.Schema(ENVELOPE_FIELDS)


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate written as an escape (a byte check)


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what is left of a lone escape once Python's json pairs the rest


# A JSON reader builds a node per value, whatever the value's size: a body of tiny values ("[],[],...")
# takes dozens of times its size in memory, in Polars and in Python's json alike. So the values are
# bounded before a reader reads them, by what the users asked for hold, in any layout: every value but the
# first of a container follows a comma, and every container opens with "[" or "{", so one more than
# those bytes bounds the values (one inside a text only counts one value too many).
VALUE_MARKS = b",[{"
VALUES_PER_USER = 64  # a service user counts 47 so, and one more per comma in its text
VALUES_ALLOWANCE = 1_000  # the envelope, and room for the fields the service adds
# The body is counted a piece at a time: the count copies little of it, and each copy is below glibc's
# mmap threshold, so freeing it never raises that threshold (which puts later large buffers on the heap).
COUNTED_PIECE = 1 << 16
# Polars parses on these threads, releasing the GIL, while another holds it to check a layout.
# Two: a piece each on both cores of a small machine; the pages typed at once share them.
PARSERS = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PageRequest:
    """What one page should hold: a check on the answer wherever a field is not None."""

    seed: str | None
    page: int | None
    results: int | None


def without_bom(body: bytes) -> bytes:
    """The body without a leading UTF-8 byte order mark."""
    return body[len(BOM) :] if body.startswith(BOM) else body


def most_values(most_users: int) -> int:
    """The most JSON values an answer of at most `most_users` users may hold."""
    return max(most_users, 1) * VALUES_PER_USER + VALUES_ALLOWANCE


def value_marks(body: bytes, start: int = 0, stop: int | None = None) -> int:
    """The commas and opening brackets in body[start:stop], counted in C."""
    stop = len(body) if stop is None else stop
    pieces = (body[at : min(at + COUNTED_PIECE, stop)] for at in range(start, stop, COUNTED_PIECE))
    return sum(len(piece) - len(piece.translate(None, VALUE_MARKS)) for piece in pieces)


def check_value_count(body: bytes, most_users: int) -> None:
    """Refuse a body holding more JSON values than `most_users` users hold: one more than its commas and opening brackets."""
    values, most = 1 + value_marks(body), most_values(most_users)
    if values > most:
        raise AnswerError(f"the answer holds up to {values:,} JSON values, more than {most_users} users hold (at most {most:,}): refused")


class ValueBudget:
    """The JSON values an answer in the service's layout may hold, spent piece by piece before each is parsed."""

    def __init__(self, body: bytes, most_users: int):
        self.body, self.most_users = body, most_users
        self.left = most_values(most_users)
        self.lock = threading.Lock()  # pieces are counted on both parsing threads
        self.refusal: AnswerError | None = None  # once past the bound: every piece not yet parsed is refused at once

    def check_open(self) -> None:
        """Refuse the answer if its values were found past the bound."""
        if self.refusal is not None:
            raise AnswerError(str(self.refusal))

    def spend(self, values: int) -> None:
        """Count `values` against what is left; refuse the answer once past the bound, as its whole count says."""
        with self.lock:
            self.left -= values
            if self.left < 0 and self.refusal is None:
                # The parts spent add up to the whole body's count, so the whole count refuses it too.
                try:
                    check_value_count(self.body, self.most_users)
                except AnswerError as exc:
                    self.refusal = exc
        self.check_open()


@dataclasses.dataclass(frozen=True)
class Parsed:
    """An answer as read: its users (a row per user, a column per field; None where it has no results), its info and its error."""

    users: pl.DataFrame | None
    info: dict
    error: str | None


def parse_body(body: bytes, schema: pl.Schema = RAW_RESPONSE, most_users: int = MAX_PAGE_SIZE) -> pl.DataFrame:
    """Parse one answer against a raw schema, as Python's json reads it: one row of its fields."""
    body = without_bom(body)
    check_value_count(body, most_users)
    return read_checked(body, functools.partial(parse_json, schema=schema), functools.partial(layout_faults, most_users=most_users))


def parse_answer(body: bytes, most_users: int = MAX_PAGE_SIZE) -> Parsed:
    """Parse one answer against the raw schema, as Python's json reads it: its users, info and error."""
    body = without_bom(body)
    in_layout = read_in_layout(body, most_users)
    if in_layout is not None:
        return in_layout
    check_value_count(body, most_users)  # off the layout, the values are counted before any is read
    return read_checked(body, read_whole, json_reading_faults)


def read_checked(body: bytes, read: Callable[[bytes], T], faults_of: Callable[[bytes], list[str]]) -> T:
    """What `read(body)` gives, refused where `faults_of(body)` finds Python's json would read the body otherwise."""
    reading = PARSERS.submit(read, body)  # Polars releases the GIL: the check runs beside it
    try:
        faults = faults_of(body)
    finally:
        futures.wait([reading])
    parsed = reading.result()  # Polars' refusal first: it says where the JSON breaks
    if faults:
        raise contract_failure(faults)
    return parsed


def read_whole(body: bytes) -> Parsed:
    """An answer parsed whole by Polars."""
    row = parse_json(body, RAW_RESPONSE)
    results = row.get_column("results")
    users = None if results.null_count() else results.explode(empty_as_null=False).struct.unnest()
    return Parsed(users, *row.select("info", "error").row(0))


def read_in_layout(body: bytes, most_users: int) -> Parsed | None:
    """An answer in the service's compact layout, parsed a piece at a time as each is proven in it; None off the layout."""
    # Polars builds a node per value as it parses: a whole page of 5,000 users took 70 MB at its peak,
    # a piece of 500 users a tenth of that, and the pieces of one page parse on both cores. Cut between
    # users, the pieces are the answer only in the service's layout: each is matched against it just
    # before it is parsed. The values are counted as for any layout, a piece at a time, so the bound
    # holds an answer to the same count whatever its layout.
    if not body.startswith(LAYOUT_HEAD) or (end := body.rfind(LAYOUT_TAIL)) < 0:
        return None
    text = text_pattern(body)
    if text is None or tail_layout(text).fullmatch(body, end) is None:
        return None
    budget, cuts = ValueBudget(body, most_users), list(user_pieces(body, end))
    head = cuts[0][0]  # a comma between two pieces is in neither
    budget.spend(1 + value_marks(body, 0, head) + len(cuts) - 1 + value_marks(body, end))
    reader = PieceReader(body, text, budget)
    pieces = [PARSERS.submit(reader.users, start, stop) for start, stop in cuts]
    try:
        envelope = reader.parsed(lambda: parse_json(b"{" + body[end + 2 :], ENVELOPE))
        read = [piece.result() for piece in pieces]
    finally:  # a piece not yet read never is, once the answer is refused
        for future in pieces:
            future.cancel()
        futures.wait(pieces)
    users = [part for part in read if part is not None]
    if envelope is None or len(users) < len(read):
        return None
    return Parsed(pl.concat(users), *envelope.row(0))


class PieceReader:
    """Reads the parts of one answer in the service's layout: each piece, on a parsing thread, matched against it, counted, then parsed."""

    def __init__(self, body: bytes, text: str, budget: ValueBudget):
        self.body, self.layout, self.budget = body, users_layout(text), budget
        self.off_layout = False  # once a piece is not in the layout, the rest are not read

    def users(self, start: int, stop: int) -> pl.DataFrame | None:
        """The users written in body[start:stop], parsed once proven in the layout and its values within the budget; None off it, or where Polars refuses it."""
        # The match and the count hold the GIL while the other thread's piece parses without it: on two
        # cores, each thread checks a piece while the other parses one, and neither waits on the asking thread.
        self.budget.check_open()
        if self.off_layout or self.layout.fullmatch(self.body, start, stop) is None:
            self.off_layout = True
            return None
        self.budget.spend(value_marks(self.body, start, stop))
        return self.parsed(lambda: parse_piece(self.body, start, stop))

    def parsed(self, read: Callable[[], T]) -> T | None:
        """What `read()` parses of a part of the answer; None, the answer then off the layout, where Polars refuses the part."""
        # Polars refuses some text the layout matches (a number written 01, a control character): the
        # answer is then read whole, so the refusal says where the answer breaks, not where the part does.
        try:
            return read()
        except AnswerError:
            self.off_layout = True
            return None


def user_pieces(body: bytes, end: int) -> Iterator[tuple[int, int]]:
    """Where each piece of users (about PIECE_BYTES) starts and stops, up to `end`, where the users end."""
    start = len(LAYOUT_HEAD) - len(USER_HEAD)
    while start < end:
        cut = body.find(USER_CUT, min(start + PIECE_BYTES, end), end)
        stop = end if cut < 0 else cut + 1
        yield start, stop
        start = stop + 1


def parse_piece(body: bytes, start: int, stop: int) -> pl.DataFrame:
    """The users written in body[start:stop], a row each, parsed by Polars (the caller has checked their layout)."""
    # Read as an array of users, not inside an answer: a list of structs to unpack costs a sixth more.
    return read_json(b"".join((b"[", memoryview(body)[start:stop], b"]")), USER_COLUMNS)


def parse_json(body: bytes, schema: pl.Schema) -> pl.DataFrame:
    """Polars' reading of a body, which must be one JSON object, against a schema, or an AnswerError saying what is wrong with it."""
    parsed = read_json(body, schema)
    if parsed.height != 1 or not body.lstrip().startswith(b"{"):
        raise AnswerError("the answer is not one JSON object")
    return parsed


def read_json(body: bytes, schema: pl.Schema) -> pl.DataFrame:
    """Polars' reading of JSON against a schema, or an AnswerError saying what is wrong with it."""
    try:
        return pl.read_json(body, schema=schema)
    except Exception as exc:  # polars reports malformed JSON as several error types
        head = body[:64].lstrip()[:1]
        if head == b"<":
            raise AnswerError("the answer is an HTML page, not JSON") from exc
        if SURROGATE_ESCAPE.search(body):  # Polars refuses some lone surrogates: name the field as json reads it
            faults = json_reading_faults(body)
            if faults:
                raise contract_failure(faults) from exc
        raise AnswerError(f"the answer is not JSON of the randomuser.me 1.4 shape ({json_fault(exc)})") from exc


def json_fault(exc: Exception) -> str:
    """What Polars found wrong with a body, without the offending value (it may be personal data)."""
    text = str(exc)
    wrong_type = re.search(r'deserializing value "(\w+)\(.*" as (\w+)', text)
    if wrong_type:
        return f"a JSON {wrong_type.group(1).lower()} where a {wrong_type.group(2)} belongs"
    position = re.search(r"at character \d+", text)
    return f"malformed JSON {position.group(0)}" if position else "malformed JSON"


# Possessive throughout, so the engine saves no backtracking state per value (benchmarks/README.md);
# none is needed: a text ends at its first unescaped quote, a number at its last digit.
PLAIN_TEXT = r'"[^"]*+"'  # a string with no escape: the common case, and the fastest to match
ESCAPED_TEXT = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'  # a string with escapes (the service writes a quote in a Mexican city as \")
WHOLE_NUMBER = r"-?[0-9]++"
# The kinds of value the service writes under a key where it writes other than text (tests/fixtures,
# the recorded answers): an answer writing anything else is off its layout, and read the exact way.
# By name: no name the layouts use twice is written as two kinds.
NOT_TEXT = {
    "number": ("number",),
    "age": ("number",),
    "results": ("number",),
    "page": ("number",),
    "postcode": ("text", "number"),
    "value": ("text", "null"),
}


def layout_pattern(layout: str, text: str = PLAIN_TEXT) -> str:
    """A regular expression for one object in a layout ("a,b{c,d}"): each key once, in order, each value of a kind the service writes there."""
    # Keys are matched as written, so no escape can hide one.
    kinds = {"text": text, "number": WHOLE_NUMBER, "null": "null"}

    def value(key: str) -> str:
        """The pattern of a value under `key`."""
        return "(?:" + "|".join(kinds[kind] for kind in NOT_TEXT.get(key, ("text",))) + ")"

    keys = re.sub(r"(\w+)(\{?)", lambda m: f'"{m[1]}":' + (r"\{" if m[2] else value(m[1])), layout.replace("}", r"\}"))
    return r"\{" + keys + r"\}"


@functools.cache
def service_layout(most_users: int, text: str = PLAIN_TEXT) -> re.Pattern:
    """The whole compact answer of the service holding at most `most_users` users, as one regular expression."""
    user, info = layout_pattern(USER_LAYOUT, text), layout_pattern(INFO_LAYOUT, text)
    # Possessive: a user matched is never given back, so the engine keeps no backtracking entry per
    # user (a greedy repeat kept one each: 26 MB for a full page). No user can end elsewhere anyway.
    return re.compile(rf'\{{"results":\[(?:{user}(?:,{user}){{0,{most_users - 1}}}+)?+\],"info":{info}\}}'.encode())


@functools.cache
def users_layout(text: str = PLAIN_TEXT) -> re.Pattern:
    """Users in the service's compact layout, one after another, as one regular expression (possessive, as above)."""
    user = layout_pattern(USER_LAYOUT, text)
    return re.compile(rf"{user}(?:,{user})*+".encode())


@functools.cache
def tail_layout(text: str = PLAIN_TEXT) -> re.Pattern:
    """What follows the users in the service's compact layout: its info, and the answer's end."""
    return re.compile(rf'\],"info":{layout_pattern(INFO_LAYOUT, text)}\}}'.encode())


def text_pattern(body: bytes) -> str | None:
    """The pattern of a text in this body: plain where it holds no backslash; None where it writes a surrogate as an escape."""
    if b"\\" not in body:
        return PLAIN_TEXT
    return None if SURROGATE_ESCAPE.search(body) else ESCAPED_TEXT  # Polars and json may read a surrogate differently


def in_service_layout(body: bytes, most_users: int = MAX_PAGE_SIZE) -> bool:
    """True for the service's compact layout with no surrogate escape: no key can repeat, and Polars reads it as json does."""
    text = text_pattern(body)
    if text is None:
        return False
    return service_layout(max(most_users, 1), text).fullmatch(body) is not None


def layout_faults(body: bytes, most_users: int) -> list[str]:
    """Where Python's json reads a body otherwise than Polars: nowhere in the service's layout, else as it finds."""
    return [] if in_service_layout(body, most_users) else json_reading_faults(body)  # the exact, slower reading only where they could differ


def dig(value, path: str):
    """A dotted field of what Python's json read, None where anything on the way is not an object."""
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def json_reading_faults(body: bytes) -> list[str]:
    """Where Python's json reads an answer otherwise than Polars: keys written twice, lone UTF-16 surrogates."""
    declared = set(re.findall(r"\w+", f"results,info,error,{USER_LAYOUT},{INFO_LAYOUT}"))
    twice = []  # per object holding a declared key more than once, those keys (a name is no personal data)

    def one_object(items: list) -> dict:
        """One JSON object as json reads it, noting the declared keys it holds twice."""
        read = dict(items)
        if len(read) < len(items):  # Polars keeps the first of a repeated key, Python's json the last
            counts = collections.Counter(key for key, _ in items)
            keys = {key for key, count in counts.items() if count > 1 and key in declared}
            if keys:
                twice.append(keys)
        return read

    try:  # read as text, so a second byte order mark is refused as json.loads(bytes) refuses it
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=one_object)
    except (ValueError, RecursionError):
        return ["a standard JSON reader refuses the answer"]
    faults = []
    if twice:
        names = ", ".join(sorted(set().union(*twice)))
        faults.append(f"{len(twice)} JSON object(s) hold a key twice ({names})")
    users = dig(doc, "results") if isinstance(dig(doc, "results"), list) else []
    for source in [*SOURCE_FIELDS.values(), "info.seed", "info.version"]:
        where = [dig(doc, source)] if source.startswith("info.") else [dig(user, source) for user in users]
        count = sum(1 for value in where if isinstance(value, str) and LONE_SURROGATE.search(value))
        if count:
            faults.append(f"{source} holds a lone UTF-16 surrogate in {count} records")
    return faults


def service_error(message: str) -> AnswerError:
    """The error for an answer that is the service's own error body."""
    return AnswerError(f"the service answered with an error: '{shorten(message, 200)}'")


def answer_info(body: bytes) -> dict:
    """An answer's info alone, from a parse of only info and error (half a full parse); an error body refused."""
    row = parse_body(body, ENVELOPE).row(0, named=True)
    if row["error"] is not None:
        raise service_error(row["error"])
    info = row["info"] or {}
    check_page_number(info)
    return info


def check_page_number(info: dict) -> None:
    """Refuse an info.page that is not a page number."""
    if info.get("page") is not None and not re.fullmatch(r"[1-9][0-9]{0,4}", info["page"]):
        raise AnswerError(f"the answer's info.page '{shorten(info['page'])}' is not a page number")


def check_envelope(parsed: Parsed, expect: PageRequest | None) -> dict:
    """The answer's info, after refusing an error body, missing results, or another page's answer."""
    if parsed.error is not None:
        raise service_error(parsed.error)
    if parsed.users is None:
        raise AnswerError("the answer has no results")
    info, got = parsed.info or {}, parsed.users.height
    check_page_number(info)
    if expect is not None:
        check_expected(info, got, expect)
    if info.get("results") not in (None, str(got)):
        raise AnswerError(f"the answer says info.results={shorten(info['results'])} but holds {got} users")
    return info


def check_expected(info: dict, got: int, expect: PageRequest) -> None:
    """Refuse an answer for another seed, another page, or another number of users than asked."""
    if expect.seed is not None and info.get("seed") != expect.seed:
        raise AnswerError(f"asked for seed {expect.seed!r}, the answer is for seed '{shorten(info.get('seed'))}'")
    if expect.results is not None and got != expect.results:
        raise AnswerError(f"asked for {expect.results} users, the answer holds {got}")
    if expect.page is not None and info.get("page") != str(expect.page):
        raise AnswerError(f"asked for page {expect.page}, the answer is for page {info.get('page')}")


def contract_failure(problems: list[str]) -> AnswerError:
    """The error for an answer that breaks the contract, every problem named."""
    return AnswerError(f"{len(problems)} contract check(s) failed: " + "; ".join(problems))
