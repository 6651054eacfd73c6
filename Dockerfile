# The image every docker-compose service runs (docker compose up --build).
#
# Base image pinned to an exact release (Python 3.11.15 on Debian bookworm), not a floating
# tag. To pin it by digest as well, from a machine that reaches Docker Hub:
#   docker buildx imagetools inspect python:3.11.15-slim-bookworm   # prints "Digest: sha256:..."
# and write FROM python:3.11.15-slim-bookworm@sha256:<that digest>.
FROM python:3.11.15-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The locked dependencies first (this layer is rebuilt only when the lock file changes):
# requirements.txt without its last line ".", the application itself, installed below.
COPY requirements.txt ./
RUN grep -v '^\.$' requirements.txt > /tmp/locked.txt \
    && pip install -r /tmp/locked.txt \
    && rm /tmp/locked.txt

COPY . .
RUN pip install --no-deps . \
    && rm -rf build \
    && pip check

# Run as an unprivileged user: the code stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 rilla \
    && useradd --system --uid 10001 --gid rilla --no-create-home --home-dir /nonexistent rilla
USER 10001:10001

ENV PORT=8000
EXPOSE 8000
CMD ["rilla-bridge", "web"]
