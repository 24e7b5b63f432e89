"""--log-format json: every line of a run that opens and closes sessions,
follows a DNS change, applies and rejects configuration, and stops, is one
JSON object with the stable keys; text stays as it was."""

import json
import os
import re
import signal
import socket

from helpers import LOOP4, EchoServer, ProxyProcess, free_port, wait_until

KEYS = {"ts", "level", "logger", "thread", "msg"}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def roundtrip(port, data=b"hello"):
    with socket.create_connection((LOOP4, port), timeout=5) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            got += sock.recv(100)
        return got


def test_json_lines_carry_each_event(tmp_path, dns_server):
    name = "db.logging.test"
    path = tmp_path / "m.yaml"
    with EchoServer(host="127.0.0.2") as a, EchoServer(host="127.0.0.3", port=a.port):
        dns_server.set(name, ["127.0.0.2"], ttl=1)
        lport = free_port()
        path.write_text("mappings:\n  - '%d:%s:%d'\n" % (lport, name, a.port))
        os.utime(path, (0, 0))                        # settled: read at once
        proxy = ProxyProcess(["--listen-address", LOOP4, "--backend", "file", "--config",
                              str(path), "--status", "off", "--resolver",
                              dns_server.nameserver, "--debug", "2", "--log-format", "json"])
        try:
            proxy.wait_listening([lport], timeout=20)
            assert roundtrip(lport) == b"hello"
            dns_server.set(name, ["127.0.0.3"], ttl=1)
            # each new connection looks the name up again once the TTL is over
            assert wait_until(lambda: roundtrip(lport) == b"hello"
                              and '"new": ["127.0.0.3"]' in proxy.stderr(), 10), proxy.stderr()
            path.write_text("mappings:\n  - listen: %d\n    tagret: x:1\n" % lport)
            os.utime(path, (0, 1))
            proxy.send_signal(signal.SIGHUP)
            assert wait_until(lambda: '"config_rejected"' in proxy.stderr(), 10)
            assert proxy.stop() == 0
            lines = proxy.stderr().splitlines()
        finally:
            proxy.close()
    records = []
    for line in lines:
        record = json.loads(line)                        # every line is one object
        assert KEYS <= set(record), record
        assert TS.match(record["ts"]), record["ts"]
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
        assert "\n" not in line
        records.append(record)
    events = {}
    for record in records:
        events.setdefault(record.get("event"), []).append(record)
    for event in ("start", "config_applied", "session_open", "session_close", "dns_change",
                  "config_rejected", "stop"):
        assert event in events, (event, sorted(map(str, events)))
    opened = events["session_open"][0]
    assert opened["mapping"] == lport and opened["client"].startswith("127.0.0.1:")
    assert opened["upstream"] == "127.0.0.2:%d" % a.port
    closed = events["session_close"][0]
    assert closed["bytes_up"] == closed["bytes_down"] == 5
    assert isinstance(closed["duration_s"], float) and closed["reason"]
    change = events["dns_change"][-1]
    assert change["host"] == name and change["new"] == ["127.0.0.3"]
    assert change["old"] == ["127.0.0.2"]
    assert "tagret" in events["config_rejected"][0]["reason"]
    assert events["config_applied"][0]["mappings"] == ["%d:%s:%d" % (lport, name, a.port)]


def test_text_stays_the_default(echo):
    lport = free_port()
    proxy = ProxyProcess(["--listen-address", LOOP4, "--connections",
                          "%d:%s:%d" % (lport, LOOP4, echo.port), "--status", "off",
                          "--debug", "1"], env={"TCPPROXY_LOG_FORMAT": "text"})
    try:
        proxy.wait_listening([lport])
        assert roundtrip(lport) == b"hello"
        assert proxy.stop() == 0
        text = proxy.stderr()
    finally:
        proxy.close()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO MainThread: tcpproxy .* "
                     r"started", text, re.MULTILINE), text
    assert not text.lstrip().startswith("{")
