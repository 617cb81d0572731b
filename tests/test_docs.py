"""Every repository path the README mentions exists, and the README's commands are the real ones."""

import re

from helpers import ROOT

README = (ROOT / "README.md").read_text()
PATH_RE = re.compile(r"`((?:spd|toy_models|configs|benchmarks|figures|tests|\.ci)/[\w./-]*)`")


def test_readme_paths_exist():
    paths = PATH_RE.findall(README)
    assert len(paths) > 10
    for p in paths:
        for part in p.split(", "):
            assert (ROOT / part.rstrip("/")).exists(), part


def test_readme_commands_match_makefile_and_ci():
    make = (ROOT / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for img in re.findall(r"\]\((figures/[\w./-]+\.png)\)", README):
        assert (ROOT / img).is_file(), img
