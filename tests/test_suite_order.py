"""The suite's own scheduling: the long files tests/conftest.py starts first under pytest-xdist."""

from tests.conftest import LONG_FILES
from tests.paths import REPO_ROOT


def test_the_long_test_files_started_first_exist() -> None:
    """A renamed or removed file would silently lose its place at the front (the suite would get slower, not fail)."""
    missing = [path for path in LONG_FILES if not (REPO_ROOT / path).is_file()]
    assert not missing, missing
