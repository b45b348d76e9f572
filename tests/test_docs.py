"""The README's code runs as written, and the README's commands are what CI runs."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_is_the_example_script(capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart block is examples/quickstart.py verbatim (less its docstring), and runs."""
    script = (ROOT / "examples" / "quickstart.py").read_text()
    body = script.split('"""', 2)[2].lstrip("\n")
    assert body in python_blocks(README), "README quickstart and examples/quickstart.py differ"
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "'audio'" in out and "'video'" in out


def test_ci_runs_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->(.*?)<!-- /test-command -->", README, flags=re.S)
    assert block is not None
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("python ")]
    assert len(lines) == 1 and "pytest" in lines[0]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
