"""benchmarks/scaling.py: its models vectorize, and a partial run writes its tables."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch

from benchmarks import scaling
from pyro_mogflow import AutoMixtureFlow, StratifiedELBO


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("kind", ["logistic", "sign"])
def test_the_models_run_all_components_in_one_model_run(kind):
    model = scaling.logistic_model if kind == "logistic" else scaling.sign_model
    x, y, _ = scaling._data(kind, 50, 3, "cpu")
    guide = AutoMixtureFlow(model, num_components=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the draw-by-draw fallback warns
        loss = StratifiedELBO().loss(model, guide, x, y)
    assert torch.isfinite(torch.tensor(loss))


def test_a_run_of_some_parts_writes_only_those_tables(tmp_path):
    results = scaling.main(
        ["--parts", "growth", "--dims", "2", "--ks", "1", "2", "--out", str(tmp_path)]
    )
    assert set(results["growth"]) == {"D", "K"} and "sign" not in results
    assert (tmp_path / "scaling.png").exists()
    assert "ms per StratifiedELBO step" in (tmp_path / "scaling.md").read_text()


def test_min_n_above_max_n_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        scaling.main(["--min-n", "1e4", "--max-n", "1e3", "--out", str(tmp_path)])
    assert "--min-n" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
