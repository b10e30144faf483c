"""Every ```bash block of the README runs, in order, in a fresh folder (the ```console blocks need
a download, a GPU cluster or the user's own files and are not run)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

README = REPO / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_has_the_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert len(readme_commands()) >= 8


@pytest.mark.slow
def test_readme_bash_blocks_run(tmp_path, shared_ti):
    exe = f"{shlex.quote(sys.executable)} -m simmstnet"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for command in readme_commands():
        assert command.startswith("simmstnet "), command
        shell = exe + command[len("simmstnet"):]
        shell = shell.replace("../shared/data", str(SHARED_DATA))
        done = subprocess.run(shell, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stderr[-3000:]}"
    assert (tmp_path / "forecast.csv").is_file()
    assert (tmp_path / "runs" / "net-bilevel" / "sim2real_weights.npz").is_file()
