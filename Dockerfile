# kura: a build-artifact cache node (see README.md and docs/operations.md).
#
#   docker build -t kura .
#   docker run --rm -p 4000:4000 -v kura-cache:/var/cache/kura kura
#
# Two stages on the same Debian slim Python, so the virtualenv built in the
# first one runs unchanged in the second (same interpreter path), and the
# runtime image carries neither the source tree nor pip's build leftovers.

# The base, pinned by digest so two builds of one commit start from the same
# bytes: the multi-platform index of python:3.11-slim-bookworm (Python
# 3.11.16, bookworm of 2026-08-24) as docker-library/repo-info records it.
# Move it forward deliberately (security updates), or override it:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
# Both stages use the same image, so the virtualenv runs unchanged.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:fe556eaffd0d96abd8685b83bb8a69addd0dc730fa193669a7df0d49ddcfac02

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/kura
ENV PATH=/opt/kura/bin:$PATH

WORKDIR /src
# .dockerignore keeps the context to what packaging needs: setup.py,
# pyproject.toml, README.md (setup.py reads it), kura/ and twisted/plugins/.
COPY . .
# The same install the README documents (the node plus Twisted's HTTP/2),
# with every runtime dependency at the version constraints.txt pins, so two
# builds of one commit run the same code.
RUN pip install -c constraints.txt '.[h2]'
# Write Twisted's plugin cache now: at run time the root filesystem is
# read-only, and a stale cache would make every `twistd` start log a
# failed write instead of finding the kura plugin silently.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help | grep ' kura ' >/dev/null


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="kura" \
      org.opencontainers.image.description="Build-artifact cache node with a same-port sendfile/splice accelerator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.documentation="docs/operations.md"

# tini is PID 1: it reaps zombies and forwards every signal to twistd, so
# SIGUSR1 (drain) and SIGTERM (drain, then exit 0) reach the node. The Helm
# chart's preStop hook relies on this with `kill -USR1 1`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid (10001) so Kubernetes' runAsNonRoot can verify it
# and the chart's fsGroup matches.
RUN groupadd --system --gid 10001 kura \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin kura \
    && mkdir -p /var/cache/kura/data /var/cache/kura/tmp \
    && chown -R 10001:10001 /var/cache/kura

COPY --from=build /opt/kura /opt/kura

ENV PATH=/opt/kura/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KURA_DATA_DIR=/var/cache/kura/data \
    KURA_TMP_DIR=/var/cache/kura/tmp

VOLUME /var/cache/kura
WORKDIR /var/cache/kura
USER 10001:10001

# 4000: public HTTP (every cache protocol, accelerator, probes, /metrics).
# 4002: REAPI v2 over gRPC (Bazel grpc://, Buck2; KURA_GRPC_PORT).
# 7443: the peer plane (/_internal/*). 4443 (public HTTPS) only when TLS is
# configured, so it is not exposed by default.
EXPOSE 4000 4002 7443

# curl is not in the image; the interpreter is. /up is 200 whenever the
# process serves HTTP (readiness is /ready, which the orchestrator probes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/up' % os.environ.get('KURA_PORT', '4000'), timeout=4)"]

ENTRYPOINT ["tini", "--"]
# `--pidfile=` disables twistd's pid file (the root filesystem is read-only
# under the chart); `--nodaemon` keeps the node in the foreground under tini.
CMD ["twistd", "--nodaemon", "--pidfile=", "kura"]
