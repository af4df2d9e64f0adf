"""The transport's fault mapping: each fault a real request meets is named by kind whatever the order of wire.FAULTS' rows.

Each case sends a real request over loopback (to the fake, a closed port, a name that never resolves)
and keeps the exception the client maps; that exception is then mapped again under the table in
its written order, reversed, and shuffled, and must give the same words every time.
"""

from __future__ import annotations

import random

import pytest
from fake_api import chunk_framing, interim, page_body, raw, reset, truncated

import random_user_etl as etl
from _random_user_etl import wire

PAGE = page_body("pura", 1, 100)

# id: (what the fake answers, or where the request goes; the words the fault must be given)
CASES = {
    "refused": ("nowhere", {"connection refused"}),
    "does-not-resolve": ("http://random-user.invalid/api/1.4/", {"host name does not resolve"}),
    "tls-to-plain-http": ("https", {"TLS failed"}),
    "closed-without-an-answer": ([raw(b"")], {"closed without an answer"}),
    "reset": ([reset()], {"connection reset by peer", "closed without an answer"}),
    "cut-off": ([truncated()], {"connection broken, answer cut off"}),
    "broken-chunk-size": ([chunk_framing(b"4g\r\n", b'{"results":[' * 5000, 1_000_000)], {"broken chunked framing"}),
    "endless-interim": ([interim(103, times=10_000)], {"not an HTTP answer"}),
    "not-http": ([raw(b"HTTP/1.1 two hundred OK\r\n\r\n")], {"not an HTTP answer"}),
    "content-lengths-disagree": ([raw(b"HTTP/1.1 200 OK\r\nContent-Length: %d, %d\r\n\r\n%b" % (len(PAGE), len(PAGE) + 1, PAGE))], {"not an HTTP answer"}),
}


def orders() -> list[tuple]:
    """The table as written, reversed, and shuffled a few ways (seeded: the same orders every run)."""
    written = tuple(wire.FAULTS)
    shuffled = []
    for seed in range(8):
        rows = list(written)
        random.Random(seed).shuffle(rows)
        shuffled.append(tuple(rows))
    return [written, written[::-1], *shuffled]


def mapped_fault(case, api, nowhere, settings, monkeypatch) -> tuple[BaseException, bool]:
    """Run one case with no retry; the exception the client maps, and whether it came while reading the answer."""
    where, _ = CASES[case]
    seen: list[tuple[BaseException, bool]] = []
    real = wire.fault_of

    def keep(exc, settings, reading, timed_out):
        seen.append((exc, reading))
        return real(exc, settings, reading=reading, timed_out=timed_out)

    monkeypatch.setattr(wire, "fault_of", keep)
    url = {"nowhere": nowhere, "https": api.url.replace("http://", "https://")}.get(where, where) if isinstance(where, str) else api.url
    if not isinstance(where, str):
        api.script(*where)
    with pytest.raises(etl.EtlError):
        etl.run(settings(seed="pura", retries=0, api_url=url, allow_http=True))
    assert len(seen) == 1, seen
    return seen[0]


@pytest.mark.parametrize("case", CASES)
def test_a_transport_fault_gets_the_same_words_in_any_order_of_the_fault_table(case, api, nowhere, settings, monkeypatch):
    exc, reading = mapped_fault(case, api, nowhere, settings, monkeypatch)
    chain = wire.causes(exc)
    words = set()
    for rows in orders():
        monkeypatch.setattr(wire, "FAULTS", rows)
        words.add(wire.fault_words(chain, reading, timed_out=False)[0])
    assert len(words) == 1 and words <= CASES[case][1], (words, [type(e).__name__ for e in chain])


def test_each_class_of_the_fault_table_gets_its_own_row_whichever_row_comes_first(monkeypatch):
    # Row against row: a class whose base another row names (IncompleteRead, an HTTPException) still gets its own.
    for rows in orders():
        monkeypatch.setattr(wire, "FAULTS", rows)
        for classes, words, line in rows:
            for kind in classes:
                assert wire.nearest_row(kind) == (words, line), kind
