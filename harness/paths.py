"""Where things live (torch-free, so the CLI and spec validation start fast)."""
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = (PROJECT_ROOT.parent / "shared" / "data").resolve()
DEFAULT_CACHE = Path(os.environ.get("IGN_BENCH_CACHE", PROJECT_ROOT / ".cache")).resolve()
