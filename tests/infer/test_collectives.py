"""Tests for pyro_mogflow.infer.collectives: the shares of data and components a rank takes.

(The collectives themselves run in tests/infer/test_distributed.py, on two gloo processes.)
"""

from __future__ import annotations

import pytest
import torch

from pyro_mogflow.infer import rank_components, rank_subsample


def test_rank_subsample_splits_and_draws_disjoint_minibatches():
    shares = [rank_subsample(7, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert torch.equal(torch.cat(shares), torch.arange(7))
    batches = [
        rank_subsample(
            10, batch_size=3, generator=torch.Generator().manual_seed(5), rank=r, world_size=3
        )
        for r in range(3)
    ]
    union = torch.cat(batches)
    assert len(union) == 9 and len(set(union.tolist())) == 9
    assert torch.equal(rank_subsample(4), torch.arange(4))  # no process group: one rank


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"size": 0}, ValueError, "size"),
        ({"size": 3, "world_size": 4}, ValueError, "world_size"),
        ({"size": 3, "rank": 2, "world_size": 2}, ValueError, "rank"),
        (
            {"size": 6, "batch_size": 4, "world_size": 2, "generator": torch.Generator()},
            ValueError,
            "batch_size",
        ),
        ({"size": 6, "batch_size": 2}, TypeError, "generator"),
    ],
)
def test_rank_subsample_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rank_subsample(**kwargs)


def test_rank_components_partitions_the_components():
    shares = [rank_components(5, rank=r, world_size=2) for r in range(2)]
    assert [s.tolist() for s in shares] == [[0, 1, 2], [3, 4]]
    assert torch.equal(rank_components(3), torch.arange(3))  # no process group: one rank
    with pytest.raises(ValueError, match="num_components=1 is smaller"):
        rank_components(1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        rank_components(4, rank=2, world_size=2)
