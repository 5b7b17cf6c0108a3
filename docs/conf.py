"""Sphinx configuration for the pyro_mogflow documentation (``bash scripts/build_docs.sh``).

The API reference is generated from the docstrings by autodoc; the README is included with
myst-parser; the tutorials (jupytext percent-format scripts) are converted to Markdown pages
when the build starts, without running them. Nothing is fetched from the network: there is no
intersphinx, so references to torch, Pyro, NumPy, ArviZ and the standard library are listed in
``nitpick_ignore_regex`` below, and every other reference must resolve (``nitpicky = True``,
built with ``-W``), so a broken cross-reference to one of our own names fails the build.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

from mogflow_docs import external_base_names  # noqa: E402

import pyro_mogflow  # noqa: E402

project = "pyro_mogflow"
author = "pyro_mogflow developers"
copyright = "2026, pyro_mogflow developers"
release = pyro_mogflow.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "mogflow_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_title = f"pyro_mogflow {release}"

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
    # members from our own (private) mixins, not those of torch, Pyro or object:
    "inherited-members": external_base_names(),
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"  # the class docstrings hold the :param: lists

# No network at build time: no intersphinx inventories. Names from other libraries cannot be
# resolved, so they are ignored; every reference to a pyro_mogflow name must resolve.
nitpicky = True
_EXTERNAL = (
    r"(torch|pyro|numpy|np|scipy|arviz|az|xarray|xr|matplotlib|sklearn|tqdm|pandas|typing"
    r"|typing_extensions|collections|collections\.abc|abc|enum|dataclasses|pathlib|os|io"
    r"|numbers|types|functools|contextlib|warnings|weakref|argparse|builtins|copy|pickle|nn|dist"
    r"|concurrent|multiprocessing|ray)"
)
_BUILTINS = (
    r"(int|float|bool|str|bytes|complex|list|tuple|dict|set|frozenset|object|type|None"
    r"|NoneType|callable|Callable|Iterable|Iterator|Sequence|Mapping|MutableMapping|Any"
    r"|Optional|Union|Literal|Tensor|Generator|Exception|ValueError|TypeError|RuntimeError"
    r"|NotImplementedError|UserWarning|DeprecationWarning|KeyboardInterrupt|Path|Enum"
    r"|TextIO|ellipsis|slice|range|NamedTuple|Protocol|ClassVar|Self|os\.PathLike"
    # types from torch, Pyro, NumPy, ArviZ and xarray named without their module:
    r"|ArrayLike|DataTree|Dataset|DataArray|ELPDData|InferenceData|Transform|TransformModule"
    r"|Distribution|TorchDistribution|ExpandedDistribution|Constraint|Module|Parameter"
    r"|Generator|AutoGuide|AutoContinuous|ELBO|Trace_ELBO|PyroModule|PyroParam|PyroOptim|ndarray)"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL + r"(\..*)?"),
    (r"py:.*", _BUILTINS),
]

# Tutorials: converted from tutorials/*.py (jupytext percent format) into docs/tutorials/.
mogflow_tutorials_src = str(ROOT / "tutorials")
mogflow_tutorials_out = str(DOCS / "tutorials" / "generated")

os.environ.setdefault("PYRO_MOGFLOW_DOCS", "1")
