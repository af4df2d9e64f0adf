"""The job end to end, as an operator runs it: flags, variables, files landed, exit statuses."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from support import FAST, GBONLY, PURA, assert_rows_are, batch_files, duplicate_first_id, fast_env, landed, raw_users, run_cli, served_users, user_rows, users
from fake_api import free_port, mutate, recorded_pages

import random_user_etl as etl


def ids_of(users) -> list[str]:
    """The user ids of raw users, sorted."""
    return sorted(u["login"]["uuid"] for u in users)


def test_python_random_user_etl_py_lands_the_recorded_users(api, out, raw):
    # The one test of the entry point itself, in a subprocess: `python random_user_etl.py` as an operator types it.
    result = run_cli("--seed", "pura", env=fast_env(api.url, out, raw))
    assert result.returncode == 0, result.stderr
    assert batch_files(out) == ["random_users_pura.parquet"]
    assert_rows_are(pl.read_parquet(out / "random_users_pura.parquet"), raw_users(PURA))
    # The default asks for 100 users, for the contract's fields only.
    (request,) = api.requests
    assert request.params["results"] == "100"
    assert set(request.params["inc"].split(",")) >= {"login", "location", "dob", "id", "nat"}
    assert "gzip" in request.headers["accept-encoding"]
    summary = result.stderr.strip().splitlines()[-1]
    assert "landed 100 rows, seed pura" in summary and "random_users_pura.parquet" in summary
    assert re.search(r", \d+ bytes, \d+\.\d\ds$", summary), summary


def test_a_flag_beats_its_variable_which_beats_the_default(api, out, raw, cli):
    env = fast_env(api.url, out, raw, RANDOM_USER_N=5, RANDOM_USER_SEED="pura")
    assert cli(env=env).returncode == 0
    assert cli("--n", "7", env=env).returncode == 0
    assert cli("--n", "8", "--seed", "gbonly", env=env).returncode == 0
    asked = [(r.params["results"], r.params["seed"]) for r in api.requests]
    assert asked == [("5", "pura"), ("7", "pura"), ("8", "gbonly")]


def test_nationalities_are_passed_on_in_the_order_given(api, out, raw, cli):
    result = cli("--seed", "mixnat", "--n", "25", "--nat", "CA,no,fr", env=fast_env(api.url, out, raw))
    assert result.returncode == 0, result.stderr
    assert api.requests[0].params["nat"] == "ca,no,fr"


def test_pages_of_the_page_size_with_the_remainder_last(api, out, raw, settings):
    batch = etl.run(settings(n=100, seed="paged", page_size=40, concurrency=1))
    asked = sorted((int(r.params["page"]), r.params["results"], r.params["seed"]) for r in api.requests)
    assert asked == [(1, "40", "paged"), (2, "40", "paged"), (3, "20", "paged")]
    pages = recorded_pages()
    want = pages[("paged", 1)] + pages[("paged", 2)] + pages[("paged", 3)][:20]
    frame = pl.read_parquet(batch.path)
    assert sorted(frame["user_id"]) == ids_of(want)
    page_of = {u["login"]["uuid"]: page for page in (1, 2, 3) for u in pages[("paged", page)]}
    assert all(page_of[uid] == page for uid, page in frame.select("user_id", "page").rows())


def test_without_a_page_size_a_run_asks_for_pages_of_the_service_maximum(api, out, raw, settings):
    batch = etl.run(settings(n=5001, seed="big"))
    asked = sorted((int(r.params["page"]), r.params["results"]) for r in api.requests)
    assert asked == [(1, "5000"), (2, "1")]
    assert pl.read_parquet(batch.path)["user_id"].n_unique() == 5001


def test_without_a_seed_the_service_picks_one_and_later_pages_reuse_it(api, out, raw, settings):
    batch = etl.run(settings(n=12, page_size=5, seed=None))
    picked = json.loads(api.sent[0])["info"]["seed"]  # the first answer is the only one asked with no seed
    assert batch.seed == picked
    assert batch_files(out) == [f"random_users_{picked}.parquet"]
    first, *later = sorted(api.requests, key=lambda r: int(r.params["page"]))
    assert "seed" not in first.params
    assert [r.params.get("seed") for r in later] == [picked, picked]
    frame = pl.read_parquet(batch.path)
    assert sorted(frame["user_id"]) == ids_of(served_users(picked, 12, 5))


def another_page(doc):
    """The answer says it is page 2."""
    doc["info"]["page"] = 2
    return doc


@pytest.mark.parametrize(
    "change, says",
    [(users(duplicate_first_id), r"login\.uuid repeats in 1 records"), (another_page, "the answer is for page 2")],
    ids=["contract", "another-page"],
)
def test_a_first_page_that_fails_its_check_when_the_service_picks_the_seed_is_kept_as_rejected_under_that_seed(change, says, api, out, raw, settings):
    api.script(mutate(change))
    with pytest.raises(etl.EtlError, match=f"^page 1: .*{says}"):
        etl.run(settings(n=12, page_size=5, seed=None))
    picked = json.loads(api.sent[0])["info"]["seed"]
    assert sorted(landed(raw)) == [f"{picked}/rejected-page-00001.json.gz"]
    assert batch_files(out) == [] and len(api.requests) == 1


def test_a_rerun_of_a_seed_replaces_its_batch(api, out, raw, settings):
    etl.run(settings(seed="pura"))
    first = pl.read_parquet(out / "random_users_pura.parquet")
    etl.run(settings(seed="pura"))
    assert batch_files(out) == ["random_users_pura.parquet"]
    again = etl.read_processed(str(out)).collect()
    assert again.height == 100 and again["user_id"].n_unique() == 100
    assert again.drop("ingested_at").equals(first.drop("ingested_at"))
    assert again["ingested_at"].unique().to_list() != first["ingested_at"].unique().to_list(), "the file was not replaced"


def test_an_unreachable_service_fails_cleanly(out, raw, cli):
    dead = f"http://127.0.0.1:{free_port()}/api/1.4/"
    result = cli("--seed", "pura", "--retries", "1", env=fast_env(dead, out, raw))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("random_user_etl.py: error: page 1: cannot reach")
    assert "Traceback" not in result.stderr
    assert batch_files(out) == [] and not any(raw.rglob("*.gz"))
    assert sorted(p.name for p in out.rglob("*")) == [".staging", "pura.lock"], "only the seed's empty lock file"


@pytest.mark.parametrize(
    "args, env, names",
    [
        (["--n", "abc"], {}, "--n"),
        (["--n", "0"], {}, "--n"),
        (["--n", "2.5"], {}, "--n"),
        (["--n", "50000001"], {}, "--n"),
        ([], {"RANDOM_USER_N": "-3"}, "--n"),
        ([], {"RANDOM_USER_N": "many"}, "RANDOM_USER_N"),
        (["--nat", "xx"], {}, "--nat"),
        (["--nat", "us,zz"], {}, "'zz'"),
        ([], {"RANDOM_USER_NAT": "gb,qq"}, "'qq'"),
        (["--timeout", "0"], {}, "--timeout"),
        (["--timeout", "soon"], {}, "--timeout"),
        (["--retries", "-1"], {}, "--retries"),
        (["--concurrency", "0"], {}, "--concurrency"),
        (["--page-size", "6000"], {}, "--page-size"),
        (["--api-url", "ftp://example.com/"], {}, "--api-url"),
        (["--api-url", "http://example.com/api/"], {}, "plain http://"),
        (["--seed", "../escape"], {}, "--seed"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
    ],
)
def test_each_invalid_setting_exits_2_with_one_line(args, env, names, nowhere, out, raw, cli):
    # No server: the API address refuses, so a run that went on to make a request would exit 1, not 2.
    result = cli(*args, env={**fast_env(nowhere, out, raw), **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("random_user_etl.py: error:") and names in lines[0]
    assert not out.exists() and not raw.exists()


def test_help_lists_every_flag(cli):
    from random_user_config import SETTINGS

    result = cli("--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in result.stdout and setting.env in result.stdout


def test_read_processed_of_an_empty_folder_is_an_empty_frame(tmp_path):
    from schemas import OUTPUT_SCHEMA

    frame = etl.read_processed(str(tmp_path))  # a missing folder is an error: see test_folders.py
    assert isinstance(frame, pl.LazyFrame)
    assert frame.collect_schema() == OUTPUT_SCHEMA and frame.collect().height == 0


def test_read_processed_gives_every_batch_as_one_lazy_frame(api, out, raw, settings):
    etl.run(settings(seed="pura"))
    etl.run(settings(seed="gbonly", n=25))
    lake = etl.read_processed(str(out))
    assert isinstance(lake, pl.LazyFrame)
    counts = dict(lake.group_by("seed").len().collect().rows())
    assert counts == {"pura": 100, "gbonly": 25}
    assert_rows_are(lake.collect(), raw_users(PURA, GBONLY))
    gb = lake.filter(pl.col("nationality") == "GB").select("postcode").collect()["postcode"].to_list()
    assert sorted(gb) == sorted(row["postcode"] for row in user_rows(raw_users(PURA, GBONLY)).values() if row["nationality"] == "GB")


def help_lines(cli) -> dict[str, str]:
    """`--help` in this process, wide enough that each flag is one line: the line of each flag."""
    result = cli("--help", env={"COLUMNS": 1000})
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  --")]
    return {line.split()[0]: line for line in lines}


def shown(value) -> str:
    """A default as an operator would type it: false, 30, 2.5, the path."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_setting_has_a_flag_whose_help_shows_its_default_once(cli):
    import dataclasses

    from random_user_config import SETTINGS, Settings

    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(Settings)]
    lines, defaults = help_lines(cli), Settings()
    for setting in SETTINGS:
        line, value = lines[setting.flag], getattr(defaults, setting.name)
        assert line.endswith(f"[{setting.env}]") and line.count("(default") == 1, line
        if value in (None, ()):  # no value to show: the words say what happens
            assert re.search(r"\(default: [a-z ]+\)", line), line
        else:
            assert f"(default {shown(value)})" in line, line


def test_allow_http_is_a_plain_switch(cli):
    from random_user_config import load_settings

    assert help_lines(cli)["--allow-http"].split()[1] == "allow"  # no value after the flag
    flags = vars(etl.build_parser().parse_args(["--allow-http"]))
    assert load_settings({k: v for k, v in flags.items() if k not in ("verbose", "replay")}, environ={}).allow_http is True
    result = cli("--allow-http", "false")
    assert result.returncode == 2 and "unrecognized arguments: false" in result.stderr


# ---------------------------------------------------------------- the front door: flags, help, version, default folders


@pytest.mark.parametrize(
    "args, says",
    [
        (["--output", "elsewhere"], "unrecognized arguments: --output elsewhere; did you mean --output-dir?"),  # a prefix is not a flag
        (["--seeed", "demo"], "unrecognized arguments: --seeed demo; did you mean --seed?"),
        (["--retires=1"], "unrecognized arguments: --retires=1; did you mean --retries?"),
        (["--zzz"], "unrecognized arguments: --zzz"),
    ],
)
def test_an_unknown_or_abbreviated_flag_is_refused_naming_the_nearest_real_one(args, says, nowhere, out, raw, tmp_path, cli):
    result = cli(*args, env=fast_env(nowhere, out, raw), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"random_user_etl.py: error: {says} (see --help)"]
    assert sorted(tmp_path.iterdir()) == [], "nothing made, not even the flag's folder"


def test_help_ends_with_examples_and_the_exit_statuses(cli):
    result = cli("--help", env={"COLUMNS": 1000})
    assert result.returncode == 0
    tail = result.stdout[result.stdout.index("examples") :].splitlines()
    assert any(line.strip().startswith("random-user-etl --n 500 --seed demo") for line in tail)
    statuses = {line.split()[0]: line for line in tail[tail.index("exit status:") + 1 :] if line.strip()}
    assert list(statuses) == ["0", "1", "2", "130", "143"], tail
    assert "landed" in statuses["0"] and "SIGINT" in statuses["130"] and "SIGTERM" in statuses["143"]


def test_version_prints_the_package_version(cli):
    from _random_user_etl import __version__

    result = cli("--version")
    assert (result.returncode, result.stdout) == (0, f"random-user-etl {__version__}\n")


@pytest.mark.parametrize(
    "args, env, line",
    [
        (["--n", "1.5"], {}, "--n (RANDOM_USER_N) must be a whole number, got '1.5'"),
        ([], {"RANDOM_USER_N": "1.5"}, "RANDOM_USER_N must be a whole number, got '1.5'"),
        (["--nat", "us,,gb"], {}, "--nat (RANDOM_USER_NAT) has an empty item, got 'us,,gb'"),
        (["--nat", "us,"], {}, "--nat (RANDOM_USER_NAT) has an empty item, got 'us,'"),
        ([], {"RANDOM_USER_NAT": " ,gb"}, "RANDOM_USER_NAT has an empty item, got ' ,gb'"),
    ],
)
def test_a_bad_flag_value_names_the_flag_and_its_variable_and_a_list_with_an_empty_item_is_refused(args, env, line, nowhere, out, raw, cli):
    result = cli(*args, env={**fast_env(nowhere, out, raw), **env})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"random_user_etl.py: error: {line}"]
    assert not out.exists() and not raw.exists()


def test_the_default_folders_are_in_the_working_folder_and_help_shows_them(api, tmp_path, cli):
    from random_user_config import Settings

    here = tmp_path / "here"
    here.mkdir()
    env = {f"RANDOM_USER_{k.upper()}": v for k, v in FAST.items()} | {"RANDOM_USER_API_URL": api.url}
    lines = {line.split()[0]: line for line in cli("--help", env={"COLUMNS": 1000}, cwd=here).stdout.splitlines() if line.startswith("  --")}
    assert f"(default {here / 'processed_data'})" in lines["--output-dir"]
    assert f"(default {here / 'raw_data'})" in lines["--raw-dir"]
    result = cli("--seed", "pura", env=env, cwd=here)
    assert result.returncode == 0, result.stderr
    assert batch_files(here / "processed_data") == ["random_users_pura.parquet"]
    assert sorted(landed(here / "raw_data")) == ["pura/page-00001.json.gz"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(here)
        made = Settings()
        assert etl.read_processed().collect().height == 100
    assert (made.output_dir, made.raw_dir) == (str(here / "processed_data"), str(here / "raw_data"))  # absolute, fixed when made


def test_a_run_with_nat_lands_users_of_those_nationalities_only(api, out, raw, settings):
    from fake_api import page_body

    batch = etl.run(settings(seed="pura", nat=("gb", "ie")))
    assert api.requests[0].params["nat"] == "gb,ie"
    frame = pl.read_parquet(batch.path)
    assert set(frame["nationality"]) == {"GB", "IE"}
    assert_rows_are(frame, json.loads(page_body("pura", 1, 100, nat="gb,ie"))["results"])


@pytest.mark.parametrize("setting", [s.env for s in __import__("random_user_config").SETTINGS])
def test_an_empty_variable_stops_the_cli_with_one_line_naming_it_before_any_request(setting, nowhere, out, raw, cli, tmp_path):
    # No server: the API address refuses, so a run that went on to make a request would exit 1, not 2.
    result = cli(env={**fast_env(nowhere, out, raw), setting: ""}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"random_user_etl.py: error: {setting} is set but empty; unset it for the default"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--raw-dir", "--seed", "--output-dir", "--nat"])
def test_an_empty_flag_value_stops_the_cli_with_one_line_naming_it(flag, nowhere, out, raw, cli, tmp_path):
    result = cli(flag, "", env=fast_env(nowhere, out, raw), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"random_user_etl.py: error: {flag} is empty; leave it out for the default"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_told_raw_dir_off_from_python_keeps_no_raw_answers_and_makes_no_folder_named_off(api, out, raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch = etl.run(etl.Settings(api_url=api.url, output_dir=str(out), timeout=2.0), seed="pura", raw_dir="off")
    assert_rows_are(pl.read_parquet(batch.path), raw_users(PURA))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# Every scheme but s3:// (any case) is refused before any request: http:// would send the batch's
# personal data in clear to that host; the others failed only after the whole fetch, some asking
# cloud metadata addresses for credentials on the way.
OTHER_SCHEMES = [
    "http://127.0.0.1:9/lake",
    "https://lake.invalid/lake",
    "ftp://lake.invalid/lake",
    "memory://lake/x",
    "gs://lake/x",
    "gcs://lake/x",
    "az://lake/x",
    "abfss://lake@acct/x",
    "hf://datasets/lake",
    "file:///tmp/lake",
    "s3a://lake-bucket/x",
    "r2://lake/x",
]
BAD_BUCKETS = ["s3://", "s3:///lake", "s3://ab/lake", "s3://Lake_Bucket/x", "s3://192.168.1.1/x", "s3://a..b/x", "s3://user:secret@lake-bucket/x"]
OTHER_SCHEMES.append("http://user:secret@127.0.0.1:9/lake")
BAD_PREFIXES = ["s3://lake-bucket//x", "s3://lake-bucket/./x", "s3://lake-bucket/x/../y", "s3://lake-bucket/x?y=1", "s3://lake-bucket/x*"]


@pytest.mark.parametrize("address", OTHER_SCHEMES + BAD_BUCKETS + BAD_PREFIXES)
def test_an_output_address_other_than_a_folder_or_s3_bucket_prefix_is_refused_before_any_request(address, api, raw, cli, tmp_path, nowhere):
    # Were it let through, the store and its credentials would be asked on loopback, where nothing answers.
    store = {"AWS_ENDPOINT_URL": nowhere, "AWS_METADATA_ENDPOINT": nowhere, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    result = cli("--seed", "pura", "--output-dir", address, env=fast_env(api.url, tmp_path / "unused", raw, **store), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.match(
        r"random_user_etl.py: error: --output-dir \(RANDOM_USER_OUTPUT_DIR\) (is an? [^ ]+:// address, got .*; use a plain path for a local folder, or s3://bucket/prefix$|names no valid bucket|has a prefix|'[^']*' holds)",
        line,
    ), line
    assert "secret" not in line
    assert api.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_panic_inside_polars_is_one_line_of_unexpected_failure(cli, monkeypatch, nowhere, out, raw):
    # Polars raises a panic of its Rust code as a BaseException, which a plain `except Exception` lets through.
    def panics(settings, stop=None):
        raise pl.exceptions.PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(etl, "run", panics)
    result = cli("--seed", "pura", env=fast_env(nowhere, out, raw))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("random_user_etl.py: error: unexpected PanicException:"), line


def test_read_processed_refuses_an_empty_output_variable_rather_than_reading_the_default_lake(monkeypatch):
    from random_user_config import SettingsError

    monkeypatch.setenv("RANDOM_USER_OUTPUT_DIR", "")
    with pytest.raises(SettingsError, match=r"^RANDOM_USER_OUTPUT_DIR is set but empty"):
        etl.read_processed()


@pytest.mark.parametrize(
    "setting, value",
    [
        ("RANDOM_USER_RAW_DIR", "\ufeffoff"),  # a BOM an editor left before the word: it once kept answers in a folder of that name
        ("RANDOM_USER_RAW_DIR", "off\u200b"),
        ("RANDOM_USER_OUTPUT_DIR", "\ufeff"),
        ("RANDOM_USER_OUTPUT_DIR", "lake\u202e"),
    ],
    ids=["bom-off", "zero-width-off", "only-a-bom", "bidi"],
)
def test_an_invisible_character_in_a_folder_setting_stops_the_cli_with_one_line_before_any_request(setting, value, nowhere, out, raw, cli, tmp_path):
    result = cli(env={**fast_env(nowhere, out, raw), setting: value}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(rf"random_user_etl\.py: error: --\S+ \({setting}\) holds an invisible character, got '[^']*\\u[0-9a-f]{{4}}[^']*'", line), line
    assert list(tmp_path.iterdir()) == [] and not out.exists() and not raw.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--api-urll", "https://user:hunter2secret@example.com/api/?token=abcd1234efgh"],  # a misspelt flag, its value a secret
        ["--api-urll=https://user:hunter2secret@example.com/api/?token=abcd1234efgh"],
        ["--fo\x1b[31mo", "\x07bell"],  # control characters typed, or pasted, on the command line
    ],
)
def test_a_bad_flag_is_echoed_escaped_and_without_its_secrets(args, nowhere, out, raw, cli):
    result = cli(*args, env=fast_env(nowhere, out, raw))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "hunter2secret" not in line and "abcd1234efgh" not in line, line
    assert line.isprintable(), repr(line)


@pytest.mark.parametrize("lake", ["gs://lake-bucket/x", "http://127.0.0.1:9/lake", "memory://lake/x", ""])
def test_read_processed_takes_the_destinations_a_run_takes_and_no_other(lake, monkeypatch):
    from random_user_config import SettingsError

    # Were one let through, its store and credentials would be asked on loopback, where nothing answers.
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SettingsError):
        etl.read_processed(lake).collect()


@pytest.mark.parametrize(
    "value",
    [" lake", "lake\n", "lake\u200b", "\ufeffoff", "s3://Bad_Bucket/x", "gs://lake-bucket/x"],
    ids=["leading-space", "trailing-newline", "zero-width", "bom", "bad-bucket", "other-scheme"],
)
def test_read_processed_refuses_an_output_variable_a_run_refuses_with_the_runs_line(value, monkeypatch, tmp_path):
    from random_user_config import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)  # a folder named like the value, were it made, would be made here
    with pytest.raises(SettingsError) as run_refused:
        load_settings(environ={"RANDOM_USER_OUTPUT_DIR": value})
    monkeypatch.setenv("RANDOM_USER_OUTPUT_DIR", value)
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")  # nothing of a store may be asked
    with pytest.raises(SettingsError) as read_refused:
        etl.read_processed().collect()
    assert str(read_refused.value) == str(run_refused.value)
    assert list(tmp_path.iterdir()) == []


def test_each_setting_is_declared_once_on_its_field_and_its_flag_and_variable_come_from_its_name():
    import dataclasses

    from random_user_config import SETTINGS, Settings

    fields = dataclasses.fields(Settings)
    assert [s.name for s in SETTINGS] == [f.name for f in fields]
    for setting, field in zip(SETTINGS, fields, strict=True):
        declared = field.metadata["setting"]  # the field's one declaration: its help, its parser, its range
        assert (setting.help, setting.parse, setting.flag_options) == (declared.help, declared.parse, declared.flag_options)
        assert setting.flag == "--" + field.name.replace("_", "-")
        assert setting.env == "RANDOM_USER_" + field.name.upper()
