"""README.rst and CI agree, and the README's library example runs as written."""

import re
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, port_listening

TEST_COMMAND = ".venv/bin/python -m pytest -q"


def readme():
    return (REPO / "README.rst").read_text()


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in readme()
    ci = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert re.search(r"^\s*%s\b" % re.escape(TEST_COMMAND), ci, re.MULTILINE), ci


def library_example():
    lines = readme().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip() == "Library" and set(lines[i + 1].strip()) == {"-"})
    intro = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("::"))
    block = []
    for line in lines[intro + 1:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block)).strip()
    assert "import tcpproxy" in code, code
    return code


def test_readme_library_example_runs():
    code = library_example()
    ports = sorted({int(p) for p in re.findall(r'"(\d+):', code)})
    busy = [p for p in ports if port_listening(p)]
    if busy:
        pytest.skip("ports %s used by the README example are busy" % busy)
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
