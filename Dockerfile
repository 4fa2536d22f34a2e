# syntax=docker/dockerfile:1
# The recsys image: `recsys-serve` by default; `recsys-train` with another command (see
# docker-compose.yml). Build: docker build -t recsys-service .

# ---- builder: a virtualenv at the path the runtime stage uses (scripts' shebangs point there)
FROM python:3.11.14-slim-bookworm AS builder

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from the lock only: this layer (TensorFlow, ~1.5 GB) is rebuilt when
# requirements.lock changes, not on every source edit. --no-deps + pip check: the lock is the
# whole closure, so nothing unpinned can slip in and a missing pin fails the build.
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install pip==26.3 \
    && pip install --no-deps --requirement requirements.lock \
    && pip check

# Then the project itself (not editable: the runtime stage copies only the venv).
COPY pyproject.toml README.md ./
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && pip check

# ---- runtime: the venv on a clean base, run as an unprivileged user
FROM python:3.11.14-slim-bookworm AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RECSYS_MODEL_STORE=/models

# /models belongs to the app user so that a fresh named volume mounted there (which takes the
# mount point's ownership) is writable by the trainer.
RUN groupadd --system --gid 10001 app \
    && useradd --system --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir /models \
    && chown app:app /models

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/app

EXPOSE 8000

# Liveness only (/healthz never checks dependencies); slim has no curl, so Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["recsys-serve", "--host", "0.0.0.0", "--port", "8000"]
