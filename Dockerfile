# tcpproxy: a TCP proxy that obeys DNS TTLs, with DynamoDB, ElastiCache and
# YAML-file backends.
#
#   docker build -t REGISTRY/tcpproxy:TAG .
#   docker run --rm -p 8001:8001 -p 8002:8002 REGISTRY/tcpproxy:TAG \
#       --connections 8002:db.example.com:5432 --status-allow 127.0.0.0/8 --status-allow 10.0.0.0/8
#   docker push REGISTRY/tcpproxy:TAG
#
# BASE_IMAGE: any Debian-like image with python3 and pip (the tests build on
# a local Debian root file system: tests/test_container.py).
ARG BASE_IMAGE=python:3.12.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, at the versions of .docker/constraints.txt, from the
# packaging files and a stub of the code, so that a change to the code does
# not reinstall boto3 and the rest.
COPY setup.cfg setup.py .docker/constraints.txt ./
RUN mkdir tcpproxy_backends \
    && echo '__version__ = "0"' > tcpproxy.py \
    && touch tcpproxy_backends/__init__.py \
    && pip install --constraint constraints.txt "./[aws,yaml]" \
    && pip uninstall --yes tcpproxy \
    && rm -rf tcpproxy.py tcpproxy_backends build ./*.egg-info \
    && useradd --system --uid 10001 --user-group --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tcpproxy

# Then the code itself.
COPY tcpproxy.py ./
COPY tcpproxy_backends/ tcpproxy_backends/
RUN pip install --no-deps . \
    && rm -rf /src

WORKDIR /
USER 10001:10001

# The status endpoints (/status, /connections) listen here; tcpproxy reads
# STATUS_ADDRESS when --status is not given.  Every interface, so that a
# load balancer can ask: restrict it with --status-allow (keep 127.0.0.0/8
# in the list, the HEALTHCHECK asks from inside the container).
ENV STATUS_ADDRESS=0.0.0.0:8001
EXPOSE 8001

# `tcpproxy health` finds the status address of the proxy running as PID 1
# and exits 0 when its /status answers 200: unhealthy while the backend has
# never been read, while it drains, or with --status off.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["tcpproxy", "health"]

# Exec form: tcpproxy is PID 1 and receives SIGTERM itself (graceful drain,
# --drain-timeout below docker stop's 10 s grace period).
ENTRYPOINT ["tcpproxy"]
