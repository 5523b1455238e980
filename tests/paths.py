"""Where the tests find the repository, the shared benchmark data and the CPU stand-ins of GPU-only packages."""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
STAND_INS = TESTS_DIR / "stand_ins"
