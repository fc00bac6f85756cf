"""The package's shape: every subpackage is installed, and every source file
stays small enough to read whole (issue 18: at most 500 lines)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fused_softmax_ce"


def test_every_subpackage_is_installed():
    # A subpackage missing from pyproject installs a package whose imports fail.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


def test_source_files_are_at_most_500_lines():
    sources = list(PACKAGE.rglob("*.py"))
    sources += [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources}
    assert {path: n for path, n in sizes.items() if n > 500} == {}
