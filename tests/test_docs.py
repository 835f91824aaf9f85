"""The README's generated performance tables match the committed result files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_generated_from_results():
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--check"])
    assert check.returncode == 0, "README.md is out of date: run python benchmarks/make_tables.py"
