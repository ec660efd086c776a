"""The README's Python example runs as pasted and prints what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.postgres
def test_readme_python_example_runs_as_documented() -> None:
    blocks = re.findall(
        r"```python\n((?:(?!```).)*)```\n\nprints\n\n```\n(.*?)```", README, re.DOTALL
    )
    assert len(blocks) == 1
    code, expected = blocks[0]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


def test_every_setting_is_in_the_readme() -> None:
    from flowd.config import ENV

    for var in ENV.values():
        assert f"`{var}`" in README, var


def test_readme_has_exactly_the_two_setup_commands() -> None:
    block = README[README.index("## Two commands") :].split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == [
        "make run",
        "make test",
    ]
