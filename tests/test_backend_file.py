"""The YAML file backend: parsing, change detection, a running proxy that
follows the file, SIGHUP, and an invalid edit that keeps the mappings."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import (
    LOOP4,
    EchoServer,
    closed_by_peer,
    echoes,
    free_port,
    free_ports,
    greeting,
    refused,
    talk,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcpproxy
from tcpproxy_backends import file as file_backend

ROOT = Path(__file__).resolve().parents[1]
Mapping = tcpproxy.Mapping


def parse(text):
    return file_backend.parse_config(text, "m.yaml")[0]


def write(path, text):
    """Replace *path* atomically, as an operator should."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def backend_for(path, settle=0.0):
    backend = file_backend.Backend(SimpleNamespace(config=str(path)))
    backend.settle = settle               # read a changed file at once
    return backend


# Parsing #####################################################################

def test_long_and_short_forms():
    text = """
x-office: &office [10.0.0.0/8, 192.168.1.7/24]
mappings:
  - listen: 8002
    target: db.example.com:5432      # or host/port keys
    allow: [10.0.0.0/8]
    max_connections: 100
  - "8003:cache.example.com:6379"    # short form too
  - listen: "8004"
    host: 2001:db8::10
    port: 5432
    allow: *office
  - {listen: 8005, target: "[::1]:22", allow: "127.0.0.1, 127.0.0.2/31"}
"""
    assert parse(text) == [
        Mapping(8002, "db.example.com", 5432, allow=("10.0.0.0/8",), max_connections=100),
        Mapping(8003, "cache.example.com", 6379),
        Mapping(8004, "2001:db8::10", 5432, allow=("10.0.0.0/8", "192.168.1.0/24")),
        Mapping(8005, "::1", 22, allow=("127.0.0.1/32", "127.0.0.2/31")),
    ]


def test_empty_list_means_no_mappings():
    assert parse("mappings: []\n") == []


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("# nothing but a comment\n", "is empty"),
    ("mappings:\n", r"line 1: 'mappings' must be a list .*not empty"),
    ("mappings: {listen: 1}\n", "line 1: 'mappings' must be a list"),
    ("- 8002:a:1\n", "line 1: expected a mapping with a 'mappings' list"),
    ("mapings: []\n", r"line 1: unknown top-level key 'mapings'"),
    ("other: 1\n", "unknown top-level key 'other'"),
    ("x-note: fine\n", "no 'mappings' list"),
    ("mappings:\n  - listen: 8002\n    target: a:1\n   bad: indent\n", "line 4 column 4"),
    ("mappings: [\n  '8002:a:1',\n", "line 3 column 1"),
    ("mappings:\n  - \"8002:a:1\n", r"line 3 column 1: while scanning a quoted scalar"),
    ("mappings: []\n---\nmappings: []\n", "line 2 column 1: expected a single document"),
    ("mappings: [*nope]\n", "line 1 column 12: found undefined alias"),
    ("mappings:\n  - !!python/object:os.system {}\n", "line 2 column 5: could not determine"),
    ("mappings:\n  - '8002:a:1'\x00\n", "line 2 column 15: character 0x0 is not allowed"),
    ("mappings: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply|must be"),
])
def test_file_level_errors_name_the_line(text, match):
    with pytest.raises(tcpproxy.BackendError, match=match) as info:
        parse(text)
    assert "m.yaml" in str(info.value)


def test_any_bad_entry_rejects_the_whole_file_naming_each():
    text = """mappings:
  - listen: 8002
    target: good.example.com:1
  - "nonsense"
  - listen: 8003
    tagret: typo.example.com:1
  - listen: 99999
    target: big.example.com:1
  - listen: 8004
    target: acl.example.com:1
    allow: [not-a-network]
  - listen: 8005
    target: max.example.com:1
    max_connections: -3
  - listen: 8002
    target: duplicate.example.com:1
  - 8006
  - listen: 8007
    host: both.example.com
    port: 1
    target: both.example.com:1
  - listen: 8008
    host: good2.example.com
    port: 2
"""
    with pytest.raises(tcpproxy.ConfigRejected) as info:
        file_backend.parse_config(text, "m.yaml")
    message = str(info.value)
    for line, reason in [(4, "nonsense"), (5, "'tagret'"), (7, "99999"),
                         (9, "not-a-network"), (12, "-3"), (17, "8006"), (18, "not both")]:
        assert "m.yaml line %d" % line in message
        assert reason in message
    assert "listen port 8002 is used twice" in message
    assert "nothing applied" in message


@pytest.mark.parametrize("text, match", [
    ("mappings: []\nmappings: ['8002:a:1']\n", (r"line 2 column 1: found duplicate key "
     r"'mappings' \(first at line 1\)")),
    ("mappings:\n  - listen: 8002\n    target: a:1\n    target: b:1\n",
     r"line 4 column 5: found duplicate key 'target'"),
    ("mappings:\n  - {listen: 8002, target: a:1, listen: 8003}\n", "duplicate key 'listen'"),
])
def test_a_repeated_key_rejects_the_file(text, match):
    with pytest.raises(tcpproxy.ConfigRejected, match=match):
        parse(text)


def test_an_alias_bomb_is_refused_without_expanding_it():
    lines = [("x-a: &a [10.0.0.0/8, 10.0.0.0/8, 10.0.0.0/8, 10.0.0.0/8, 10.0.0.0/8, "
             "10.0.0.0/8, 10.0.0.0/8, 10.0.0.0/8, 10.0.0.0/8]")]
    previous = "a"
    for level in "bcdefghi":
        lines.append("x-%s: &%s [%s]" % (level, level, ", ".join(["*" + previous] * 9)))
        previous = level
    lines.append("mappings:\n  - listen: 8002\n    target: a:1\n    allow: *i\n")
    text = "\n".join(lines)
    assert len(text) < 1000
    started = time.monotonic()
    with pytest.raises(tcpproxy.ConfigRejected, match="more than 100000 YAML nodes") as info:
        parse(text)
    assert time.monotonic() - started < 2
    assert len(str(info.value)) < 300


def test_a_nested_bad_value_is_named_briefly():
    text = "x-a: &a [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]\nmappings:\n" \
           "  - {listen: 8002, target: a:1, allow: [*a, *a, *a, *a, *a, *a]}\n"
    with pytest.raises(tcpproxy.ConfigRejected) as info:
        parse(text)
    assert "allow entry" in str(info.value) and len(str(info.value)) < 400


YAMLISH = st.text(alphabet=st.sampled_from(
    list("mappings:listen target host port allow max_connections x-") +
    list("-[]{}\n '\"&*!,.0123456789:/#|>?%@`\\\t") + ["\x00", "\ufeff", "\u00e9"]),
    max_size=200)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["listen", "target", "host", "port", "allow", "max_connections"])
        | st.text(max_size=5), inner, max_size=5),
    max_leaves=20)


def parsed_or_clear_error(text):
    try:
        mappings, _ = file_backend.parse_config(text, "m.yaml")
    except tcpproxy.BackendError as exc:
        assert str(exc).startswith("m.yaml")
        return
    assert all(isinstance(m, Mapping) for m in mappings)
    assert len({m.listen_port for m in mappings}) == len(mappings)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(YAMLISH)
def test_any_text_gives_mappings_or_a_clear_error(text):
    logging.disable(logging.ERROR)
    try:
        parsed_or_clear_error(text)
    finally:
        logging.disable(logging.NOTSET)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(VALUES, max_size=5))
def test_any_entries_give_mappings_or_a_clear_error(entries):
    logging.disable(logging.ERROR)
    try:
        parsed_or_clear_error(yaml.safe_dump({"mappings": entries}))
    finally:
        logging.disable(logging.NOTSET)


# The backend object ##########################################################

def test_unchanged_file_is_not_parsed_again(tmp_path, monkeypatch):
    path = tmp_path / "m.yaml"
    write(path, "mappings: ['8002:a.example.com:1']\n")
    backend = backend_for(path)
    calls = []
    real = file_backend.parse_config
    monkeypatch.setattr(file_backend, "parse_config",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    first = backend.fetch()
    assert backend.fetch() == first == [Mapping(8002, "a.example.com", 1)]
    assert len(calls) == 1
    backend.reload()                      # SIGHUP: re-read whatever stat says
    assert backend.fetch() == first
    assert len(calls) == 2
    write(path, "mappings: ['8002:b.example.com:1']\n")
    assert backend.fetch() == [Mapping(8002, "b.example.com", 1)]
    assert len(calls) == 3
    assert backend.describe() == {"config": str(path)}


def test_invalid_file_fails_every_poll_until_fixed(tmp_path):
    path = tmp_path / "m.yaml"
    write(path, "mappings: ['8002:a.example.com:1']\n")
    backend = backend_for(path)
    assert backend.fetch() == [Mapping(8002, "a.example.com", 1)]
    write(path, "mappings: [\n")
    for _ in range(2):
        with pytest.raises(tcpproxy.BackendError, match="m.yaml line 2 column 1"):
            backend.fetch()
    path.write_bytes(b"mappings: ['\xff']\n")
    with pytest.raises(tcpproxy.BackendError, match="not UTF-8"):
        backend.fetch()
    path.unlink()
    with pytest.raises(tcpproxy.BackendError, match="cannot read .*m.yaml"):
        backend.fetch()
    write(path, "mappings: ['8003:a.example.com:1']\n")
    assert backend.fetch() == [Mapping(8003, "a.example.com", 1)]


def test_missing_config_flag_is_a_config_error():
    with pytest.raises(tcpproxy.ConfigError, match="--config"):
        file_backend.Backend(SimpleNamespace())


def test_missing_pyyaml_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(tcpproxy.BackendError, match=r"pip install 'tcpproxy\[yaml\]'"):
        backend_for(tmp_path / "m.yaml")


def test_loaded_by_name_with_a_one_second_interval(tmp_path):
    backend = tcpproxy.load_backend("file", SimpleNamespace(config=str(tmp_path / "m.yaml")))
    assert backend.name == "file" and backend.interval == 1.0


# With a running proxy ########################################################

@pytest.fixture
def running(tmp_path):
    path = tmp_path / "mappings.yaml"
    write(path, "mappings: []\n")
    backend = backend_for(path)
    with tcpproxy.Proxy(listen_host=LOOP4, connect_timeout=2.0) as proxy:
        poller = tcpproxy.BackendPoller(proxy, backend).start()
        try:
            yield SimpleNamespace(path=path, proxy=proxy, poller=poller)
        finally:
            poller.stop()
            assert not poller._thread.is_alive()


def test_proxy_follows_the_file(running):
    assert running.poller.interval == 1.0
    one, two = free_ports(2)
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        write(running.path, "mappings:\n  - listen: %d\n    target: %s\n  - '%d:%s'\n"
              % (one, a.hostport, two, a.hostport))
        wait_until(lambda: greeting(one) == "A" and greeting(two) == "A", timeout=10)
        conn_one, _ = talk(one)
        conn_two, _ = talk(two)
        try:
            # an in-place edit (no rename): one moves to B, two is removed
            running.path.write_text("mappings:\n  - listen: %d\n    target: %s\n"
                                    % (one, b.hostport))
            wait_until(lambda: greeting(one) == "B", timeout=10)
            wait_until(lambda: refused(two), timeout=10)
            assert closed_by_peer(conn_two)           # removed: its connections are closed
            assert echoes(conn_one)                   # changed target: open ones stay
        finally:
            conn_one.close()
            conn_two.close()


def test_invalid_edit_keeps_the_mappings(running):
    port, other = free_ports(2)
    with EchoServer(tag="A") as a:
        write(running.path, "mappings:\n  - '%d:%s'\n" % (port, a.hostport))
        wait_until(lambda: greeting(port) == "A", timeout=10)
        conn, _ = talk(port)
        try:
            write(running.path, "mappings:\n  - '%d:%s'\n  - listen: [\n" % (other, a.hostport))
            wait_until(lambda: "mappings.yaml line 4" in (
                running.proxy.status()["backend"].get("error") or ""), timeout=10)
            status = running.proxy.status()
            assert "mappings.yaml line 4" in status["backend"]["error"]
            assert greeting(port) == "A" and echoes(conn)
            assert refused(other)
            assert [m.listen_port for m in running.proxy.mappings] == [port]
            # fixed: applies
            write(running.path, "mappings:\n  - '%d:%s'\n  - '%d:%s'\n"
                  % (port, a.hostport, other, a.hostport))
            wait_until(lambda: greeting(other) == "A", timeout=10)
            assert echoes(conn)
            assert running.proxy.status()["backend"]["error"] is None
        finally:
            conn.close()


# The command line ############################################################

class CLI:
    """``python tcpproxy.py ...`` in a subprocess; stderr goes to a file."""

    def __init__(self, tmp_path, *args):
        self.status_port = free_port()
        self.log_path = tmp_path / "stderr.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the process's stderr
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tcpproxy.py"), "--listen-address", LOOP4,
             "--status", "%s:%d" % (LOOP4, self.status_port), "--debug", "1"] + list(args),
            cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log)

    def stderr(self):
        return self.log_path.read_text(errors="replace")

    def status(self):
        url = "http://%s:%d/status?format=json" % (LOOP4, self.status_port)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            return json.load(exc)
        except OSError:
            return None

    def backend_error(self):
        """The backend's error in /status?format=json, or ''."""
        status = self.status() or {}
        return (status.get("backend") or {}).get("error") or ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def test_sighup_rereads_the_file(tmp_path):
    path = tmp_path / "mappings.yaml"
    port = free_port()
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        first = "mappings:\n  - '%d:%s'\n" % (port, a.hostport)
        second = "mappings:\n  - '%d:%s'\n" % (port, b.hostport)
        assert len(first) == len(second)          # same size: stat cannot tell them apart
        write(path, first)
        cli = CLI(tmp_path, "--backend", "file", "--config", str(path))
        try:
            wait_until(lambda: greeting(port) == "A", timeout=20,
                       message=lambda: "proxy never served the file: %s" % cli.stderr())
            before = os.stat(path)
            with open(path, "r+") as f:           # in place, same size, then the old mtime
                f.write(second)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = os.stat(path)
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
                (before.st_ino, before.st_size, before.st_mtime_ns)
            cli.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: greeting(port) == "B", timeout=10,
                       message=lambda: "SIGHUP did not re-read the file: %s" % cli.stderr())
            # an invalid edit keeps the mapping, and /status names the line
            write(path, "mappings:\n  - '%d:%s'\n  oops\n" % (port, a.hostport))
            cli.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "(line 3 column 3)" in cli.backend_error(), timeout=10,
                       message=lambda: "no error in /status: %s" % cli.stderr())
            assert greeting(port) == "B"
        finally:
            code = cli.stop()
        log = cli.stderr()
        assert code == 0, log
        assert "Traceback" not in log
        assert "mapping changed" in log          # A -> B, once
        assert log.count("mapping changed") == 1, log


def test_cli_missing_config_is_one_clear_line(tmp_path):
    cli = CLI(tmp_path, "--backend", "file")
    try:
        cli.proc.wait(20)
    finally:
        code = cli.stop()
    log = cli.stderr()
    assert code == 2, log
    assert "--config" in log
    assert "Traceback" not in log


def test_a_device_or_an_oversized_file_is_rejected_unread(tmp_path):
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    with pytest.raises(tcpproxy.ConfigRejected, match="is not a regular file"):
        backend_for(zero).fetch()
    big = tmp_path / "big.yaml"
    write(big, "mappings: ['8002:a.example.com:1']\n" + "#" * file_backend.MAX_BYTES)
    with pytest.raises(tcpproxy.ConfigRejected, match=r"more than the 1048576 allowed"):
        backend_for(big).fetch()
    backend = file_backend.Backend(SimpleNamespace(config=str(big), config_max_bytes=2 << 20))
    backend.settle = 0
    assert backend.fetch() == [Mapping(8002, "a.example.com", 1)]


def test_a_file_being_written_waits_until_it_settles(tmp_path):
    path = tmp_path / "m.yaml"
    write(path, "mappings: ['8002:a.example.com:1', '8003:a.example.com:1']\n")
    os.utime(path, (time.time() - 10, time.time() - 10))
    backend = backend_for(path, settle=1.0)
    assert len(backend.fetch()) == 2
    with open(path, "w") as f:                    # truncate, then half of the new text
        f.write("mappings: ['8002:a.example.com:1']\n")
        f.flush()
        with pytest.raises(tcpproxy.ConfigPending):
            backend.fetch()                      # fresh: not read yet
        f.write("# the rest\n")
    with pytest.raises(tcpproxy.ConfigPending):
        backend.fetch()                          # changed again since: still waiting
    assert backend.fetch() == [Mapping(8002, "a.example.com", 1)]   # unchanged twice: read


def test_yaml_listen_address_serves_one_port_on_two_addresses(running):
    port = free_port()
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        write(running.path, "mappings:\n  - listen: 127.0.0.2:%d\n    target: %s\n"
              "  - listen: '127.0.0.3:%d'\n    host: %s\n    port: %d\n"
              % (port, a.hostport, port, LOOP4, b.port))
        wait_until(lambda: greeting(port, host="127.0.0.2") == "A"
                   and greeting(port, host="127.0.0.3") == "B", timeout=10)
        assert greeting(port) is None                    # not on --listen-address
        # the short form, and the first mapping moved to 127.0.0.4 on the same port
        write(running.path, "mappings:\n  - '127.0.0.4:%d:%s'\n  - listen: 127.0.0.3:%d\n"
              "    target: %s\n" % (port, a.hostport, port, b.hostport))
        wait_until(lambda: greeting(port, host="127.0.0.4") == "A", timeout=10)
        assert greeting(port, host="127.0.0.2") is None
        assert [m.spec for m in running.proxy.mappings] == [
            "127.0.0.3:%d:%s" % (port, b.hostport), "127.0.0.4:%d:%s" % (port, a.hostport)]


def test_yaml_listen_address_against_the_default(tmp_path):
    path = tmp_path / "m.yaml"
    write(path, "mappings:\n  - listen: 8002\n    target: a:1\n"
          "  - listen: 127.0.0.2:8002\n    target: b:1\n")
    backend = file_backend.Backend(SimpleNamespace(config=str(path), listen_address="0.0.0.0"))
    backend.settle = 0.0
    with pytest.raises(tcpproxy.ConfigRejected, match=r"listen addresses 0\.0\.0\.0:8002 and "
                       r"127\.0\.0\.2:8002 conflict .*line 4 \(entry 2\)"):
        backend.fetch()
    backend = file_backend.Backend(SimpleNamespace(config=str(path), listen_address=LOOP4))
    backend.settle = 0.0
    assert [m.key for m in backend.fetch()] == [8002, "127.0.0.2:8002"]
