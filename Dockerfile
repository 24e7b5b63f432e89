# tcpproxy: a TCP proxy that obeys DNS TTLs, with DynamoDB, ElastiCache and
# YAML-file backends.
#
#   docker build -t REGISTRY/tcpproxy:TAG .
#   docker run --rm -p 8001:8001 -p 8002:8002 REGISTRY/tcpproxy:TAG \
#       --connections 8002:db.example.com:5432
#   docker push REGISTRY/tcpproxy:TAG
FROM python:3.12.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, from the packaging files and a stub of the code, so that
# a change to the code does not reinstall boto3 and the rest.
COPY setup.cfg setup.py ./
RUN mkdir tcpproxy_backends \
    && echo '__version__ = "0"' > tcpproxy.py \
    && touch tcpproxy_backends/__init__.py \
    && pip install "./[aws,yaml]" \
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
# STATUS_ADDRESS when --status is not given.
ENV STATUS_ADDRESS=0.0.0.0:8001
EXPOSE 8001

# /status answers 200 "OK" when healthy, 503 while the backend has never been
# read or while draining.  slim has no curl: use python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STATUS_ADDRESS', ':8001').rpartition(':')[2]; urllib.request.urlopen('http://127.0.0.1:%s/status' % port, timeout=4)"]

# Exec form: tcpproxy is PID 1 and receives SIGTERM itself (graceful drain).
ENTRYPOINT ["tcpproxy"]
