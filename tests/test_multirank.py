"""The multi-rank test runner itself: results in rank order, a failing rank's traceback
re-raised, and a rank that never reaches a collective turned into a timeout, not a hang."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.multirank import run_ranks


def _rank_sum(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return (rank, t.item())


def _one_rank_stalls(rank, world_size):
    if rank == 1:
        time.sleep(600)
    t = torch.ones(1)
    dist.all_reduce(t)
    return 0


def _one_rank_raises(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 was given a bad shard")
    return 0


def test_results_in_rank_order_after_a_collective():
    assert run_ranks(_rank_sum, 3) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_a_stalled_rank_fails_within_the_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 8 s"):
        run_ranks(_one_rank_stalls, 2, timeout=8)
    assert time.monotonic() - start < 30


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(AssertionError, match="rank 1 failed:(.|\n)*ValueError: rank 1 was given a bad shard"):
        run_ranks(_one_rank_raises, 2)
