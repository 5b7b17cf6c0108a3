from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "pyro_mogflow" / "_version.py").read_text(), version)

extras = {
    "arviz": ["arviz>=0.17", "xarray"],
    "plots": ["matplotlib>=3.5"],
    "test": [
        "pytest>=7",
        "scipy>=1.9",
        "ruff>=0.5",
        "import-linter>=2.0",
        "jupytext>=1.14",
        "arviz>=0.17",
        "xarray",
        "matplotlib>=3.5",
        "scikit-learn>=1.1",
    ],
    # fit_independent(..., executor="ray"); data-parallel SVI needs only torch.distributed
    "distributed": ["ray>=2.9"],
    # the documentation site: bash scripts/build_docs.sh
    "docs": ["sphinx>=7", "myst-parser>=2", "jupytext>=1.14"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="pyro-mogflow",
    version=version["__version__"],
    description=(
        "Normalizing-flow guides for Pyro on a learnable mixture of diagonal Gaussians, "
        "for posteriors with several modes"
    ),
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyro_mogflow", "pyro_mogflow.*"]),
    package_data={"pyro_mogflow": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["pyro-ppl>=1.9", "torch>=2.0", "numpy>=1.22", "tqdm>=4.60"],
    extras_require=extras,
    entry_points={"console_scripts": ["pyro-mogflow=pyro_mogflow.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
