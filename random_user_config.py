"""Every setting of the Random User ETL, each declared once on its field of `Settings`.

A field's declaration (a `Setting`) gives its help, how its text is read, how its flag is taken,
its one spelling and its own checks; its type and default are the field's, and its flag
(--name) and variable (RANDOM_USER_NAME) come from its name. The checks that involve several
settings are named functions run after those of each setting (ACROSS). A flag beats the
environment variable, which beats the default. `Settings` validates itself, so a bad value is
refused the same way whether it came from a flag, a variable or Python code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _random_user_etl.places import is_remote, lies_in, staging_root
from _random_user_etl.shown import shorten, shown_url

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
# k past a batch's size would suppress every row: 1,000 is already far past a useful k.
MOST_K = 1000

# How batches land: one parquet file per seed, or one Delta table of every seed.
FILES, DELTA = "files", "delta"
TABLE_FORMATS = (FILES, DELTA)
# A compaction keeps a week of the table's versions readable (time travel, and readers mid-query).
DEFAULT_RETAIN_HOURS = 168
MOST_RETAIN_HOURS = 24 * 366 * 10

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


class SettingsError(ValueError):
    """A setting with a value the job cannot use (exit status 2)."""


# A check of one setting's own value: check(label, value) raises SettingsError, its line starting with `label`.
Check = Callable[[str, Any], None]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as its field of Settings declares it: what it does, how its text is read and its flag taken, its spelling and checks."""

    help: str  # what it does; help_text() adds the default, read from Settings
    parse: Callable[[str], Any]  # str -> value; raises ValueError with a short reason
    flag_options: dict  # argparse's keywords for the flag: the metavar of its value, or a switch's action
    checks: tuple[Check, ...] = ()  # run in order on a value other than None, once tidied
    tidy: Callable[[Any], Any] | None = None  # the one spelling of a value, before its checks
    unset: str = ""  # what a default of no value (None, an empty list) means, in words
    instead_of_empty: str = ""  # what to write, beyond leaving the setting out, where an empty value was given
    name: str = ""  # its field's name: SETTINGS fills it in from Settings

    @property
    def flag(self) -> str:
        """Its flag: -- and its name, '-' for '_'."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """Its environment variable: RANDOM_USER_ and its name in capitals."""
        return "RANDOM_USER_" + self.name.upper()


DECLARATION = "setting"  # the key of a Settings field's metadata that holds its Setting


def declare(setting: Setting, default: Any = None, factory: Callable[[], Any] | None = None) -> Any:
    """A field of Settings: its default (or what makes it) and its setting."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={DECLARATION: setting})
    return dataclasses.field(default=default, metadata={DECLARATION: setting})


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


def parse_table_format(text: str) -> str:
    """files or delta, in any case."""
    word = text.strip().lower()
    if word not in TABLE_FORMATS:
        raise ValueError(f"must be {' or '.join(TABLE_FORMATS)}")
    return word


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


def default_output_dir() -> str:
    """processed_data in the working folder, as an absolute path."""
    return str(Path.cwd() / "processed_data")


def default_raw_dir() -> str:
    """raw_data in the working folder, as an absolute path."""
    return str(Path.cwd() / "raw_data")


def between(low: float, high: float) -> Check:
    """A check refusing a number outside low..high."""

    def check(label: str, value: float) -> None:
        """Refuse a value outside the range, naming the setting."""
        if not low <= value <= high:
            raise SettingsError(f"{label} must be between {low} and {high}")

    return check


def at_least(low: int) -> Check:
    """A check refusing a number below low."""

    def check(label: str, value: int) -> None:
        """Refuse a value below the least, naming the setting."""
        if value < low:
            raise SettingsError(f"{label} must be at least {low}")

    return check


def one_of(words: tuple[str, ...]) -> Check:
    """A check refusing any value but one of `words`."""

    def check(label: str, value: str) -> None:
        """Refuse a value not among the words, naming the setting."""
        if value not in words:
            raise SettingsError(f"{label} must be {' or '.join(words)}, got '{shorten(str(value))}'")

    return check


def filled(advice: str = "") -> Check:
    """A check refusing an empty text, saying what to write instead."""

    def check(label: str, text: str) -> None:
        """Refuse an empty text, naming the setting."""
        if text == "":
            raise SettingsError(f"{label} must not be empty" + (f"; {advice}" if advice else ""))

    return check


def off_as_none(folder: Any) -> Any:
    """A folder setting's 'off' (any case) as None, any other value as given."""
    return None if isinstance(folder, str) and folder.lower() == OFF else folder


def one_lake_spelling(location: Any) -> Any:
    """An output location as lake_address spells it; any other value as given."""
    return lake_address(location) if isinstance(location, str) else location


def ranged(help: str, parse: Callable[[str], float], metavar: str, low: float, high: float) -> Setting:
    """A number setting that takes low..high, its value after the flag shown as `metavar`."""
    return Setting(help, parse, takes(metavar), checks=(between(low, high),))


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


def describe(name: str) -> str:
    """How a setting is named in errors: its flag and its variable."""
    setting = BY_NAME[name]
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


def check_api_address(label: str, url: str) -> None:
    """Refuse an API address that is not http(s), or one no request can be sent to."""
    scheme: str | None
    try:
        parts = urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port  # an odd "[::1" or port raises here, not in a request
    except ValueError:
        scheme = host = None
    if scheme not in ("https", "http") or not host:
        raise SettingsError(f"{label} must be an https:// address, got '{shown_url(url)}'")
    if not sendable(url, host):
        raise SettingsError(f"{label} has a host name no request can be sent to, got '{shown_url(url)}'")


def check_url_text(label: str, url: str) -> None:
    """Refuse an address with whitespace at either end or an unprintable character, shown without its secrets."""
    check_path_text(label, url, shown_url)


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


def check_output_address(label: str, output_dir: str) -> None:
    """Refuse an output address other than a plain path or s3://bucket/prefix."""
    # A file:// address would pass for object storage: staged in the temp folder, and compared with
    # the raw folder as a URL, never as the folder it names.
    if is_remote(output_dir):
        check_s3_address(output_dir, label)


def check_raw_address(label: str, raw_dir: str) -> None:
    """Refuse any URL as the raw folder: it is a local folder."""
    if is_remote(raw_dir):
        raise SettingsError(f"{label} is a local folder, not a {urlsplit(raw_dir).scheme}:// address, got '{shorten(raw_dir)}'; use a plain path")


def check_seed(label: str, seed: str) -> None:
    """Refuse a seed that is no plain file-name fragment, or of the length the service reads as a nationality code."""
    if SEED_PATTERN.fullmatch(seed) is None:
        raise SettingsError(f"{label} {seed_rule()}")
    if len(seed) == NAT_CODE_SEED_LENGTH:
        raise SettingsError(f"{label} {nat_code_seed(seed)}")


def check_nat(label: str, codes: tuple[str, ...]) -> None:
    """Refuse a nationality the service does not serve."""
    unknown = [code for code in codes if code not in NATIONALITIES]
    if unknown:
        raise SettingsError(f"{label} unknown nationality '{shorten(','.join(unknown))}'; known: {','.join(sorted(NATIONALITIES))}")


def check_listable(label: str, location: str) -> None:
    """Refuse an object-storage address that Polars would not list as written (LISTABLE_CHARACTER)."""
    odd = sorted({char for char in location.split("://", 1)[1] if not LISTABLE_CHARACTER.fullmatch(char)})
    if odd:
        raise SettingsError(
            f"{label} '{shorten(location)}' holds '{shorten(' '.join(odd))}': Polars reads such characters as a pattern, or changes them, "
            "when it lists the prefix, so its batches cannot be read back; use letters, digits, space and / ! - _ . ' ( ) + , ; = @ & $ :"
        )


def check_s3_address(address: str, label: str = "") -> None:
    """Refuse any scheme but s3://, a bucket name S3 would refuse, and a prefix with an empty, '.' or '..' part, a character Polars lists otherwise, or too long for S3's keys."""
    scheme, _, rest = address.partition("://")
    label, got = label or describe("output_dir"), f"got '{shorten(shown_url(address))}'"  # a user or password in it is never echoed
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


# ---------------------------------------------------------------- the checks across settings, run after each setting's own


def check_pages_hold_n(settings: Settings) -> None:
    """Refuse more users than the service's pages of the page size hold."""
    most = settings.page_size * MAX_PAGES
    if settings.n > most:
        raise SettingsError(f"{describe('n')} must be at most {most:,} ({MAX_PAGES:,} pages of {settings.page_size})")


def check_folders_apart(settings: Settings) -> None:
    """Refuse a raw folder that is, lies inside, or holds the output folder (or object storage's private staging)."""
    output_dir, raw_dir = settings.output_dir, settings.raw_dir
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


def check_plain_http_allowed(settings: Settings) -> None:
    """Refuse plain http:// to a host other than loopback unless --allow-http allows it."""
    parts = urlsplit(settings.api_url)
    host = parts.hostname or ""
    if parts.scheme == "http" and not settings.allow_http and not is_loopback(host):
        raise SettingsError(f"{describe('api_url')} is plain http:// to {shorten(host)}; use https, or allow it with {describe('allow_http')}")


ACROSS = (check_pages_hold_n, check_folders_apart, check_plain_http_allowed)


# ---------------------------------------------------------------- the settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated settings of one run; each field declares its setting (declare, Setting)."""

    n: int = declare(Setting("how many users to fetch", parse_int, takes("N"), checks=(at_least(1),)), 100)
    seed: str | None = declare(
        Setting(
            "API seed; same seed, same users. {date} becomes the run's UTC date (YYYYMMDD)",
            str,
            takes("SEED"),
            checks=(check_seed,),
            unset="the service picks one",
        )
    )
    nat: tuple[str, ...] = declare(Setting("nationalities, a comma list such as us,gb", parse_nat, takes("CODES"), checks=(check_nat,), unset="all"), ())
    api_url: str = declare(Setting("API address", str, takes("URL"), checks=(check_url_text, check_api_address)), "https://randomuser.me/api/1.4/")
    output_dir: str = declare(
        Setting(
            "where batches land: a folder or s3://bucket/prefix",
            str,
            takes("DIR"),
            checks=(filled(), check_path_text, check_output_address),
            tidy=one_lake_spelling,
        ),
        factory=default_output_dir,
    )
    raw_dir: str | None = declare(
        Setting(
            "where raw answers are kept, gzip-compressed; 'off' keeps none",
            parse_optional_path,
            takes("DIR"),
            checks=(filled(f"use None or {OFF!r} to keep no raw answers"), check_path_text, check_raw_address),
            tidy=off_as_none,
            instead_of_empty=f"{OFF!r} to keep no raw answers",
        ),
        factory=default_raw_dir,
    )
    timeout: float = declare(
        ranged(
            "seconds for one whole answer, from connect to its last byte, and for each request to object storage",
            parse_float,
            "S",
            SHORTEST_WAIT,
            LONGEST_WAIT,
        ),
        30.0,
    )
    retries: int = declare(
        ranged("retries per request on transient faults, the service's or object storage's", parse_int, "K", 0, MOST_RETRIES),
        5,
    )
    backoff: float = declare(
        ranged("base of the exponential backoff between retries, seconds", parse_float, "S", 0, MOST_BACKOFF),
        1.0,
    )
    # At least a moment: 0 would re-ask the service in a tight loop for as long as its limit holds.
    # The default: a refused request costs the service nothing, so resume about 5 s after a reset.
    rate_limit_wait: float = declare(
        ranged(
            "while the service's rate limit (HTTP 429 without Retry-After) holds, seconds between requests asking "
            "whether it has lifted, one at a time; waiting on it draws nothing on --retries",
            parse_float,
            "S",
            SHORTEST_WAIT,
            LONGEST_WAIT,
        ),
        10.0,
    )
    max_wait: float = declare(
        ranged(
            "the longest the run waits on the service at one stretch, seconds: no backoff or rate-limit pause is longer, "
            "and a Retry-After beyond it ends the run",
            parse_float,
            "S",
            SHORTEST_WAIT,
            LONGEST_MAX_WAIT,
        ),
        900.0,
    )
    concurrency: int = declare(ranged("pages fetched at once", parse_int, "K", 1, MOST_CONCURRENCY), 4)
    page_size: int = declare(
        ranged(f"users per request, at most {MAX_PAGE_SIZE}; the users of a seed depend on it, so keep it fixed", parse_int, "K", 1, MAX_PAGE_SIZE),
        MAX_PAGE_SIZE,
    )
    max_response_mb: float = declare(
        ranged("largest answer accepted, in MB; a larger one fails the run", parse_float, "MB", LEAST_RESPONSE_MB, MOST_RESPONSE_MB),
        64.0,
    )
    allow_http: bool = declare(Setting("allow plain http:// to a host other than loopback", parse_bool, SWITCH), False)
    k_anonymity: int = declare(
        ranged(
            "with --pseudonymise, the fewest people an analyst file's combination of quasi-identifiers may describe; "
            "rarer combinations have those values suppressed",
            parse_int,
            "K",
            2,
            MOST_K,
        ),
        5,
    )
    table_format: str = declare(
        Setting(
            f"how batches land: {FILES}, one parquet file per seed that any engine reads as it is; or {DELTA} "
            "(pip install '.[delta]'), one Delta table in <output-dir>/random_users/ with versions, a history, "
            "seeds landing at once and --compact",
            parse_table_format,
            takes("KIND"),
            checks=(one_of(TABLE_FORMATS),),
        ),
        FILES,
    )
    retain_hours: int = declare(
        ranged("with --compact: hours of the Delta table's history kept; files no version within them needs are removed", parse_int, "H", 0, MOST_RETAIN_HOURS),
        DEFAULT_RETAIN_HOURS,
    )

    def __post_init__(self):
        """Spell and check each setting on its own, in field order; then the checks across settings (ACROSS)."""
        for setting in SETTINGS:
            object.__setattr__(self, setting.name, checked(setting, getattr(self, setting.name)))
        for check in ACROSS:
            check(self)

    @property
    def max_response_bytes(self) -> int:
        """The answer size bound in bytes."""
        return int(self.max_response_mb * 1_000_000)


# Each setting with its name, in the order of Settings' fields: --help and the README's table list them so.
SETTINGS = tuple(dataclasses.replace(field.metadata[DECLARATION], name=field.name) for field in dataclasses.fields(Settings))
BY_NAME = {setting.name: setting for setting in SETTINGS}


def checked(setting: Setting, value: Any) -> Any:
    """A value of one setting in its one spelling, refused with a SettingsError naming the setting unless each of its own checks passes."""
    if setting.tidy is not None:
        value = setting.tidy(value)
    if value is not None:
        for check in setting.checks:
            check(describe(setting.name), value)
    return value


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


def setting_value(name: str, environ=None) -> Any:
    """One setting as a run takes it from its variable (or its default), spelt and checked on its own; refused as a run refuses it."""
    setting = BY_NAME[name]
    text, source = setting_text(setting, {}, os.environ if environ is None else environ)
    return checked(setting, default_value(name) if text is None else read_text(setting, text, source))


def default_value(name: str) -> Any:
    """A setting's default, as its field of Settings gives it."""
    field = next(field for field in dataclasses.fields(Settings) if field.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def read_text(setting: Setting, text: str, source: str) -> Any:
    """A setting's text read by its parser; refused naming `source` when it does not parse."""
    try:
        return setting.parse(text)
    except ValueError as exc:
        raise SettingsError(f"{source} {exc}, got '{shorten(text)}'") from exc


def load_settings(flags: dict | None = None, environ=None, today: dt.date | None = None) -> Settings:
    """Settings from flag texts, then environment variables, then defaults."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        text, source = setting_text(setting, flags, environ)
        if source == setting.flag:
            source = describe(setting.name)  # a flag's bad value names its variable too
        if text is not None:
            values[setting.name] = read_text(setting, text, source)
    today = today or dt.datetime.now(dt.UTC).date()
    if "seed" in values:
        values["seed"] = expand_seed(values["seed"], today)
    return Settings(**values)


def empty_value(setting: Setting, source: str) -> str:
    """Why an empty (or blank) flag or variable is refused: it never stands for the default or for off."""
    said, how = ("is empty", "leave it out") if source == setting.flag else ("is set but empty", "unset it")
    instead = f", or {setting.instead_of_empty}" if setting.instead_of_empty else ""
    return f"{source} {said}; {how} for the default{instead}"
