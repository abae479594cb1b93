# One image for every microapp service: `microapp serve <service>` picks which one runs.
#
# The image installs exactly the packages pinned, with their hashes, in image.lock: the lock
# `make lock` resolves from pyproject.toml (its dependencies and the two server extras), so
# two builds install the same bytes and there is no hand-kept second list to drift from it.
#
#   docker build -t microapp:local .
#   docker run --rm -p 8080:8080 microapp:local microapp serve greeter

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/microapp
WORKDIR /src
# Only what building the wheel needs (see .dockerignore): the metadata, then the sources.
COPY pyproject.toml README.md image.lock ./
COPY src ./src
# The locked packages first (every one pinned and hash-checked, nothing resolved), then `.`
# itself without resolving again: pyproject's dependencies plus the optional servers, so
# that MICROAPP_SERVER can pick any of them in compose and Kubernetes. `pip check` fails the
# build if the lock no longer satisfies pyproject (run `make lock`).
RUN /opt/microapp/bin/pip install --require-hashes --no-deps -r image.lock \
    && /opt/microapp/bin/pip install --no-deps ".[granian,pyvoy]" \
    && /opt/microapp/bin/pip check \
    && /opt/microapp/bin/python -m compileall -q /opt/microapp/lib

FROM python:${PYTHON_VERSION}-slim AS runtime
LABEL org.opencontainers.image.title="microapp" \
      org.opencontainers.image.description="Connect-protocol microservices on one ASGI stack; run one with: microapp serve <service>" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/microapp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed non-root uid/gid, so Kubernetes' runAsNonRoot can check it and mounted secrets
# can be made readable to it.
RUN groupadd --system --gid 10001 microapp \
    && useradd --system --uid 10001 --gid microapp --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin microapp
COPY --from=build /opt/microapp /opt/microapp
USER 10001:10001
WORKDIR /tmp
# Documentation only: each service listens on its own PORT (see docs/configuration.md).
EXPOSE 8080 8081 8082 8090 3000 8000
# The process is PID 1 and handles SIGTERM itself: stop accepting, finish in-flight
# requests, drain queues, close pools, exit 0.
STOPSIGNAL SIGTERM
CMD ["microapp", "--help"]
