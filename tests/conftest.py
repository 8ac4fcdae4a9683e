import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `ign-bench ARGS` in a fresh process; returns CompletedProcess (text)."""
    import subprocess
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd or ROOT)


@pytest.fixture
def cli():
    return run_cli
