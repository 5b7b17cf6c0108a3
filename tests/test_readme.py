"""README.md's Python examples are executed here, so the documentation cannot drift from the code."""

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


def test_quick_start_runs_and_finds_both_sign_modes(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    namespace = {"__name__": "readme"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "weight" in printed
    found = namespace["found"]
    weights, theta = found["weights"], found["values"]["theta"]
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    # Both signs of theta carry real mass, each near |theta| = 1.5.
    for sign in (1, -1):
        near = (sign * theta - 1.5).abs() < 0.5
        assert weights[near].sum() > 0.2, (weights, theta)
