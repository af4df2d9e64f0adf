"""The benchmark: the job's transform against the alternatives, replay, the job end to end, memory, pace, the Delta sink.

    python benchmarks/bench.py            # the full benchmark (about 5 minutes on 2 quiet cores, estimated)
    python benchmarks/bench.py --quick    # smaller sizes, one repeat: a smoke run of about a minute

Its sections are the table SECTIONS: each a runner and its options for the run's arguments, each
run the same way (a CPU witness, its failures, findings, figures and targets gathered for the
SUMMARY). Offline: every byte comes from tests/fake_api.py (recorded randomuser.me users,
distinct ids), served fast from another process by benchmarks/fast_pages.py. Every transform's
output and every landed batch is checked against the raw JSON (row counts, user ids, order,
postcodes as text, ...), so a fast wrong answer cannot pass. The replay, end-to-end, memory and
delta sections each run the job's CLI in a fresh subprocess, so the fake never steals the job's GIL,
and peak RSS is the kernel's high-water mark of that one job process (VmHWM).
The full output is also written to benchmarks/results/latest.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import concurrent.futures as futures
import functools
import gc
import io
import json
import shutil
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
SEED = "bench"
PAGE = 5000
LATENCY = 0.2
# The job's steps whose time the end-to-end section reports (wrapped in the job's process).
# Each is (what the table calls it, the object the job calls it on, its name there).
STEP_PLACES = (
    ("fetch_page", "client.Service", "fetch_page"),
    ("unpack", "run", "unpack"),
    ("transform", "run", "transform"),
    ("stage_part", "run", "stage_part"),
    ("split_part", "sort.ExternalSort", "add"),
    ("land", "run.Run", "finish"),
)
STEPS = tuple(step for step, _, _ in STEP_PLACES)
CORES = os.cpu_count() or 1

# Heavy imports (polars, pandas, the job) happen inside functions, so the job's child process
# (--_child) loads only what the job itself loads and its peak RSS is the job's own.


# ---------------------------------------------------------------- output


class Report:
    """Print as we go, and keep everything for benchmarks/results/latest.txt."""

    def __init__(self):
        self.buffer = io.StringIO()

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.buffer.write(text + "\n")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """A plain aligned table: first column left, the others right."""
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        self("  " + fmt(header))
        self("  " + "  ".join("-" * w for w in widths))
        for row in rows:
            self("  " + fmt(row))


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}"


class CpuWitness:
    """How much CPU other processes (not this benchmark's) used during a section: a fairness check.

    The machine has few cores; another job's tests running at the same time slow everything
    here down. System-wide busy time minus this process tree's own CPU time is the others' share.
    Call at a point where every helper process of the section has been waited for.
    """

    def __init__(self):
        self.started = self._sample()

    @staticmethod
    def _sample():
        import psutil

        total = psutil.cpu_times()
        busy = total.user + total.nice + total.system + getattr(total, "irq", 0) + getattr(total, "softirq", 0)
        own = psutil.Process().cpu_times()
        mine = own.user + own.system + own.children_user + own.children_system
        return time.perf_counter(), busy, mine

    def line(self) -> str:
        end = self._sample()
        wall = end[0] - self.started[0]
        others = max((end[1] - self.started[1]) - (end[2] - self.started[2]), 0.0) / wall
        warn = "  WARNING: the machine was busy with other work, timings are pessimistic" if others > 0.15 * CORES else ""
        return f"  other processes used {others:.2f} of {CORES} cores on average during this section.{warn}"


# ---------------------------------------------------------------- 1. transform


def build_bodies(pages: int) -> list[bytes]:
    """The exact bodies the fake serves for seed SEED, pages 1..pages of 5000 (what the job asks for)."""
    from fake_api import page_body

    return [page_body(SEED, page, PAGE) for page in range(1, pages + 1)]


class Reference:
    """What the raw JSON says, read by the tests' oracle (tests/oracle.py): the answer key of every check."""

    def __init__(self, bodies: list[bytes]):
        from oracle import user_rows

        self.users: dict[str, dict] = {}
        self.order: list[list[str]] = []  # per page, the ids in the answer's own order
        for body in bodies:
            rows = user_rows(json.loads(body)["results"])
            self.order.append(list(rows))
            for uid, row in rows.items():
                self.users[uid] = {
                    "postcode": row["postcode"],
                    "latitude": row["latitude"],
                    "longitude": row["longitude"],
                    "dob": dob_text(row["date_of_birth"]),
                    "national_id": row["national_id"],
                }
        self.ids = [uid for page in self.order for uid in page]
        self.id_set = set(self.ids)


def pandas_transform(body: bytes):
    """json.loads + pandas.json_normalize, typed to the same contract, as a pandas user would write it."""
    import pandas as pd

    from schemas import OUTPUT_SCHEMA, SOURCE_FIELDS

    doc = json.loads(body)
    info = doc.get("info") or {}
    # Flatten, keep only the contract's fields (login.password, salt, hashes... are dropped), rename.
    frame = pd.json_normalize(doc["results"])
    frame = frame[list(SOURCE_FIELDS.values())]
    frame.columns = list(SOURCE_FIELDS)
    # Postcodes are ints for most nationalities and strings for GB/CA/NO: keep them all as text.
    frame["postcode"] = frame["postcode"].astype(str)
    for name in ("latitude", "longitude"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    for name in ("age", "street_number"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("Int32")
    for name in ("date_of_birth", "registered_at"):
        frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601").astype("datetime64[us, UTC]")
    for name in ("national_id_type", "national_id"):
        frame[name] = frame[name].replace("", None)  # the service writes "no id" as "" or null
    frame["full_name"] = frame["first_name"] + " " + frame["last_name"]
    frame["street_address"] = frame["street_number"].astype(str) + " " + frame["street_name"]
    frame["seed"] = info.get("seed")
    frame["page"] = pd.array([int(info["page"])] * len(frame), dtype="Int32") if info.get("page") else None
    frame["api_version"] = info.get("version")
    frame["ingested_at"] = pd.Timestamp.now(tz="UTC").as_unit("us")
    return frame[OUTPUT_SCHEMA.names()]


def naive_polars_transform(body: bytes):
    """The naive Polars way: a frame from json.loads' dicts (types inferred), unnested, cast."""
    import datetime as dt

    import polars as pl
    import polars.selectors as cs

    from schemas import OUTPUT_SCHEMA, SOURCE_FIELDS

    doc = json.loads(body)
    info = doc.get("info") or {}
    frame = pl.DataFrame(doc["results"])
    while frame.select(cs.struct()).width:
        frame = frame.unnest(cs.struct(), separator=".")
    frame = frame.select(pl.col(source).alias(name) for name, source in SOURCE_FIELDS.items())
    utc = pl.Datetime("us", "UTC")
    frame = frame.with_columns(
        postcode=pl.col("postcode").cast(pl.String),
        latitude=pl.col("latitude").cast(pl.Float64),
        longitude=pl.col("longitude").cast(pl.Float64),
        age=pl.col("age").cast(pl.Int32),
        street_number=pl.col("street_number").cast(pl.Int32),
        date_of_birth=pl.col("date_of_birth").str.to_datetime(time_unit="us", time_zone="UTC"),
        registered_at=pl.col("registered_at").str.to_datetime(time_unit="us", time_zone="UTC"),
        national_id_type=pl.when(pl.col("national_id_type") != "").then(pl.col("national_id_type")),
        national_id=pl.when(pl.col("national_id") != "").then(pl.col("national_id")),
    )
    return frame.with_columns(
        full_name=pl.concat_str("first_name", "last_name", separator=" "),
        street_address=pl.concat_str(pl.col("street_number").cast(pl.String), "street_name", separator=" "),
        seed=pl.lit(info.get("seed"), pl.String),
        page=pl.lit(info.get("page"), pl.Int32),
        api_version=pl.lit(info.get("version"), pl.String),
        ingested_at=pl.lit(dt.datetime.now(dt.UTC), utc),
    ).select(OUTPUT_SCHEMA.names())


class OverAll:
    """An approach given the whole list of bodies at once (to type several at a time), not one body per call."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, body: bytes):
        return self.fn([body])[0]


def time_all(approaches: dict, bodies: list[bytes], repeats: int) -> tuple[dict, dict]:
    """Seconds per pass over all bodies, per approach; repeats interleaved so drift hits all alike."""
    for fn in approaches.values():  # warm-up: imports, Polars' thread pool, caches
        fn(bodies[0])
    times = {name: [] for name in approaches}
    outputs = {}
    for _ in range(repeats):
        for name, fn in approaches.items():
            outputs.pop(name, None)
            gc.collect()
            gc.disable()  # like timeit: no collector pauses scaled by unrelated live objects
            try:
                started = time.perf_counter()
                result = fn.fn(bodies) if isinstance(fn, OverAll) else [fn(body) for body in bodies]
                times[name].append(time.perf_counter() - started)
            finally:
                gc.enable()
            outputs[name] = result
    return times, outputs


def dob_text(moment) -> str | None:
    """An instant as the service writes it (millisecond ISO-8601, Z): what landed and what the oracle read compare as."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


def frame_rows(frames):
    """(ids per page, {id: (postcode, latitude, longitude, dob, national_id)}) of per-page outputs (Polars or pandas)."""
    import polars as pl

    ids, values = [], {}
    for frame in frames:
        frame = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
        cols = {c: frame[c].to_list() for c in ("user_id", "postcode", "latitude", "longitude", "date_of_birth", "national_id")}
        dobs = [dob_text(d) for d in cols["date_of_birth"]]
        ids.append(cols["user_id"])
        for i, uid in enumerate(cols["user_id"]):
            values[uid] = (cols["postcode"][i], cols["latitude"][i], cols["longitude"][i], dobs[i], cols["national_id"][i])
    return ids, values


def check_output(name: str, frames, ref: Reference) -> tuple[list[str], list[str]]:
    """(failures, findings): wrong rows, ids or order fail; values that differ from the raw JSON are findings."""
    failures, findings = [], []
    ids, values = frame_rows(frames)
    flat = [uid for page in ids for uid in page]
    if len(flat) != len(ref.ids):
        failures.append(f"{name}: {len(flat):,} rows, the raw JSON holds {len(ref.ids):,}")
    if set(flat) != ref.id_set:
        failures.append(f"{name}: the set of user ids differs from the raw JSON's ({len(set(flat) ^ ref.id_set):,} ids differ)")
    elif ids != ref.order:
        failures.append(f"{name}: rows are not in the raw JSON's order")
    wrong = {"postcode": [], "latitude/longitude": [], "date_of_birth": [], "national_id": []}
    for uid, (postcode, lat, lon, dob, nat_id) in values.items():
        want = ref.users.get(uid)
        if want is None:
            continue
        if postcode != want["postcode"]:
            wrong["postcode"].append((want["postcode"], postcode))
        if lat != want["latitude"] or lon != want["longitude"]:
            wrong["latitude/longitude"].append(((want["latitude"], want["longitude"]), (lat, lon)))
        if dob != want["dob"]:
            wrong["date_of_birth"].append((want["dob"], dob))
        if nat_id != want["national_id"]:
            wrong["national_id"].append((want["national_id"], nat_id))
    for column, cases in wrong.items():
        if cases:
            examples = ", ".join(f"{a!r} -> {b!r}" for a, b in cases[:3])
            findings.append(f"{name}: {column} differs from the raw JSON in {len(cases):,} rows (e.g. {examples})")
    return failures, findings


def adversarial_body() -> bytes:
    """A legitimate answer whose first 2,000 users all have integer postcodes, then GB/CA/NO text ones.

    The real service can send this (say nat=us,gb with the US users first by chance, or a
    page where text postcodes are rare): a reader that infers types from the first rows guesses
    Int64 for postcode.
    """
    from fake_api import _dumps, page_body

    doc = json.loads(page_body(SEED, 999, PAGE))
    doc["results"].sort(key=lambda u: isinstance(u["location"]["postcode"], str))
    return _dumps(doc).encode()


def probe_inference(report: Report) -> tuple[list[str], list[str]]:
    """Run the three transforms on the adversarial page and check postcodes against the raw JSON."""
    import random_user_etl as etl

    body = adversarial_body()
    ref = Reference([body])
    failures, findings = [], []
    lines = []
    for name, fn in (("job transform", etl.transform), ("pandas", pandas_transform), ("naive Polars", naive_polars_transform)):
        try:
            out = [fn(body)]
        except Exception as exc:  # noqa: BLE001 -- any crash of an alternative is a finding, not a benchmark failure
            findings.append(f"{name} on the integer-first page: raises {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            lines.append([name, "raises", type(exc).__name__])
            continue
        fail, find = check_output(f"{name} (integer-first page)", out, ref)
        bad = next((f for f in fail + find if "postcode" in f or "ids" in f or "rows" in f), None)
        lines.append([name, "wrong" if bad else "ok", (bad.split(": ", 1)[1][:110] if bad else "all postcodes kept as text")])
        (failures if name == "job transform" else findings).extend(fail + find)
    report("  Type-inference probe: one 5,000-user page, integer postcodes first, text ones (GB, CA, NO) after")
    report.table(["approach", "postcodes", "detail"], lines)
    return failures, findings


def bench_transform(report: Report, pages: int, repeats: int) -> dict:
    import pandas as pd
    import polars as pl

    import random_user_etl as etl

    report(f"1. TRANSFORM: {pages} pages x {PAGE:,} users = {pages * PAGE:,} users, in memory")
    started = time.perf_counter()
    bodies = build_bodies(pages)
    built = time.perf_counter() - started
    ref = Reference(bodies)
    mb = sum(map(len, bodies)) / 1e6
    report(f"  bodies: {mb:.1f} MB of JSON from tests/fake_api.page_body (recorded users, distinct ids), built in {built:.1f}s")
    report(
        f"  polars {pl.__version__} ({pl.thread_pool_size()} threads), pandas {pd.__version__}, python {sys.version.split()[0]}, "
        f"{CORES} cores; {repeats} timed pass(es) each after a warm-up, interleaved, gc paused while timing; median reported"
    )
    from _random_user_etl.run import STAGERS

    def as_a_run_types(bodies):
        """The job's transform on STAGERS threads, as a run's staging types pages, in order."""
        with futures.ThreadPoolExecutor(STAGERS) as pool:
            return list(pool.map(etl.transform, bodies))

    approaches = {
        "job transform(body)": etl.transform,
        f"job, {STAGERS} pages at once (as a run)": OverAll(as_a_run_types),
        "pandas json_normalize + dtypes": pandas_transform,
        "naive Polars DataFrame(dicts) + unnest": naive_polars_transform,
        "json.loads alone (floor)": json.loads,
        NO_CHECK: polars_alone,
    }
    times, outputs = time_all(approaches, bodies, repeats)
    users = len(ref.ids)

    # Check every timed answer.
    failures, findings = [], []
    verdicts = {"json.loads alone (floor)": "n/a (floor)", NO_CHECK: "n/a (ceiling)"}
    checks = (
        ("job transform(body)", "job transform"),
        (f"job, {STAGERS} pages at once (as a run)", "job, pages at once"),
        ("pandas json_normalize + dtypes", "pandas"),
        ("naive Polars DataFrame(dicts) + unnest", "naive Polars"),
    )
    for key, label in checks:
        fail, find = check_output(label, outputs[key], ref)
        if key.startswith("job"):
            fail, find = fail + find, []  # the job must match the raw JSON exactly
        failures += fail
        findings += find
        verdicts[key] = "FAILED" if fail else ("ok, see findings" if find else "ok")
    del outputs

    med = {name: statistics.median(ts) for name, ts in times.items()}
    job = med["job transform(body)"]
    rows = []
    for name, ts in times.items():
        rows.append([name, f"{med[name]:.2f}", f"{min(ts):.2f}", rate(users, med[name]), f"{med[name] / job:.2f}x", verdicts[name]])
    report.table(["approach", "median s", "best s", "users/s", "time vs job", "answer"], rows)
    ratios = {
        "pandas": med["pandas json_normalize + dtypes"] / job,
        "json": med["json.loads alone (floor)"] / job,
    }
    ceiling = med["json.loads alone (floor)"] / med[NO_CHECK]
    report(
        "  ceiling: Polars alone, parsing the job's pieces on its parsing threads and typing them with no check at all, "
        f"is {ceiling:.2f}x faster than json.loads alone; the job's checks take it to {ratios['json']:.2f}x"
    )
    report()
    targets = [
        ("one page at a time, job >= 7x faster than pandas", ratios["pandas"], ratios["pandas"] >= 7),
        ("one page at a time, job >= 2.5x faster than json.loads alone", ratios["json"], ratios["json"] >= 2.5),
    ]
    report.table(["target", "job speed-up", "verdict"], [[t, f"{r:.2f}x", verdict(ok)] for t, r, ok in targets])
    report()
    probe_fail, probe_find = probe_inference(report)
    failures += probe_fail
    findings += probe_find
    return {
        "failures": failures,
        "findings": findings,
        "targets": [(f"transform: {t}", ok) for t, _, ok in targets],
        "figures": [f"transform: Polars alone, no check (the ceiling), is {ceiling:.2f}x faster than json.loads alone"],
    }


NO_CHECK = "Polars alone, pieces typed, no check"


def polars_alone(body: bytes):
    """The ceiling of the job's way: the users parsed by Polars in the job's pieces on its parsing threads, then typed; no check of any kind."""
    import polars as pl

    from _random_user_etl import answer, contract
    from schemas import SOURCE_FIELDS

    pieces = [answer.PARSERS.submit(answer.parse_piece, body, start, stop) for start, stop in answer.user_pieces(body, body.rfind(answer.LAYOUT_TAIL))]
    users = pl.concat([future.result() for future in pieces])
    flat = users.select(**{name: contract.field(source) for name, source in SOURCE_FIELDS.items()})
    return flat.with_columns(**contract.typed_columns())


# ---------------------------------------------------------------- servers and job runs


def fake_server(latency: float, pages: int):
    """benchmarks/fast_pages.py's fake in its own process, pages 1..pages warmed (imported here: a job's process never loads it)."""
    from fast_pages import FakeServer

    return FakeServer(latency, pages)


def run_helper(flag: str, args: list[str], name: str, env: dict | None = None) -> dict:
    """This script with a hidden flag in a fresh process: its last stdout line as a dict, process_s, or an error."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    result = {"process_s": time.perf_counter() - started}
    try:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        result["error"] = f"no result from the {name} process (exit {proc.returncode}): {proc.stderr.strip()[-400:]}"
        return result
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
        result["error"] = f"the {name} failed (exit {proc.returncode}): {last}"
    return result


def run_job(url: str, n: int, concurrency: int, raw_dir: str | None = None, allocator: bool = True) -> dict:
    """Run the job's CLI in a fresh process (raw answers kept in raw_dir if given; the image's allocator settings unless told); its wall times, peak RSS (VmHWM) and output folder."""
    out = tempfile.mkdtemp(prefix="bench-out-")
    return run_child(job_args(url, n, concurrency, out, raw_dir), out, "job", allocator)


def job_args(url: str, n: int, concurrency: int, out: str, raw_dir: str | None) -> list[str]:
    """The job's CLI for n users of seed SEED from url into out, no retries."""
    return cli_flags(n=n, seed=SEED, api_url=url, output_dir=out, raw_dir=raw_dir, concurrency=concurrency, retries=0, timeout=60)


def cli_flags(**settings) -> list[str]:
    """The job's flags for these settings, by the settings' rule: page_size=250 is --page-size 250, raw_dir=None is --raw-dir off."""
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", "off" if value is None else str(value))]


def run_child(args: list[str], out: str, name: str, allocator: bool = True) -> dict:
    """The job's CLI with these arguments in a fresh process (see child): its result, output folder and peak RSS in MB."""
    result = {"out": out, **run_helper("--_child", args, name, clean_env(allocator))}
    result["rss_mb"] = result["hwm_kb"] * 1024 / 1e6 if result.get("hwm_kb") else math.nan
    return result


def peak_rss_kb() -> int | None:
    """This process's peak RSS since exec (VmHWM), in KiB; None where /proc is not there.

    Not getrusage: on Linux a child's ru_maxrss starts at its parent's RSS at fork, and the
    benchmark process holds hundreds of MB of bodies, so ru_maxrss would report the parent.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(args: list[str]) -> None:
    """--_child: time the CLI run of the job (after its imports), report as one JSON line."""
    import random_user_etl as etl

    imported = time.perf_counter()
    import_kb = peak_rss_kb()
    spent = {}
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    # Where the time goes: each step wrapped where the job looks it up (a module's name, or a class's method).
    import importlib

    for step, place, name in STEP_PLACES:
        module_name, _, class_name = place.partition(".")
        owner = importlib.import_module(f"_random_user_etl.{module_name}")
        owner = getattr(owner, class_name) if class_name else owner
        setattr(owner, name, timed(step, getattr(owner, name)))
    cpu_before = sum(os.times()[:2])
    rc = etl.main(args)
    done = time.perf_counter()
    cpu_s = sum(os.times()[:2]) - cpu_before  # every thread of the process, Polars' own included
    print(json.dumps({"run_s": done - imported, "cpu_s": cpu_s, "spent": spent, "hwm_kb": peak_rss_kb(), "import_kb": import_kb}), flush=True)
    sys.exit(rc)


def bare_client(args: list[str]) -> None:
    """--_bare URL N C: the least any job must do, timed: fetch every page C at a time, gunzip and parse them meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    import polars as pl

    import random_user_etl as etl
    from _random_user_etl import client, wire
    from random_user_config import Settings
    from schemas import RAW_RESPONSE

    url, n, concurrency = args[0], int(args[1]), int(args[2])
    settings = Settings(n=n, seed=SEED, api_url=url, raw_dir=None, concurrency=concurrency, retries=0)
    service = client.Service(settings)  # the job's own network code: what differs from the job is all after it

    def download(page: int) -> wire.Answer:
        return service.fetch_page(etl.PageRequest(SEED, page, PAGE))

    def parse(answer: wire.Answer) -> pl.DataFrame:
        # The fastest parser here (Polars', against the raw schema; json.loads would hold the GIL), nothing typed.
        return pl.read_json(wire.unpack(answer, settings.max_response_bytes), schema=RAW_RESPONSE)

    started = time.perf_counter()
    # Pipelined like the job: the next requests go out while answers are parsed on the other threads.
    with ThreadPoolExecutor(concurrency) as fetchers, ThreadPoolExecutor(CORES) as parsers:
        downloads = [fetchers.submit(download, page) for page in range(1, pages_of(n) + 1)]
        parsed = [parsers.submit(parse, future.result()) for future in downloads]
        frames = [future.result() for future in parsed]
    elapsed = time.perf_counter() - started
    users = sum(frame.get_column("results").list.len().sum() for frame in frames)  # checked after the clock stops
    print(json.dumps({"run_s": elapsed, "users": users}), flush=True)


def run_bare(url: str, n: int, concurrency: int) -> dict:
    """The bare client in a fresh process: its wall time, or an error."""
    result = run_helper("--_bare", [url, str(n), str(concurrency)], "bare client")
    if "error" not in result and result["users"] != n:
        result["error"] = f"the bare client got {result['users']:,} users, expected {n:,}"
    return result


def check_landed(result: dict, n: int, expected_order: list[str] | None) -> list[str]:
    """Row count, unique ids, the ids themselves and their order in a landed batch; deletes the output folder."""
    import polars as pl

    from _random_user_etl import store

    problems = []
    try:
        if "error" in result:
            return [result["error"]]
        path = Path(store.batch_path(result["out"], SEED))
        if not path.exists():
            return [f"no landed file {path.name}"]
        ids = pl.read_parquet(path, columns=["user_id"])["user_id"]
        if ids.len() != n:
            problems.append(f"landed {ids.len():,} rows, expected {n:,}")
        if ids.n_unique() != ids.len():
            problems.append(f"landed ids repeat: {ids.len() - ids.n_unique():,} duplicates")
        landed = ids.to_list()
        if expected_order is not None and landed != expected_order:
            problems.append(
                "landed ids differ from the ids in the raw JSON served"
                if set(landed) != set(expected_order)
                else "landed rows are not in the raw users' key order (nationality, last, first, id)"
            )
        leftovers = [p.name for p in Path(result["out"]).rglob("*") if p.is_file() and p != path and not p.name.endswith(".lock")]
        if leftovers:
            problems.append(f"leftover files after landing: {leftovers[:3]}")
    finally:
        shutil.rmtree(result["out"], ignore_errors=True)
    return problems


@functools.cache
def page_keys(page: int) -> tuple:
    """The sort keys (nationality, last, first, id) of one page's raw users, read by the oracle, once per run."""
    from fake_api import page_body
    from oracle import row_key, user_rows

    return tuple(map(row_key, user_rows(json.loads(page_body(SEED, page, PAGE))["results"]).values()))


def expected_order(pages: int, nationality: str | None = None) -> list[str]:
    """The user ids of pages 1..pages (of one nationality, if given) in the order a batch must hold them: the raw keys sorted by Python."""
    keys = (key for page in range(1, pages + 1) for key in page_keys(page) if nationality in (None, key[0]))
    return [key[-1] for key in sorted(keys)]


def pages_of(n: int) -> int:
    """How many pages of PAGE users the job asks for to get n users."""
    from _random_user_etl import client

    return len(client.page_sizes(n, PAGE))


# ---------------------------------------------------------------- 3. end to end


def bench_end_to_end(report: Report, n: int, repeats: int, with_raw: bool) -> dict:
    """The job's CLI against a fake with latency, at concurrency 1 and 4, beside the bare client."""
    pages = pages_of(n)
    ids = expected_order(pages)
    report(f"3. END TO END: the job's CLI, n = {n:,} ({pages} pages of {PAGE:,}), fake API with {LATENCY:.1f}s latency per request")
    report(
        "  job and fake API in separate processes; pages pre-built and pre-gzipped by the fake (gzip is on, as the job asks);"
        f" raw_dir off; median of {repeats} run(s), each in a fresh process after one warm-up run"
    )
    report("  floor = ceil(pages / concurrency) x latency; 'run' = the job's main(); 'process' adds interpreter start and imports")
    report(f"  'CPU s' = CPU time the run used (all threads); no schedule on {CORES} cores can beat 'CPU s / cores', whatever the floor says")
    report(
        "  'bare client' = the least any job must do, same server and concurrency: fetch, gunzip and parse (pl.read_json) every page; nothing typed or written"
    )
    failures, rows, spent_rows, targets = [], [], [], []
    configs = [(1, False), (4, False)] + ([(4, True)] if with_raw else [])
    with fake_server(LATENCY, pages) as server:
        # Warm-up (OS file cache, the server's connection path), checked like the rest: a broken job fails here.
        failures += [f"end to end, warm-up: {p}" for p in check_landed(run_job(server.url, PAGE, 1), PAGE, None)]
        for concurrency, raw in configs:
            label = f"concurrency {concurrency}" + (", raw kept" if raw else "")
            results = []
            for _ in range(repeats):
                kept = tempfile.mkdtemp(prefix="bench-raw-") if raw else None
                result = run_job(server.url, n, concurrency, kept)
                problems = check_landed(result, n, ids)
                if kept:
                    shutil.rmtree(kept, ignore_errors=True)
                failures += [f"end to end, {label}: {p}" for p in problems]
                results.append(result)
            ok = [r for r in results if "error" not in r]  # a failed run is reported, never timed
            if not ok:
                rows.append([label, "failed", "", "", "", "", "", "", "", "", "", ""])
                continue
            floor = -(-pages // concurrency) * LATENCY
            bare = [run_bare(server.url, n, concurrency) for _ in range(0 if raw else repeats)]
            failures += [f"end to end, bare client at {label}: {b['error']}" for b in bare if "error" in b]
            timed = [b["run_s"] for b in bare if "error" not in b]
            bare_s = statistics.median(timed) if timed else math.nan
            middle = sorted(ok, key=lambda r: r["run_s"])[len(ok) // 2]  # the median run, for its breakdown
            run_s = middle["run_s"]
            proc_s = statistics.median(r["process_s"] for r in ok)
            rss = max(r["rss_mb"] for r in ok)
            over = (run_s / floor - 1) * 100
            verdict_text = "(info)" if raw else verdict(over <= 15)
            cpu = middle.get("cpu_s", float("nan"))
            bare_cells = [f"{bare_s:.2f}", f"{(bare_s / floor - 1) * 100:+.0f}%"] if timed else ["-", "-"]
            rows.append(
                [
                    label,
                    f"{floor:.2f}",
                    *bare_cells,
                    f"{run_s:.2f}",
                    f"{over:+.0f}%",
                    f"{cpu:.2f}",
                    f"{cpu / CORES:.2f}",
                    f"{proc_s:.2f}",
                    rate(n, run_s),
                    f"{rss:.0f}",
                    verdict_text,
                ]
            )
            spent = middle.get("spent", {})
            cells = [f"{spent[name]:.2f}" if name in spent else "-" for name in STEPS]
            land = spent.get("land")
            spent_rows.append([label, *cells, f"{run_s - land:.2f}" if land is not None else "-"])
            if not raw:
                reachable = bare_s / floor - 1 <= 0.15
                why = "" if reachable or over <= 15 else f"; the bare client alone is {(bare_s / floor - 1) * 100:+.0f}% here"
                targets.append((f"end to end c={concurrency}: within 15% of the floor ({over:+.0f}%{why})", over <= 15))
    header = [
        "configuration",
        "floor s",
        "bare client s",
        "bare overhead",
        "run s",
        "overhead",
        "CPU s",
        "CPU s / cores",
        "process s",
        "users/s",
        "peak RSS MB",
        "<=15%",
    ]
    report.table(header, rows)
    report()
    report("  Where the time goes (the median run; seconds summed over threads, so fetches overlap at concurrency > 1):")
    report.table(["configuration", *STEPS, "pages done at"], spent_rows)
    return {"failures": failures, "targets": targets}


# ---------------------------------------------------------------- 2. replay


def kept_order(kept: Path) -> tuple[int, list[str]]:
    """(pages, user ids in batch order) of the raw answers kept in a seed's folder, read by the standard library and the oracle."""
    import gzip

    from oracle import row_key, user_rows

    files = sorted(kept.glob("page-*.json.gz"))
    keys = [row_key(row) for path in files for row in user_rows(json.loads(gzip.decompress(path.read_bytes()))["results"]).values()]
    return len(files), [key[-1] for key in sorted(keys)]


def bench_replay(report: Report, n: int) -> dict:
    """A batch landed with its raw answers kept, then rebuilt from them alone by the CLI's --replay in a fresh process."""
    pages = pages_of(n)
    report(f"2. REPLAY: the CLI's --replay rebuilds a {n:,}-user batch ({pages} pages) from its kept raw answers, in a fresh process, no network")
    raw = tempfile.mkdtemp(prefix="bench-raw-")
    try:
        with fake_server(0.0, pages) as server:
            failures = [f"replay, the run that keeps the answers: {p}" for p in check_landed(run_job(server.url, n, 4, raw), n, None)]
        kept = Path(raw) / SEED
        if failures:
            return {"failures": failures, "targets": []}
        files, ids = kept_order(kept)
        if files != pages:
            failures.append(f"replay: {files} raw answers kept, expected {pages}")
        out = tempfile.mkdtemp(prefix="bench-out-")
        result = run_child(["--replay", str(kept), "--output-dir", out], out, "replay")
        failures += [f"replay: {p}" for p in check_landed(result, n, ids)]
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    if "error" in result:
        return {"failures": failures, "targets": []}
    base = (result.get("import_kb") or 0) * 1024 / 1e6
    row = [f"replay, n = {n:,}", f"{result['run_s']:.2f}", f"{result['process_s']:.2f}", rate(n, result["run_s"]), f"{result['rss_mb']:.0f}", f"{base:.0f}"]
    report("  'run s' = the job's main() after imports; 'process s' adds interpreter start and imports; the image's allocator settings")
    report.table(["run", "run s", "process s", "users/s", "peak RSS MB", "after imports"], [row])
    figure = (
        f"replay: {n:,} users rebuilt from kept raw answers in {result['run_s']:.2f} s ({rate(n, result['run_s'])} users/s), peak {result['rss_mb']:.0f} MB"
    )
    return {"failures": failures, "targets": [], "figures": [figure]}


# ---------------------------------------------------------------- 4. memory


def bench_memory(report: Report, sizes: tuple[int, int, int], repeats: int) -> dict:
    """Peak RSS of the job's process at three sizes and at FILLED with the image's allocator settings, and at the largest without them."""
    small, middle, large = sizes
    report(f"4. MEMORY SCALING: peak RSS of the job's process, n = {small:,}, {FILLED:,}, {middle:,} and {large:,}, latency 0, concurrency 4")
    variables = ", ".join(f"{k}={v}" for k, v in image_allocator().items())
    report(f"  the image's allocator variables (the Dockerfile's {variables}) in every run; the largest also runs without them")
    runs = [(small, True), (FILLED, True), (middle, True), (large, True), (large, False)]
    failures, rows, peaks = [], [], {}
    with fake_server(0.0, pages_of(large)) as server:
        failures += [f"memory, warm-up: {p}" for p in check_landed(run_job(server.url, PAGE, 4), PAGE, None)]
        for n, allocator in runs:
            label = f"n = {n:,}, " + ("image's allocator" if allocator else "no allocator variables")
            ids = expected_order(pages_of(n))
            results = []
            for _ in range(repeats):
                result = run_job(server.url, n, 4, allocator=allocator)
                failures += [f"memory {label}: {p}" for p in check_landed(result, n, ids)]
                results.append(result)
            ok = [r for r in results if "error" not in r]  # a failed run is reported, never timed
            if not ok:
                rows.append([label, "failed", "", "", "", "", ""])
                continue
            peaks[n, allocator] = peak = max(r["rss_mb"] for r in ok)
            run_s = statistics.median(r["run_s"] for r in ok)
            land = statistics.median(r.get("spent", {}).get("land", float("nan")) for r in ok)
            base = min((r.get("import_kb") or 0) * 1024 / 1e6 for r in ok)
            rows.append([label, f"{peak:.0f}", f"{base:.0f}", f"{peak - base:.0f}", f"{run_s:.2f}", f"{land:.2f}", rate(n, run_s)])
    report.table(["run", "peak RSS MB", "after imports", "job's own", "run s", "of which land", "users/s"], rows)
    figures = []
    if (FILLED, True) in peaks and (middle, True) in peaks:
        ratio = peaks[middle, True] / peaks[FILLED, True]
        figures.append(f"memory: peak at {middle:,} is {ratio:.2f}x the peak at {FILLED:,}, the first size here whose run fetches, types and splits at once")
    return {"failures": failures, "targets": memory_targets(peaks, sizes), "figures": figures}


# 12 pages: three times the four a run at concurrency 4 asks for at once, so the sort splits groups
# of staged pages while the run still fetches (a 20,000-user run fetches its four, then splits once).
FILLED = 60_000


def memory_targets(peaks: dict, sizes: tuple[int, int, int]) -> list[tuple[str, bool]]:
    """The memory targets judged on the peaks (MB by (n, image's allocator)) that were measured."""
    small, middle, large = sizes
    targets = []
    if (small, True) in peaks and (middle, True) in peaks:
        ratio = peaks[middle, True] / peaks[small, True]
        targets.append((f"memory: peak at {middle:,} within 1.25x of {small:,} ({ratio:.2f}x)", ratio <= 1.25))
    for allocator, bound in ((False, 300), (True, 250)):
        if (large, allocator) in peaks:
            how = "with the image's allocator variables" if allocator else "without the allocator variables"
            targets.append((f"memory: peak at {large:,} <= {bound} MB {how} ({peaks[large, allocator]:.0f} MB)", peaks[large, allocator] <= bound))
    return targets


# ---------------------------------------------------------------- main


def wait_quiet(limit: float, busy_below: float = 15.0, quiet_for: int = 5) -> None:
    """Wait until the CPUs have been under `busy_below`% busy for `quiet_for` seconds in a row, or `limit` s."""
    import psutil

    deadline, quiet = time.monotonic() + limit, 0
    print(f"waiting up to {limit:.0f}s for a quiet machine...", flush=True)
    while time.monotonic() < deadline and quiet < quiet_for:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1) < busy_below else 0
    print("quiet" if quiet >= quiet_for else "still busy: going ahead (see the 'other processes' lines)", flush=True)


# ---------------------------------------------------------------- pace: a long pull under the rate limit

# The service's limit, scaled down: 20,000 users per 300 s window becomes PACE_USERS per PACE_WINDOW,
# and every wait of both clients is scaled by the same factor, so each meets the limit as it would
# for real (a retry policy that gives up after 15 s of a 300 s window gives up after 0.05 s here).
PACE_WINDOW = 1.0
PACE_USERS = 1000
PACE_PAGE = 250
PACE_WINDOWS = 5  # the pull: five windows' worth of users, so at least four resets
SCALE = PACE_WINDOW / 300


def pace_job_args(url: str, out: str) -> list[str]:
    """The job's CLI for the pace pull: its default waits and retries, scaled like the window."""
    waits = {name: f"{seconds * SCALE:.6f}" for name, seconds in (("rate_limit_wait", 10), ("max_wait", 900), ("backoff", 1))}
    return cli_flags(n=PACE_USERS * PACE_WINDOWS, seed=SEED, api_url=url, output_dir=out, raw_dir=None, page_size=PACE_PAGE, concurrency=4, timeout=60, **waits)


def dlt_client(args: list[str]) -> None:
    """--_dlt URL PAGES MAX_ATTEMPTS: dlt's REST API source pulls pages 1..PAGES into duckdb; one JSON line."""
    import dlt
    from dlt.sources.helpers.rest_client.paginators import PageNumberPaginator
    from dlt.sources.rest_api import rest_api_source

    url, pages, attempts = args[0], int(args[1]), int(args[2])
    # dlt's retry settings (defaults: 5 attempts, backoff factor 1 s, at most 300 s a wait), scaled like the window.
    os.environ.update(
        RUNTIME__REQUEST_MAX_ATTEMPTS=str(attempts),
        RUNTIME__REQUEST_BACKOFF_FACTOR=f"{1 * SCALE:.6f}",
        RUNTIME__REQUEST_MAX_RETRY_DELAY=f"{300 * SCALE:.6f}",
    )
    folder = tempfile.mkdtemp(prefix="bench-dlt-")
    source = rest_api_source(
        {
            "client": {
                "base_url": url,
                "paginator": PageNumberPaginator(base_page=1, page=1, total_path=None, maximum_page=pages + 1),
            },
            "resources": [
                {
                    "name": "users",
                    "endpoint": {"path": "", "params": {"results": PACE_PAGE, "seed": SEED}, "data_selector": "results"},
                }
            ],
        }
    )
    pipeline = dlt.pipeline("pace", destination=dlt.destinations.duckdb(str(Path(folder) / "pace.duckdb")), pipelines_dir=folder)
    started = time.perf_counter()
    result = {"ok": True}
    try:
        pipeline.run(source)
    except Exception as exc:  # dlt wraps the HTTP error that ended it in PipelineStepFailed
        result = {"ok": False, "error": " ".join(str(getattr(exc, "__cause__", None) or exc).split())[:200]}
    result["run_s"] = time.perf_counter() - started
    if result["ok"]:
        with pipeline.sql_client() as sql:
            result["rows"], result["ids"] = sql.execute_sql("select count(*), count(distinct login__uuid) from users")[0]
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result), flush=True)


def bench_pace(report: Report) -> dict:
    """The job and dlt's REST API source, each alone against a fresh rate-limited fake: time, requests, whether it finishes."""
    import polars as pl
    from fake_api import FakeRandomUser

    n, pages = PACE_USERS * PACE_WINDOWS, PACE_WINDOWS * PACE_USERS // PACE_PAGE
    report(
        f"5. PACE: {n:,} users in pages of {PACE_PAGE} from a fake limited to {PACE_USERS:,} users per {PACE_WINDOW:g} s window "
        f"(randomuser.me's 20,000 per 300 s, scaled by 1/{1 / SCALE:.0f}; every wait of both clients scaled alike)"
    )
    rows, failures, ended = [], [], []
    clients = {
        "the job (defaults)": run_pace_job,
        "dlt rest_api (defaults)": lambda url: run_helper("--_dlt", [url, str(pages), "5"], "dlt"),
        "dlt rest_api, 100 attempts": lambda url: run_helper("--_dlt", [url, str(pages), "100"], "dlt"),
    }
    for name, run in clients.items():
        with FakeRandomUser(rate_limit=(PACE_USERS, PACE_WINDOW)) as fake:
            result = run(fake.url)
            asked = fake.requests
        served = [r for r in asked if r.answer == "normal"]
        refused = len(asked) - len(served)
        windows = (asked[-1].at - fake.window_start(asked[0].at)) / PACE_WINDOW if asked else math.nan
        if name.startswith("the job") and "error" not in result:
            landed = pl.read_parquet(next(Path(result["out"]).glob("random_users_*.parquet")))
            result["rows"], result["ids"] = landed.height, landed["user_id"].n_unique()
        if "out" in result:
            shutil.rmtree(result["out"], ignore_errors=True)
        finished = "error" not in result and result.get("ok", True) and result.get("rows") == n == result.get("ids")
        if not finished and name.startswith("the job"):
            failures.append(f"pace: the job did not land {n} distinct users: {result.get('error', result)}")
        if not finished:
            ended.append(f"{name}: {result.get('error') or 'landed ' + str(result.get('rows')) + ' rows'}")
        rows.append(
            [
                name,
                f"{result.get('run_s', math.nan):.2f}",
                f"{windows:.1f}",
                str(len(asked)),
                str(refused),
                "yes" if finished else "NO (below)",
            ]
        )
    report.table(["client", "run s", "windows", "requests", "refused (429)", "finished"], rows)
    floor = (PACE_WINDOWS - 1) * PACE_WINDOW
    for line in ended:
        report(f"  Gave up: {line}")
    report(f"  Floor: the pull needs {PACE_WINDOWS - 1} resets after its first request: at least {floor:g} s after it (less the first window's part).")
    return {"failures": failures, "targets": []}


# ---------------------------------------------------------------- 6. delta: the Delta sink beside the files

FORMATS = ("files", "delta")
NATIONALITY = "GB"
# What the section times, in its table's order: (what the table calls it, what the SUMMARY calls it or None, the landing, the figure from its run).
LANDINGS = ("land", "re-land")
MEASURES = (
    ("land a batch: the landing step (Run.finish)", "landing a batch (Run.finish)", "land", "step"),
    ("land a batch: the run (main)", None, "land", "run"),
    ("re-land it (the seed's rows replaced): the landing step", "re-landing it", "re-land", "step"),
    ("re-land it: the run (main)", None, "re-land", "run"),
)


def land_as(url: str, n: int, out: str, table_format: str) -> dict:
    """The job's CLI landing seed SEED into out in this table format, in a fresh process (see run_child)."""
    return run_child([*job_args(url, n, 4, out, None), "--table-format", table_format], out, "job")


def check_lake(out: str, table_format: str, expected: list[str], landings: int) -> list[str]:
    """What read_processed reads from out: the rows, unique ids, the ids in the raw keys' order; the sink's own place, and nothing else left."""
    import random_user_etl as etl
    from _random_user_etl import delta, store

    problems = []
    place = Path(delta.table_address(out) if table_format == "delta" else store.batch_path(out, SEED))
    if not place.exists():
        return [f"nothing landed at {place.name}"]
    ids = etl.read_processed(out).select("user_id").collect()["user_id"]
    if ids.len() != len(expected):
        problems.append(f"the lake holds {ids.len():,} rows, expected {len(expected):,}")
    if ids.n_unique() != ids.len():
        problems.append(f"the lake's ids repeat: {ids.len() - ids.n_unique():,} duplicates")
    elif ids.to_list() != expected:
        problems.append("the lake's ids differ from the raw JSON's" if set(ids) != set(expected) else "the lake's rows are not in the raw keys' order")
    leftovers = [p.name for p in Path(out).rglob("*") if p.is_file() and place not in (p, *p.parents) and not p.name.endswith(".lock")]
    if leftovers:
        problems.append(f"leftover files after landing: {leftovers[:3]}")
    if table_format == "delta":
        from deltalake import DeltaTable

        version = DeltaTable(str(place)).version()
        if version != landings:  # version 0 creates the table empty; then one commit per landing
            problems.append(f"the table is at version {version} after {landings} landing(s), expected {landings}")
    return problems


def time_reads(outs: dict[str, str], repeats: int, expected: list[str]) -> tuple[dict[str, list[float]], list[str]]:
    """Seconds to read one nationality from each lake with read_processed, after a warm-up, interleaved; and what was read wrong."""
    import polars as pl

    import random_user_etl as etl

    def read(out: str) -> pl.DataFrame:
        return etl.read_processed(out).filter(pl.col("nationality") == NATIONALITY).collect()

    problems = []
    for name, out in outs.items():  # warm-up (deltalake's import, the OS file cache), checked
        got = read(out)["user_id"].to_list()
        if got != expected:
            how = "are not in the raw keys' order" if sorted(got) == sorted(expected) else f"({len(got):,}) are not the raw JSON's {len(expected):,}"
            problems.append(f"delta section, {name}: the {NATIONALITY} rows read {how}")
    times = {name: [] for name in outs}
    for _ in range(repeats):
        for name, out in outs.items():
            started = time.perf_counter()
            read(out)
            times[name].append(time.perf_counter() - started)
    return times, problems


def bench_delta(report: Report, n: int, repeats: int) -> dict:
    """The Delta sink beside the files, in the same run: land a batch, re-land its seed, read one nationality; each as a ratio to the files."""
    pages = pages_of(n)
    ids = expected_order(pages)
    report(
        f"6. DELTA: the job's CLI lands n = {n:,} ({pages} pages of {PAGE:,}) with --table-format files and delta, then re-lands the seed; a read of one nationality"
    )
    report(
        "  fake API in another process, latency 0, concurrency 4, raw_dir off; each landing a fresh process, same seed, a fresh folder per format and repeat;"
        f" the formats interleaved; median of {repeats}"
    )
    report("  'landing step' = Run.finish (the sorted batch written by the sink), wrapped in the job's process; 'run' = the job's main()")
    times = {(fmt, landing, figure): [] for fmt in FORMATS for _, _, landing, figure in MEASURES}
    failures, outs = [], {}
    with fake_server(0.0, pages) as server:
        failures += [f"delta section, warm-up: {p}" for p in check_landed(run_job(server.url, PAGE, 4), PAGE, None)]
        for _ in range(repeats):
            for fmt in FORMATS:
                if fmt in outs:  # the last repeat's folders are kept for the reads
                    shutil.rmtree(outs[fmt], ignore_errors=True)
                outs[fmt] = out = tempfile.mkdtemp(prefix=f"bench-{fmt}-")
                for count, landing in enumerate(LANDINGS, start=1):
                    result = land_as(server.url, n, out, fmt)
                    if "error" in result:  # a failed landing is reported, never timed
                        failures.append(f"delta section, {fmt}, {landing}: {result['error']}")
                        continue
                    failures += [f"delta section, {fmt}, {landing}: {p}" for p in check_lake(out, fmt, ids, count)]
                    times[fmt, landing, "run"].append(result["run_s"])
                    times[fmt, landing, "step"].append(result["spent"]["land"])
    try:
        gb = expected_order(pages, NATIONALITY)
        reads, problems = time_reads(outs, max(repeats, 5), gb)
        failures += problems
    finally:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    median = lambda ts: statistics.median(ts) if ts else math.nan
    rows = [[label, short, *(median(times[fmt, landing, figure]) for fmt in FORMATS)] for label, short, landing, figure in MEASURES]
    read_label = f"read nationality {NATIONALITY} ({len(gb):,} rows): read_processed(out).filter(...).collect()"
    rows.append([read_label, f"reading {NATIONALITY}", *(median(reads[fmt]) for fmt in FORMATS)])
    report.table(["measure", "files s", "delta s", "delta / files"], [[label, f"{f:.3f}", f"{d:.3f}", f"{d / f:.2f}x"] for label, _, f, d in rows])
    figures = [f"delta at n = {n:,}: {short} takes {d / f:.2f}x the files' time ({d:.3f} s against {f:.3f} s)" for _, short, f, d in rows if short]
    return {"failures": failures, "targets": [], "figures": figures}


@functools.cache
def image_allocator() -> dict[str, str]:
    """The allocator settings the image gives the job, read from the Dockerfile so the two cannot drift apart."""
    # MALLOC_MMAP_THRESHOLD_ (glibc) and _RJEM_MALLOC_CONF (Polars' jemalloc).
    return dict(re.findall(r"\b(MALLOC_MMAP_THRESHOLD_|_RJEM_MALLOC_CONF)=(\S+)", (ROOT / "Dockerfile").read_text()))


def clean_env(allocator: bool = True) -> dict:
    """This process's environment without any RANDOM_USER_ setting or allocator setting, plus the image's allocator settings if asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDOM_USER_") and k not in image_allocator()}
    return {**env, **(image_allocator() if allocator else {})}


def run_pace_job(url: str) -> dict:
    """The job's CLI in a fresh process for the pace pull; its output folder and times."""
    out = tempfile.mkdtemp(prefix="bench-out-")
    return run_child(pace_job_args(url, out), out, "job")


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the benchmark: its --only name, its runner, and the runner's options for a run's arguments."""

    name: str
    run: Callable[..., dict]  # (report, **options) -> {"failures", "targets", and "findings" and "figures" if any}
    options: Callable[[argparse.Namespace], dict]


def repeats_or(args: argparse.Namespace, full: int) -> int:
    """--repeats if given, else one in --quick, else `full`."""
    return args.repeats or (1 if args.quick else full)


# In the order they run; --quick sizes first.
SECTIONS = (
    Section("transform", bench_transform, lambda a: {"pages": 4 if a.quick else 20, "repeats": repeats_or(a, 5)}),
    Section("replay", bench_replay, lambda a: {"n": 20_000 if a.quick else 200_000}),
    Section("e2e", bench_end_to_end, lambda a: {"n": 20_000 if a.quick else 100_000, "repeats": repeats_or(a, 3), "with_raw": a.raw}),
    Section(
        "memory",
        bench_memory,
        lambda a: {"sizes": (20_000, 100_000, 200_000) if a.quick else (20_000, 200_000, 1_000_000), "repeats": repeats_or(a, 2)},
    ),
    Section("pace", bench_pace, lambda a: {}),
    Section("delta", bench_delta, lambda a: {"n": 20_000 if a.quick else 100_000, "repeats": repeats_or(a, 3)}),
)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the rest (a helper process's arguments)."""
    parser = argparse.ArgumentParser(description="Benchmark of the Random User ETL. Offline; see benchmarks/README.md.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one repeat: a smoke run (targets indicative only)")
    parser.add_argument("--repeats", type=int, help="timed passes per measurement (default: 5 transform, 3 end to end, 2 memory; quick 1)")
    parser.add_argument("--only", choices=[s.name for s in SECTIONS], action="append", help="run only this section (repeatable)")
    parser.add_argument("--raw", action="store_true", help="also time the end-to-end run with raw answers kept (the job's default)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for other processes to leave the CPUs idle (a shared machine)",
    )
    parser.add_argument("--output", default=str(HERE / "results" / "latest.txt"), help="where to save the full output")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_dlt", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if rest and not (args._child or args._bare or args._dlt):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def summary(report: Report, results: list[dict], seconds: float) -> None:
    """Every section's targets and verdicts, figures, findings and failed checks, in one table and a few lists."""
    report("SUMMARY")
    report.table(["target", "verdict"], [[t, verdict(ok)] for r in results for t, ok in r["targets"]])
    for heading, key in (("Figures (no target):", "figures"), ("Correctness findings (not the job's):", "findings")):
        lines = [line for r in results for line in r.get(key, [])]
        if lines:
            report(f"  {heading}")
            for line in lines:
                report(f"  - {line}")
    failures = [f for r in results for f in r["failures"]]
    if failures:
        report("  ANSWER CHECKS FAILED (timings above are not valid for these):")
        for f in failures:
            report(f"  - {f}")
    else:
        report("  Answer checks: all passed (rows, ids, row order, postcodes/coordinates/dates against the raw JSON; landed files in the raw keys' order).")
    report(f"  Benchmark took {seconds:.0f}s.")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections (or a helper process's part), print and save the report; 1 if any answer check failed."""
    args, rest = parse_args(argv)
    if args._child:
        child(rest)
    if args._bare:
        bare_client(rest)
        return 0
    if args._dlt:
        dlt_client(rest)
        return 0

    from fast_pages import load_tests_modules

    load_tests_modules()
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    report = Report()
    started = time.perf_counter()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report(f"Random User ETL benchmark, {stamp}{'  [--quick: reduced sizes, targets indicative only]' if args.quick else ''}")
    report()
    results = []
    for section in SECTIONS:
        if args.only and section.name not in args.only:
            continue
        witness = CpuWitness()
        results.append(section.run(report, **section.options(args)))
        report(witness.line())
        report()
    summary(report, results, time.perf_counter() - started)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report.buffer.getvalue())
    print(f"(saved to {output})")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
