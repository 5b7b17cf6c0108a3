"""The documentation site builds with warnings as errors (``bash scripts/build_docs.sh``).

The full HTML build runs here (about 10 s of CPU: autodoc imports the package, the tutorials
are converted, not run), into a temporary folder, so a docstring edit that breaks a
cross-reference or the reST markup fails the test suite as well as CI's ``build_docs.sh`` step.
A second, tiny build checks the configuration itself: a reference to a name that does not exist
must fail the build (``nitpicky`` with only other libraries' names ignored), or ``-W`` would
catch nothing. Skipped when the ``docs`` extra (sphinx, myst-parser, jupytext) is not installed.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_MISSING = [m for m in ("sphinx", "myst_parser", "jupytext") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the docs extra is not installed (missing: {', '.join(_MISSING)}); "
    "pip install -e '.[docs]' or bash scripts/setup.sh",
)


def _sphinx(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    run = _sphinx("-b", "html", "-d", str(out / "doctrees"), str(DOCS), str(out / "html"))
    assert run.returncode == 0, f"sphinx-build -W failed:\n{run.stdout}\n{run.stderr}"
    return out / "html"


def test_the_site_builds_without_warnings(html):
    for page in ("index", "readme", "api/pyro_mogflow", "api/guides", "api/infer"):
        assert (html / f"{page}.html").is_file(), page
    tutorials = sorted(p.stem for p in (ROOT / "tutorials").glob("*.py"))
    built = sorted(p.stem for p in (html / "tutorials" / "generated").glob("*.html"))
    assert built == tutorials


def test_every_top_level_name_links_to_its_documentation(html):
    import pyro_mogflow

    page = (html / "api" / "pyro_mogflow.html").read_text()
    anchors = set(re.findall(r'href="[^"#]*#(pyro_mogflow\.[\w.]+)"', page))
    linked = {anchor.rsplit(".", 1)[1] for anchor in anchors}
    public = {name for name in pyro_mogflow.__all__ if not name.startswith("__")}
    assert public <= linked, sorted(public - linked)


def test_a_broken_cross_reference_fails_the_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.rst").write_text(
        "Broken\n======\n\nSee :class:`pyro_mogflow.NoSuchGuide` and :func:`no_such_function`.\n"
    )
    run = _sphinx("-c", str(DOCS), "-b", "dummy", str(src), str(tmp_path / "out"))
    assert run.returncode != 0
    assert "NoSuchGuide" in run.stderr and "no_such_function" in run.stderr, run.stderr
