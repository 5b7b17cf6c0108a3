"""README.md's Python examples run here, so the documentation cannot drift from the code."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert first == [
        "bash scripts/setup.sh && .venv/bin/python -m pyro_mogflow demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert first[1] in ci


def test_every_example_runs_and_the_quick_start_finds_both_sign_modes(capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 3, "README lost an example"
    namespace = {"__name__": "readme"}
    for block in blocks:  # one namespace: later examples build on the first
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "weight" in printed
    found = namespace["found"]
    weights, theta = found["weights"], found["values"]["theta"]
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    # Both signs of theta carry about half the mass each, near |theta| = 1.5.
    for sign in (1, -1):
        near = (sign * theta - 1.5).abs() < 0.5
        assert 0.4 < float(weights[near].sum()) < 0.6, (weights, theta)
    # The plain-SVI example produced constrained draws; the ArviZ example a report.
    assert namespace["samples"]["sigma"].min() > 0
    assert namespace["samples"]["theta"].shape[0] == 1000
    # fit()'s mode finding by hand (NaturalStratifiedELBO) holds both signs too: each sign's
    # share of 4000 draws within 0.1 of 0.5 (the standard error is 0.008).
    assert abs(namespace["positive"] - 0.5) < 0.1
    assert namespace["report"] is not None
    # Scaling out: the data-parallel loop ran (one process here) and the pooled fits exist.
    assert namespace["dsvi"].world_size == 1 and torch.isfinite(torch.tensor(namespace["loss"]))
    assert namespace["fits"].losses.shape == (2, 50)
