"""Pages served fast, for the benchmark: the tests' fake randomuser.me, each page built and gzipped once, in its own process.

    python benchmarks/fast_pages.py LATENCY PAGES   # prints "READY <url>", serves until stdin closes

The benchmark's runs pull the same pages again and again, at up to a million users: building and
gzipping a 5 MB page anew for each request would spend CPU the job under test needs, so the
pages the job will ask for are built and gzipped before any timing, and kept. Nothing else of
the fake changes: its answers are the bytes tests/fake_api.py serves.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
SEED = "bench"
PAGE = 5000


def load_tests_modules() -> None:
    """Load the tests' fake service and oracle from tests/ (no package) by path; the job itself is imported as installed."""
    for name in ("fake_api", "oracle"):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
            sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)


load_tests_modules()

from fake_api import FakeRandomUser, PageRequest  # noqa: E402 -- loaded by path just above


class FastPages(FakeRandomUser):
    """The fake with every body, and its gzip, made once and kept: the benchmark serves a known set of pages."""

    def __init__(self, latency: float = 0.0):
        """A fake with empty page stores."""
        super().__init__(latency=latency)
        self._bodies: dict[PageRequest, bytes] = {}
        self._wires: dict[bytes, bytes] = {}
        self._store_lock = threading.Lock()

    def _body(self, request: PageRequest) -> bytes:
        """The kept body of this request, made on first use."""
        return self._kept(self._bodies, request, lambda: super(FastPages, self)._body(request))

    def _gzip(self, payload: bytes) -> bytes:
        """The kept gzip of this body (keyed by the bytes, so a doctored body is kept too), made on first use."""
        return self._kept(self._wires, payload, lambda: super(FastPages, self)._gzip(payload))

    def _kept(self, store: dict, key, make) -> bytes:
        """store[key], made (outside the lock: pages build in parallel) on a miss."""
        with self._store_lock:
            if key in store:
                return store[key]
        value = make()
        with self._store_lock:
            return store.setdefault(key, value)

    def _record_sent(self, payload: bytes) -> None:
        """Keep no .sent: the benchmark reads none, and a million users' bodies would be a gigabyte."""

    def warm(self, pages: int) -> None:
        """Build and gzip pages 1..pages of SEED as the job's CLI asks for them (the job's own query)."""
        import random_user_etl as etl
        from _random_user_etl import client
        from random_user_config import Settings

        settings = Settings(n=pages * PAGE, seed=SEED, raw_dir=None)

        def build(page: int) -> None:
            query = client.page_params(settings, etl.PageRequest(SEED, page, PAGE))
            self._gzip(self._page({name: str(value) for name, value in query.items()}))

        # Two threads: zlib lets go of the GIL while it compresses.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(build, range(1, pages + 1)))


def serve(latency: float, pages: int) -> None:
    """Warm the pages, print READY and the URL, serve until stdin closes."""
    fake = FastPages()
    fake.warm(pages)
    fake.latency = latency
    with fake:
        print(f"READY {fake.url}", flush=True)
        sys.stdin.read()


class FakeServer:
    """FastPages in its own process (so the Python server never competes for the job's GIL), its pages warmed before any timing."""

    def __init__(self, latency: float, pages: int):
        """Start it and wait for its READY line."""
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(latency), str(pages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the fake server did not start: {line!r}")
        self.url = line.split(" ", 1)[1]

    def close(self) -> None:
        """Close its stdin (it stops), or kill it if it does not."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    serve(float(sys.argv[1]), int(sys.argv[2]))
