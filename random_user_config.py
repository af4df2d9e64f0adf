"""Every setting of the Random User ETL: its default, its environment variable, its flag.

A flag beats the environment variable, which beats the default. `Settings` validates
itself, so a bad value is refused the same way whether it came from a flag, a
variable or Python code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# The service caps a page at 5000 users and only pages 1..10000 exist.
MAX_PAGE_SIZE = 5000
MAX_PAGES = 10_000

# The nationalities randomuser.me 1.4 serves.
NATIONALITIES = frozenset("au br ca ch de dk es fi fr gb ie in ir mx nl no nz rs tr ua us".split())

# A seed names a file, so it must be a plain file-name fragment: no separators, no
# dots to climb with, no control characters, bounded length.
LONGEST_SEED = 100
SEED_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{LONGEST_SEED - 1}}}")

# The generator reads a seed of exactly this length as a nationality code: it ignores --nat and
# answers another seed (two characters longer) that does not give the same users, or no answer at all.
NAT_CODE_SEED_LENGTH = 18

STAGING = ".staging"  # the folder of a run's staged pages, inside a local output folder

# Ranges of the numeric settings. A wait (timeout, rate-limit pause) is at most an hour: longer reads
# as a hung job, and past about 1e9 s the sockets' and sleeps' clocks overflow.
LONGEST_WAIT = 3600
# The shortest timeout or --max-wait: less would time out every try before it could start.
SHORTEST_WAIT = 0.01
# The longest --max-wait: a day. A wait on the service longer than that is an outage, not a pause.
LONGEST_MAX_WAIT = 86_400
# Each retry is a log line and a wait: 100 is far beyond what a transient fault needs.
MOST_RETRIES = 100
# A backoff wait is capped at 32 times the base (backoff_time): a base of 100 s keeps it under an hour.
MOST_BACKOFF = 100
# An answer is held whole while it is parsed: 1,000 MB is far past a real page of 5,000 users and
# already more than the CronJob's 1 GiB holds; past about 9e12 MB the byte count overflows C.
MOST_RESPONSE_MB = 1000
LEAST_RESPONSE_MB = 0.01  # 10 kB: a page of a few users; less would refuse every answer
MOST_CONCURRENCY = 64

# A path or URL is taken as typed: whitespace at either end (" /data" makes ./ /data) or a control
# character anywhere (a newline from a heredoc) would name a folder nobody meant.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# What an object-storage lake's address may hold: Polars lists a lake by the pattern
# <prefix>/random_users_*.parquet, reading [ ] * ? there as a pattern (with no way to escape them) and
# percent-encoding other characters (\ { } ^ % ` " < > ~ # | and all but ASCII) into another prefix.
LISTABLE_CHARACTER = re.compile(r"[A-Za-z0-9/!_.'()+,;=@&$: -]")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# The one word, in any case, that turns a folder setting off. A folder named like another word for
# off is refused, not made: a setting meant as off never silently starts keeping answers.
OFF = "off"
OFF_LOOKALIKES = frozenset({"none", "no", "false", "0"})

# Where batches may land: a local folder or S3. Any other scheme would send personal data to a host of
# its own (http://), fail only after the whole fetch (ftp://, gs://, memory://), or ask cloud metadata
# addresses for credentials.
S3 = "s3://"
# S3's rule for a bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, a letter or digit at
# each end, never two dots in a row, never an IP address.
BUCKET = re.compile(r"(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def shorten(text, limit: int = 60) -> str:
    """Any value as one short line fit for a terminal: every unprintable character escaped, at most `limit` characters, then '...'."""
    # Unprintable: C0 and C1 controls, DEL, line and paragraph separators, bidi and other format
    # characters, lone surrogates. Each is shown as Python writes it (\x1b, \n, \u202e), so a value can
    # neither forge a second line, nor move the cursor, colour the terminal or reorder the line.
    shown: list[str] = []
    size = 0
    for char in str(text):
        piece = char if char.isprintable() else repr(char)[1:-1]
        if size + len(piece) > limit:
            return "".join(shown) + "..."
        shown.append(piece)
        size += len(piece)
    return "".join(shown)


# The query parameters the job itself sends (client.page_params): their values hold no secret, and
# say which page a line is about. Any other parameter of --api-url may be a token.
SHOWN_PARAMETERS = frozenset({"results", "page", "inc", "seed", "nat"})


LINE_LIMIT = 1000  # the most characters of one line the job prints, its values escaped (shorten)


SHOWN_URL_LIMIT = 300  # an address in a line: the job's own query is about 150 characters


def shown_url(url, path_only: bool = False) -> str:
    """An address as a line may show it: no user or password, no fragment, no value of a parameter not the job's own, escaped and bounded."""
    text = str(url)
    scheme, slashes, rest = text.partition("://")
    if not slashes:
        scheme, rest = "", text
    userinfo, at, after = rest.rpartition("@")  # a user and password end at the last "@", whatever the password holds
    if at and re.search(r"[?#]", userinfo):
        # That "@" is in a query or fragment, or a "?" or "#" is in a password: either way what
        # follows it may be the rest of a secret, and what comes before it certainly may.
        return shorten(f"{scheme}{slashes}***" if not path_only else "/***", SHOWN_URL_LIMIT)
    if at:
        rest = after
    parts = re.fullmatch(r"([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?", rest, re.S) if slashes else re.fullmatch(r"()([^?#]*)(\?[^#]*)?(#.*)?", rest, re.S)
    assert parts is not None  # every group but the path is optional and the path takes any text: both patterns match anything
    authority, path, query, fragment = parts.groups(default="")
    shown = shown_path(path) + (shown_query(query[1:]) if query else "") + ("#***" if fragment else "")
    if not path_only:
        shown = (f"{scheme}{slashes}" + ("***@" if at else "") + authority if slashes else ("***@" if at else "")) + shown
    elif slashes and not shown.startswith("/"):
        shown = "/" + shown
    return shorten(shown, SHOWN_URL_LIMIT)


ADDRESS_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")  # an address inside a library's words, to the next space


def shown_urls_in(text) -> str:
    """Text with every address in it as shown_url shows it: a library's words name the address it was given, password and all."""
    return ADDRESS_IN_TEXT.sub(lambda address: shown_url(address[0]), str(text))


# A shorter piece of an address is not hidden in other text: a user name "user" would make every
# "120 users" of a line "120 ***s". A key or password worth hiding is longer.
SHORTEST_SECRET = 8


def address_secrets(url: str) -> tuple[str, ...]:
    """What shown_url hides of a (valid) address, as typed and percent-decoded, longest first: text no line may hold."""
    # For text that repeats them outside an address: a service's error message echoes the key it was given.
    parts = urlsplit(url)
    params = [pair.partition("=") for pair in parts.query.split("&")] if parts.query else []
    pieces = [parts.username, parts.password, parts.fragment]
    pieces += [value if eq else name for name, eq, value in params if name not in SHOWN_PARAMETERS]
    pieces += [value or name for name, _, value in re.findall(r";([^;/=]*)(=?)([^;/]*)", parts.path)]
    found = {form for piece in pieces if piece for form in (piece, unquote(piece)) if len(form) >= SHORTEST_SECRET}
    return tuple(sorted(found, key=len, reverse=True))


def without_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """Text with each of `secrets` (address_secrets) shown as ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def shown_path(path: str) -> str:
    """A path with the value of each ;parameter hidden (a session id rides there): a bare one is hidden whole."""
    return re.sub(r";([^;/=]*)(=?)[^;/]*", lambda m: ";" + (m[1] + "=***" if m[2] else "***"), path)


def shown_query(query: str) -> str:
    """'?' and a query with the value of each parameter not the job's own hidden; a bare name (?abcd1234) may be the token itself."""
    pairs = [pair.partition("=") for pair in query.split("&")]
    return "?" + "&".join(name + eq + value if name in SHOWN_PARAMETERS else name + "=***" if eq else "***" for name, eq, value in pairs)


class SettingsError(ValueError):
    """A setting with a value the job cannot use (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its flag, variable, how its text is read and how argparse takes its flag; its default is Settings'."""

    name: str
    flag: str
    env: str
    help: str  # what it does; help_text() adds the default, read from Settings
    parse: Callable[[str], Any]  # str -> value; raises ValueError with a short reason
    flag_options: dict  # argparse's keywords for the flag: the metavar of its value, or a switch's action
    unset: str = ""  # what a default of no value (None, an empty list) means, in words
    instead_of_empty: str = ""  # what to write, beyond leaving the setting out, where an empty value was given


def takes(metavar: str) -> dict:
    """A flag followed by its value, shown in --help as `metavar`."""
    return {"metavar": metavar}


# A flag alone means true; the text "true" is read by the setting's parse, as its variable's would be.
SWITCH = {"action": "store_const", "const": "true"}


def parse_int(text: str) -> int:
    """A whole number written in decimal."""
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # ASCII digits: int() would also read "١" or "1_000"
        raise ValueError("must be a whole number")
    try:
        return int(text)
    except ValueError as exc:  # past Python's 4,300-digit limit for reading an int
        raise ValueError("is too large a number") from exc


DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def parse_float(text: str) -> float:
    """A finite decimal number."""
    if not DECIMAL.fullmatch(text):  # float() would also read "١", "1_000", "nan" or "infinity"
        raise ValueError("must be a number")
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return value


def parse_optional_path(text: str) -> str | None:
    """A folder, or 'off' (any case) for none."""
    if text.lower() == OFF:
        return None
    if text.lower() in OFF_LOOKALIKES:
        raise ValueError(f"is not a word for off: only {OFF!r} keeps no raw answers (write ./{text} for a folder of that name)")
    return text


def parse_bool(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("must be true or false")


def parse_nat(text: str) -> tuple[str, ...]:
    """A comma list of nationality codes, kept in the order given; empty for all."""
    if not text.strip():
        return ()
    codes = tuple(code.strip().lower() for code in text.split(","))
    if not all(codes):  # "us,,gb" or "us,": a code lost in editing, not a request for all
        raise ValueError("has an empty item")
    return codes


SETTINGS = (
    Setting("n", "--n", "RANDOM_USER_N", "how many users to fetch", parse_int, takes("N")),
    Setting(
        "seed",
        "--seed",
        "RANDOM_USER_SEED",
        "API seed; same seed, same users. {date} becomes the run's UTC date (YYYYMMDD)",
        str,
        takes("SEED"),
        unset="the service picks one",
    ),
    Setting("nat", "--nat", "RANDOM_USER_NAT", "nationalities, a comma list such as us,gb", parse_nat, takes("CODES"), unset="all"),
    Setting("api_url", "--api-url", "RANDOM_USER_API_URL", "API address", str, takes("URL")),
    Setting("output_dir", "--output-dir", "RANDOM_USER_OUTPUT_DIR", "where batches land: a folder or s3://bucket/prefix", str, takes("DIR")),
    Setting(
        "raw_dir",
        "--raw-dir",
        "RANDOM_USER_RAW_DIR",
        "where raw answers are kept, gzip-compressed; 'off' keeps none",
        parse_optional_path,
        takes("DIR"),
        instead_of_empty=f"{OFF!r} to keep no raw answers",
    ),
    Setting(
        "timeout",
        "--timeout",
        "RANDOM_USER_TIMEOUT",
        "seconds for one whole answer, from connect to its last byte, and for each request to object storage",
        parse_float,
        takes("S"),
    ),
    Setting("retries", "--retries", "RANDOM_USER_RETRIES", "retries per request on transient faults, the service's or object storage's", parse_int, takes("K")),
    Setting("backoff", "--backoff", "RANDOM_USER_BACKOFF", "base of the exponential backoff between retries, seconds", parse_float, takes("S")),
    Setting(
        "rate_limit_wait",
        "--rate-limit-wait",
        "RANDOM_USER_RATE_LIMIT_WAIT",
        "while the service's rate limit (HTTP 429 without Retry-After) holds, seconds between requests asking "
        "whether it has lifted, one at a time; waiting on it draws nothing on --retries",
        parse_float,
        takes("S"),
    ),
    Setting(
        "max_wait",
        "--max-wait",
        "RANDOM_USER_MAX_WAIT",
        "the longest the run waits on the service at one stretch, seconds: no backoff or rate-limit pause is longer, and a Retry-After beyond it ends the run",
        parse_float,
        takes("S"),
    ),
    Setting("concurrency", "--concurrency", "RANDOM_USER_CONCURRENCY", "pages fetched at once", parse_int, takes("K")),
    Setting(
        "page_size",
        "--page-size",
        "RANDOM_USER_PAGE_SIZE",
        f"users per request, at most {MAX_PAGE_SIZE}; the users of a seed depend on it, so keep it fixed",
        parse_int,
        takes("K"),
    ),
    Setting(
        "max_response_mb",
        "--max-response-mb",
        "RANDOM_USER_MAX_RESPONSE_MB",
        "largest answer accepted, in MB; a larger one fails the run",
        parse_float,
        takes("MB"),
    ),
    Setting("allow_http", "--allow-http", "RANDOM_USER_ALLOW_HTTP", "allow plain http:// to a host other than loopback", parse_bool, SWITCH),
)


def default_output_dir() -> str:
    """processed_data in the working folder, as an absolute path."""
    return str(Path.cwd() / "processed_data")


def default_raw_dir() -> str:
    """raw_data in the working folder, as an absolute path."""
    return str(Path.cwd() / "raw_data")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated settings of one run."""

    n: int = 100
    seed: str | None = None
    nat: tuple[str, ...] = ()
    api_url: str = "https://randomuser.me/api/1.4/"
    output_dir: str = dataclasses.field(default_factory=default_output_dir)
    raw_dir: str | None = dataclasses.field(default_factory=default_raw_dir)
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 1.0
    rate_limit_wait: float = 10.0  # a refused request costs the service nothing: resume about 5 s after a reset
    max_wait: float = 900.0
    concurrency: int = 4
    page_size: int = MAX_PAGE_SIZE
    max_response_mb: float = 64.0
    allow_http: bool = False

    def __post_init__(self):
        """Refuse any value the job cannot use, with a reason that names the setting; spell 'off' and s3:// one way."""
        check = _checker()
        check("raw_dir", self.raw_dir != "", f"must not be empty; use None or {OFF!r} to keep no raw answers")
        if isinstance(self.raw_dir, str) and self.raw_dir.lower() == OFF:
            object.__setattr__(self, "raw_dir", None)
        if isinstance(self.output_dir, str):
            object.__setattr__(self, "output_dir", lake_address(self.output_dir))
        check("n", self.n >= 1, "must be at least 1")
        check("page_size", 1 <= self.page_size <= MAX_PAGE_SIZE, f"must be between 1 and {MAX_PAGE_SIZE}")
        most = self.page_size * MAX_PAGES
        check("n", self.n <= most, f"must be at most {most:,} ({MAX_PAGES:,} pages of {self.page_size})")
        if self.seed is not None:
            check("seed", SEED_PATTERN.fullmatch(self.seed) is not None, seed_rule())
            check("seed", len(self.seed) != NAT_CODE_SEED_LENGTH, nat_code_seed(self.seed))
        unknown = [code for code in self.nat if code not in NATIONALITIES]
        check("nat", not unknown, f"unknown nationality '{shorten(','.join(unknown))}'; known: {','.join(sorted(NATIONALITIES))}")
        check("timeout", SHORTEST_WAIT <= self.timeout <= LONGEST_WAIT, f"must be between {SHORTEST_WAIT} and {LONGEST_WAIT}")
        check("retries", 0 <= self.retries <= MOST_RETRIES, f"must be between 0 and {MOST_RETRIES}")
        check("backoff", 0 <= self.backoff <= MOST_BACKOFF, f"must be between 0 and {MOST_BACKOFF}")
        # At least a moment: 0 would re-ask the service in a tight loop for as long as its limit holds.
        check("rate_limit_wait", SHORTEST_WAIT <= self.rate_limit_wait <= LONGEST_WAIT, f"must be between {SHORTEST_WAIT} and {LONGEST_WAIT}")
        check("max_wait", SHORTEST_WAIT <= self.max_wait <= LONGEST_MAX_WAIT, f"must be between {SHORTEST_WAIT} and {LONGEST_MAX_WAIT}")
        check("concurrency", 1 <= self.concurrency <= MOST_CONCURRENCY, f"must be between 1 and {MOST_CONCURRENCY}")
        check("max_response_mb", LEAST_RESPONSE_MB <= self.max_response_mb <= MOST_RESPONSE_MB, f"must be between {LEAST_RESPONSE_MB} and {MOST_RESPONSE_MB}")
        check("output_dir", bool(self.output_dir), "must not be empty")
        check_path_text(describe("api_url"), self.api_url, shown_url)
        for name in ("output_dir", "raw_dir"):
            check_path_text(describe(name), getattr(self, name))
        check_folder_addresses(self.output_dir, self.raw_dir)
        check_folders_apart(self.output_dir, self.raw_dir)
        check_api_url(self.api_url, self.allow_http)

    @property
    def max_response_bytes(self) -> int:
        """The answer size bound in bytes."""
        return int(self.max_response_mb * 1_000_000)


def help_text(setting: Setting, defaults: Settings) -> str:
    """A flag's --help: what it does, its default as `defaults` has it, its variable."""
    value = getattr(defaults, setting.name)
    if value is None or value == ():
        default = f"default: {setting.unset}"
    elif isinstance(value, bool):
        default = f"default {str(value).lower()}"
    else:
        default = f"default {value:g}" if isinstance(value, float) else f"default {value}"
    return f"{setting.help} ({default}) [{setting.env}]"


def _checker():
    """A check(name, ok, reason) that raises SettingsError naming the setting."""

    def check(name, ok, reason):
        """Raise SettingsError naming the setting unless ok."""
        if not ok:
            raise SettingsError(f"{describe(name)} {reason}")

    return check


def describe(name: str) -> str:
    """How a setting is named in errors: its flag and its variable."""
    setting = next(s for s in SETTINGS if s.name == name)
    return f"{setting.flag} ({setting.env})"


def check_path_text(label: str, text: str | None, show=shorten) -> None:
    """Refuse a path or URL with whitespace at either end, or a control or invisible character anywhere; `show` puts it in the line."""
    if text is None:
        return
    if text != text.strip():
        raise SettingsError(f"{label} has whitespace at its start or end, got '{show(text)}'")
    if CONTROL_CHARACTER.search(text):
        raise SettingsError(f"{label} holds a control character, got '{show(text)}'")
    # A BOM an editor left, a zero-width space, a bidi mark: "\ufeffoff" looks like off and names a folder.
    if not all(char.isprintable() for char in text):
        raise SettingsError(f"{label} holds an invisible character, got '{show(text)}'")


def seed_rule() -> str:
    """The seed rule, in words."""
    return "must be 1 to 100 letters, digits, '-' or '_', starting with a letter or digit"


def nat_code_seed(seed: str) -> str:
    """Why a seed of 18 characters is refused, and what to do instead."""
    return (
        f"is {NAT_CODE_SEED_LENGTH} characters, got {seed!r} ({{date}} counts as its 8 digits): the service reads such a seed "
        "as a nationality code, ignores --nat and answers other users or none; use a longer or shorter seed"
    )


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(url: str, allow_http: bool) -> None:
    """Refuse an API address that is not http(s), plain http to a remote host unless allowed, or one no request can be sent to."""
    scheme: str | None
    try:
        parts = urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port  # an odd "[::1" or port raises here, not in a request
    except ValueError:
        scheme = host = None
    if scheme not in ("https", "http") or not host:
        raise SettingsError(f"{describe('api_url')} must be an https:// address, got '{shown_url(url)}'")
    if scheme == "http" and not allow_http and not is_loopback(host):
        raise SettingsError(f"{describe('api_url')} is plain http:// to {shorten(host)}; use https, or allow it with {describe('allow_http')}")
    if not sendable(url, host):
        raise SettingsError(f"{describe('api_url')} has a host name no request can be sent to, got '{shown_url(url)}'")


def sendable(url: str, host: str) -> bool:
    """True when requests can prepare a request to the address and the socket layer can encode its host name."""
    # Else the run would fail at its first request: requests' own parse (IDNA 2008: "\u2764.example",
    # ".example") raises text that holds the whole address, and the socket layer's ("a..b", a label
    # past 63 characters) is a transport fault retried --retries times.
    import requests  # here, not at the top: the settings alone are read without the job's dependencies

    try:
        requests.Request("GET", url).prepare()
        host.encode("idna")
    except (requests.RequestException, UnicodeError, ValueError):
        return False
    return True


def is_remote(location: str) -> bool:
    """True for an object-storage address such as s3://bucket/prefix: a URL scheme, then ://."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def lake_address(location: str) -> str:
    """An s3:// lake spelled one way: the scheme in lower case (Polars reads S3:// as a local path), no trailing '/'; any other location as given."""
    # "lake", "lake/" and "lake//" are one prefix: one staging folder and seed lock, so a run resumes under any of them.
    if location[: len(S3)].lower() != S3:
        return location
    address = S3 + location[len(S3) :].rstrip("/")
    return address if address != S3 else location  # nothing but slashes: refused as naming no bucket


# The longest name of a batch in a lake: random_users_<seed>.parquet, with the longest seed.
LONGEST_BATCH_NAME = len("random_users_.parquet") + LONGEST_SEED


# S3 takes a key of at most this many bytes (UTF-8).
LONGEST_KEY = 1024


def check_folder_addresses(output_dir: str, raw_dir: str | None) -> None:
    """Refuse an output address other than a plain path or s3://bucket/prefix, and any URL as the raw folder."""
    # A file:// address would pass for object storage: staged in the temp folder, and compared with
    # the raw folder as a URL, never as the folder it names.
    if is_remote(output_dir):
        check_s3_address(output_dir)
    if raw_dir is not None and is_remote(raw_dir):
        scheme = urlsplit(raw_dir).scheme
        raise SettingsError(f"{describe('raw_dir')} is a local folder, not a {scheme}:// address, got '{shorten(raw_dir)}'; use a plain path")


def check_listable(label: str, location: str) -> None:
    """Refuse an object-storage address that Polars would not list as written (LISTABLE_CHARACTER)."""
    odd = sorted({char for char in location.split("://", 1)[1] if not LISTABLE_CHARACTER.fullmatch(char)})
    if odd:
        raise SettingsError(
            f"{label} '{shorten(location)}' holds '{shorten(' '.join(odd))}': Polars reads such characters as a pattern, or changes them, "
            "when it lists the prefix, so its batches cannot be read back; use letters, digits, space and / ! - _ . ' ( ) + , ; = @ & $ :"
        )


def check_s3_address(address: str) -> None:
    """Refuse any scheme but s3://, a bucket name S3 would refuse, and a prefix with an empty, '.' or '..' part, a character Polars lists otherwise, or too long for S3's keys."""
    scheme, _, rest = address.partition("://")
    label, got = describe("output_dir"), f"got '{shorten(shown_url(address))}'"  # a user or password in it is never echoed
    if scheme.lower() != S3[:-3]:
        raise SettingsError(f"{label} is a {shorten(scheme, 20)}:// address, {got}; use a plain path for a local folder, or s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if not BUCKET.fullmatch(bucket):
        raise SettingsError(
            f"{label} names no valid bucket, {got}: a bucket is 3 to 63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit"
        )
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise SettingsError(f"{label} has a prefix with an empty, '.' or '..' part, {got}")
    check_listable(label, address)
    size, most = len(prefix.rstrip("/").encode()), LONGEST_KEY - LONGEST_BATCH_NAME - 1
    if size > most:
        raise SettingsError(
            f"{label} has a prefix of {size} bytes: with a batch's name (up to {LONGEST_BATCH_NAME} bytes) its keys could pass "
            f"S3's limit of {LONGEST_KEY} bytes, and the upload fail after every page was fetched; use at most {most}"
        )


def staging_root(output_dir: str) -> Path:
    """The local folder for a run's part files: inside the output folder, or in this user's private temp folder."""
    if is_remote(output_dir):
        # Per user, and made 0700 by the run (or refused): a shared, predictable temp path could
        # be pre-created by another local user as a link to a folder of theirs or of ours.
        digest = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"random_user_etl-{user_tag()}" / digest
    return Path(output_dir) / STAGING


def user_tag() -> str:
    """This user in a folder name: the uid, or where there is none (Windows) the login name, as one plain name."""
    if hasattr(os, "getuid"):
        return str(os.getuid())
    try:
        name = getpass.getuser()
    except Exception:  # no login variable set, and no pwd module: ImportError, OSError or KeyError by version
        return "user"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)  # one plain name: a slash, a backslash or ".." must not leave the temp folder


def lies_in(path, folder) -> bool:
    """True when `path` is `folder` or lies inside it, both resolved: a relative path, "..", or a link hides nothing."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def check_folders_apart(output_dir: str, raw_dir: str | None) -> None:
    """Refuse a raw folder that is, lies inside, or holds the output folder (or object storage's private staging)."""
    if raw_dir is None:
        return
    # Staged pages are swept and batches are read by folder: a raw folder among them would be
    # swept or read as a batch.
    local = staging_root(output_dir).parent if is_remote(output_dir) else Path(output_dir)
    if lies_in(raw_dir, local) or lies_in(local, raw_dir):
        where = f" the staging folder {shorten(local, 120)} of" if is_remote(output_dir) else ""
        raise SettingsError(
            f"{describe('raw_dir')} '{shorten(raw_dir, 120)}' overlaps{where} {describe('output_dir')} "
            f"'{shorten(output_dir, 120)}': keep them apart, neither inside the other"
        )


def expand_seed(seed: str | None, today: dt.date) -> str | None:
    """Put the run's UTC date into a seed template such as 'daily-{date}'."""
    if seed is None or "{date}" not in seed:
        return seed
    return seed.replace("{date}", today.strftime("%Y%m%d"))


def setting_text(setting: Setting, flags: dict, environ) -> tuple[str | None, str]:
    """A setting's text (None if not given) and where it came from, its flag before its variable; refused when empty or blank."""
    text, source = flags.get(setting.name), setting.flag
    if text is None:
        text, source = environ.get(setting.env), setting.env
    if text is not None and not text.strip():
        raise SettingsError(empty_value(setting, source))
    return text, source


def environ_value(name: str) -> str | None:
    """A setting's environment variable as set, or None when unset; refused when set but empty or blank."""
    return setting_text(next(s for s in SETTINGS if s.name == name), {}, os.environ)[0]


def load_settings(flags: dict | None = None, environ=None, today: dt.date | None = None) -> Settings:
    """Settings from flag texts, then environment variables, then defaults."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        text, source = setting_text(setting, flags, environ)
        if source == setting.flag:
            source = describe(setting.name)  # a flag's bad value names its variable too
        if text is None:
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as exc:
            raise SettingsError(f"{source} {exc}, got '{shorten(text)}'") from exc
    today = today or dt.datetime.now(dt.UTC).date()
    if "seed" in values:
        values["seed"] = expand_seed(values["seed"], today)
    return Settings(**values)


def empty_value(setting: Setting, source: str) -> str:
    """Why an empty (or blank) flag or variable is refused: it never stands for the default or for off."""
    said, how = ("is empty", "leave it out") if source == setting.flag else ("is set but empty", "unset it")
    instead = f", or {setting.instead_of_empty}" if setting.instead_of_empty else ""
    return f"{source} {said}; {how} for the default{instead}"
