# syntax=docker/dockerfile:1
# The Random User ETL as a batch image. Every setting comes from the environment:
# RANDOM_USER_* for the job (see `--help`), AWS_* for object storage.
#   docker build -t random-user-etl:1.0.0 .
#   docker run --rm -e RANDOM_USER_SEED=demo -v "$PWD/lake:/data" random-user-etl:1.0.0
FROM python:3.11-slim-bookworm

# MALLOC_MMAP_THRESHOLD_: glibc gives freed buffers over 128 kB (answer bodies are ~5 MB) straight
# back to the OS, so RSS follows live data; without it glibc raises its threshold after the first
# free, and peak RSS at 100,000 users measured 412 MB instead of 323 MB (benchmarks/bench.py --quick).
# _RJEM_MALLOC_CONF: Polars' own allocator (jemalloc) keeps eight arenas on two cores, and memory one
# arena frees is not reused by another; with two, peak RSS at 200,000 users measured 296 MB instead
# of 327 MB, and the run was no slower (benchmarks/bench.py, memory section).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    _RJEM_MALLOC_CONF=narenas:2

WORKDIR /app

# Runtime requirements only, with the delta extra's (--table-format delta): no test tools in the image.
COPY requirements.txt requirements-delta.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-delta.txt

# A fixed numeric uid, so Kubernetes can check runAsNonRoot against it.
RUN groupadd --gid 10001 etl \
    && useradd --uid 10001 --gid 10001 -l --no-create-home --shell /usr/sbin/nologin etl \
    && mkdir /data \
    && chown 10001:10001 /data

COPY random_user_etl.py random_user_config.py schemas.py ./
COPY _random_user_etl/*.py ./_random_user_etl/

USER 10001:10001

# Local defaults for `docker run`; a scheduled run sets RANDOM_USER_OUTPUT_DIR=s3://bucket/prefix.
# RANDOM_USER_MAX_WAIT is the longest the job waits on the service at one stretch (a Retry-After
# past it ends the run). The job is PID 1 here and handles SIGTERM (`docker stop`): it exits 143
# within 2 s, staged pages kept for the next run.
ENV RANDOM_USER_OUTPUT_DIR=/data/processed_data \
    RANDOM_USER_RAW_DIR=/data/raw_data \
    RANDOM_USER_MAX_WAIT=900

ENTRYPOINT ["python", "random_user_etl.py"]
