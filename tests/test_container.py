"""The Docker image, built and run for real with podman (marker
``container``).  No registry is needed: the base is a Debian root file
system made by mmdebstrap from the machine's own apt sources (cached under
/var/cache/tcpproxy-test) and imported into podman, then passed to the
Dockerfile as ``BASE_IMAGE``.

podman here: runc (crun fails on hybrid cgroups), the default ulimits set
to what root may grant without CAP_SYS_RESOURCE (``CONTAINERS_CONF``),
``--format docker`` (the OCI format drops HEALTHCHECK), host networking, and
the host's CA bundle mounted read-only into the RUN steps (pip may reach
PyPI through an intercepting proxy whose CA only the host trusts), never
copied into the image.  Each step's time is printed.
"""

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    LOOP4,
    REPO,
    closed_by_peer,
    connect,
    free_port,
    http,
    port_listening,
    roundtrip,
    spec,
    wait_until,
)

# the first test also waits for mmdebstrap and the build
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

CACHE = Path("/var/cache/tcpproxy-test")
SUITE = "bookworm"
MMDEBSTRAP = ["--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
              "--customize-hook=rm -f \"$1\"/usr/lib/python3.*/EXTERNALLY-MANAGED"]
IMAGE = "localhost/tcpproxy-test:latest"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
STOP_GRACE = 10                                 # docker and podman stop's default


def report(config, text):
    """Print ``text`` on the terminal whatever pytest captures."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is None:
            sys.stderr.write(text + "\n")
        else:
            if reporter._tw.width_of_current_line:      # after progress dots
                reporter.write("\n")
            reporter.write_line(text)


@contextlib.contextmanager
def timed(config, step):
    start = time.monotonic()
    yield
    report(config, "container: %-44s %6.1f s" % (step, time.monotonic() - start))


class Podman:
    """``podman`` with this test's ``containers.conf``; containers started
    with ``start()`` are removed by ``close()``."""

    def __init__(self, conf):
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.containers = []

    def __call__(self, *args, timeout=120, check=True):
        result = subprocess.run(["podman"] + [str(a) for a in args], env=self.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, "podman %s: %s%s" % (
                " ".join(map(str, args)), result.stdout, result.stderr)
        return result

    def start(self, *args):
        """``podman run -d --network host ARGS``: the container's name."""
        name = "tcpproxy-test-%d-%d" % (os.getpid(), len(self.containers))
        self.containers.append(name)
        self("run", "-d", "--name", name, "--network", "host", *args)
        return name

    def inspect(self, name):
        return json.loads(self("inspect", name).stdout)[0]

    def close(self):
        if self.containers:
            self("rm", "--force", "--time", "0", *self.containers, check=False)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    for program, package in (("podman", "podman"), ("runc", "runc")):
        if not shutil.which(program):
            pytest.skip("%s is not installed (apt-get install %s; .ci/run installs it)"
                        % (program, package))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n\n[containers]\n'
                    'default_ulimits = ["nofile=%d:%d", "nproc=32768:32768"]\n' % (hard, hard))
    engine = Podman(conf)
    info = engine("info", check=False)
    if info.returncode:
        pytest.skip("podman cannot run here: %s" % info.stderr.strip())
    yield engine
    engine.close()


# -- the base image ----------------------------------------------------------

def apt_sources(suite=SUITE):
    """The machine's apt entries for ``suite`` and its -updates/-security,
    as one-line ``deb`` entries (deb822 stanzas converted)."""
    entries = []
    suite_re = re.compile(r"%s(-updates|-security)?$" % suite)
    etc = Path("/etc/apt")
    for path in [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list")):
        if path.exists():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", lambda m: m.group(0).replace(" ", "\0"),
                               line.split("#", 1)[0]).split()
                if words[:1] == ["deb"] and len(words) > 3:
                    at = 2 if words[1].startswith("[") else 1
                    if suite_re.match(words[at + 1]):
                        entries.append(" ".join(words).replace("\0", " "))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
                continue
            options = "[signed-by=%s] " % fields["Signed-By"] if "Signed-By" in fields else ""
            for uri in fields.get("URIs", "").split():
                for suite_name in fields.get("Suites", "").split():
                    if suite_re.match(suite_name):
                        entries.append("deb %s%s %s %s" % (options, uri, suite_name,
                                                          fields.get("Components", "main")))
    return entries


def rootfs(pytestconfig):
    """The cached mmdebstrap tarball (built when missing): (path, key)."""
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap; .ci/run installs it)")
    argv = ["mmdebstrap"] + MMDEBSTRAP + [SUITE]
    mirrors = apt_sources()
    key = hashlib.sha256(json.dumps(argv + mirrors).encode()).hexdigest()[:12]
    tar = CACHE / ("rootfs-%s-%s.tar" % (SUITE, key))
    if tar.exists():
        report(pytestconfig, "container: base root file system cached in %s" % tar)
        return tar, key
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tar.with_suffix(".partial.tar")
    with timed(pytestconfig, "mmdebstrap %s root file system" % SUITE):
        result = subprocess.run(argv + [str(partial)] + mirrors, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    partial.rename(tar)
    return tar, key


@pytest.fixture(scope="module")
def base_image(podman, pytestconfig):
    tar, key = rootfs(pytestconfig)
    name = "localhost/tcpproxy-test-base:%s" % key
    if podman("image", "exists", name, check=False).returncode:
        with timed(pytestconfig, "podman import"):
            podman("import", tar, name, timeout=600)
    return name


@pytest.fixture(scope="module")
def image(podman, base_image, pytestconfig):
    """The Dockerfile built on ``base_image``; the image it replaces under
    the same tag is removed (its layers stay as build cache)."""
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    with timed(pytestconfig, "podman build"):
        podman("build", "--format", "docker", "--network", "host",
               "--volume", "%s:%s:ro" % (CA_BUNDLE, CA_BUNDLE),
               "--build-arg", "BASE_IMAGE=%s" % base_image, "--tag", IMAGE, REPO, timeout=900)
    new = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if old and old != new:
        podman("rmi", old, check=False)
    return IMAGE


# -- the running container ---------------------------------------------------

def run_proxy(podman, pytestconfig, *args, ports=(), status=None, env=(), expect=200):
    """Start the image with ``args``; wait until ``ports`` listen and
    ``status`` answers ``expect``.  Returns the container's name."""
    options = []
    for item in env:
        options += ["--env", item]
    with timed(pytestconfig, "podman run until it listens"):
        name = podman.start(*options, IMAGE, *args)

        def up():
            state = podman.inspect(name)["State"]
            assert state["Running"], podman("logs", name, check=False).stderr
            if not all(port_listening(p) for p in ports):
                return False
            if status is None:
                return True
            try:
                return http(status, timeout=1)[0] == expect
            except OSError:
                return False

        assert wait_until(up, 30, interval=0.05), podman("logs", name, check=False).stderr
    return name


def test_image_configuration_and_pinned_dependencies(podman, image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    assert config["Healthcheck"]["Test"] == ["CMD", "tcpproxy", "health"], config["Healthcheck"]
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["tcpproxy"]
    assert "STATUS_ADDRESS=0.0.0.0:8001" in config["Config"]["Env"]

    freeze = podman("run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                    "-m", "pip", "freeze").stdout
    installed = {n.lower(): v for n, v in re.findall(r"^([\w.-]+)==(\S+)$", freeze, re.MULTILINE)}
    pins = re.findall(r"^([\w.-]+)==(\S+)$", (REPO / ".docker" / "constraints.txt").read_text(),
                      re.MULTILINE)
    assert pins and all(installed.get(n.lower()) == v for n, v in pins), (pins, freeze)

    # the host's own CAs (an intercepting proxy's) were only mounted for RUN
    bundle = podman("run", "--rm", "--network", "none", "--entrypoint", "cat", image,
                    CA_BUNDLE).stdout
    for path in LOCAL_CAS.glob("**/*.crt"):
        body = "".join(path.read_text().split("-----")[2].split())
        assert body not in "".join(bundle.split()), "%s was copied into the image" % path


def test_runs_as_pid1_non_root_passes_bytes_and_stops_in_time(podman, image, echo,
                                                              pytestconfig):
    lport, sport = free_port(), free_port()
    name = run_proxy(podman, pytestconfig, "--connections", spec(lport, LOOP4, echo.port),
                     "--status", "%s:%d" % (LOOP4, sport), "--status-allow", "127.0.0.0/8",
                     ports=[lport], status=(LOOP4, sport))
    assert http((LOOP4, sport))[2] == b"OK"
    assert podman("exec", name, "id", "-u").stdout.strip() not in ("", "0")
    pid1 = podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert any(Path(word).name == "tcpproxy" for word in pid1[:2]), pid1

    with connect((LOOP4, lport)) as client:
        assert roundtrip(client, b"through the container" * 1000) == b"through the container" * 1000
        start = time.monotonic()
        with timed(pytestconfig, "podman stop with a connection open"):
            podman("stop", name, timeout=STOP_GRACE + 20)
        elapsed = time.monotonic() - start
        assert closed_by_peer(client, 5)
    state = podman.inspect(name)["State"]
    assert state["ExitCode"] == 0, (state, podman("logs", name, check=False).stderr)
    assert elapsed < STOP_GRACE - 1, "stop took %.1f s of the %d s grace" % (elapsed, STOP_GRACE)


def healthcheck(podman, name):
    """(healthy?, the check's output) from ``podman healthcheck run``."""
    result = podman("healthcheck", "run", name, check=False)
    log = podman.inspect(name)["State"]["Health"]["Log"] or [{}]
    return result.returncode == 0, "%s%s%s" % (result.stdout, result.stderr,
                                               log[-1].get("Output", ""))


def test_healthcheck_follows_the_status_endpoint(podman, image, pytestconfig):
    """Healthy with the status address given by --status or by
    STATUS_ADDRESS, and with ``--status off`` while it listens on its
    ports; unhealthy when /status answers 503 (a backend never read)."""
    def mapping():
        port = free_port()
        return ["--connections", spec(port, LOOP4, 9)], [port]

    flag, env, broken_status = free_port(), free_port(), free_port()
    args, ports = mapping()
    by_flag = run_proxy(podman, pytestconfig, *args, "--status", "%s:%d" % (LOOP4, flag),
                        ports=ports, status=(LOOP4, flag))
    args, ports = mapping()
    by_env = run_proxy(podman, pytestconfig, *args, "--status-allow", "10.0.0.0/8",
                       env=["STATUS_ADDRESS=%s:%d" % (LOOP4, env)], ports=ports,
                       status=(LOOP4, env))
    args, ports = mapping()
    off = run_proxy(podman, pytestconfig, *args, "--status", "off", ports=ports)
    broken = run_proxy(podman, pytestconfig, "--backend", "file", "--config",
                       "/nonexistent.yaml", "--status", "%s:%d" % (LOOP4, broken_status),
                       ports=[], status=(LOOP4, broken_status), expect=503)
    with timed(pytestconfig, "podman healthcheck run (4 containers)"):
        results = {name: healthcheck(podman, name) for name in (by_flag, by_env, off, broken)}
    assert results[by_flag][0], results[by_flag][1]
    assert results[by_env][0], results[by_env][1]
    assert results[off][0], results[off][1]
    assert not results[broken][0], results[broken][1]


BIND_80 = ("import os, socket\n"
           "s = socket.socket()\n"
           "try:\n"
           "    s.bind(('127.0.0.1', 80))\n"
           "except PermissionError:\n"
           "    raise SystemExit('uid %d: cannot bind port 80' % os.getuid())\n"
           "print('uid %d: bound port 80' % os.getuid())\n")


@pytest.mark.parametrize("options, allowed", [
    ([], False),
    (["--sysctl", "net.ipv4.ip_unprivileged_port_start=0"], True),
    (["--cap-add", "NET_BIND_SERVICE"], True),
])
def test_uid_10001_binds_ports_below_1024_only_when_granted(podman, image, options, allowed):
    """What README.rst says about ports below 1024 (podman: --cap-add also
    raises the ambient set of a non-root user)."""
    result = podman("run", "--rm", "--network", "none", *options, "--entrypoint", "python3",
                    image, "-c", BIND_80, check=False)
    assert (result.returncode == 0) is allowed, result.stdout + result.stderr
    assert "uid 10001" in result.stdout + result.stderr


def test_host_network_refuses_the_sysctl(podman, image):
    """With --network host the port sysctl is the host's: podman refuses it."""
    result = podman("run", "--rm", "--network", "host", "--sysctl",
                    "net.ipv4.ip_unprivileged_port_start=0", "--entrypoint", "true", image,
                    check=False)
    assert result.returncode != 0 and "sysctl" in result.stderr, result.stderr
