"""Every subpackage of fused_softmax_ce is listed for installation: a
missing one installs a package whose imports fail."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fused_softmax_ce").rglob("__init__.py")}
    assert found == listed
