"""How a value is shown in a line the job prints: escaped, bounded, and an address without its secrets."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit


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
