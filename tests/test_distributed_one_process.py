"""Tests for wecolora.distributed without a launcher: one process, nothing initialised, and how whole batches
are shared between processes (with stand-in process states)."""
from dataclasses import dataclass

import pytest
import torch

from wecolora import distributed
from wecolora.distributed import OneProcess, all_agree, batch_shard, gather_batches, gather_rows, launched


@dataclass
class State:
    num_processes: int
    process_index: int


@pytest.mark.parametrize("world_size, expected", [(None, False), ("1", False), ("2", True), ("8", True)])
def test_launched(monkeypatch, world_size, expected):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert launched() is expected


def test_without_a_launcher_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for state in (distributed.process_state(), distributed.join_processes(torch.device("cpu"))):
        assert isinstance(state, OneProcess)
        assert (state.num_processes, state.process_index, state.is_main_process) == (1, 0, True)
        assert state.wait_for_everyone() is None


SHARD_CASES = [
    # n, batch size, processes, each process's range
    (10, 3, 1, [range(10)]),
    (10, 3, 2, [range(6), range(6, 10)]),  # 4 batches: 2 + 2
    (10, 3, 3, [range(6), range(6, 9), range(9, 10)]),  # 4 batches: 2 + 1 + 1
    (10, 5, 4, [range(5), range(5, 10), range(10, 10), range(10, 10)]),  # fewer batches than processes
    (0, 4, 2, [range(0), range(0)]),
    (16, 4, 4, [range(4), range(4, 8), range(8, 12), range(12, 16)]),
    (17, 4, 2, [range(12), range(12, 17)]),  # 5 batches: 3 + 2; the short batch last
]


@pytest.mark.parametrize("n, batch_size, processes, expected", SHARD_CASES)
def test_batch_shard(n, batch_size, processes, expected):
    shards = [batch_shard(n, batch_size, State(processes, i)) for i in range(processes)]
    assert shards == expected
    assert [i for shard in shards for i in shard] == list(range(n))  # every position once, in order
    for shard in shards[:-1]:  # whole batches, so each process runs the batches one process would
        assert len(shard) % batch_size == 0 or shard.stop == n


def test_batch_shard_defaults_to_this_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert batch_shard(10, 3) == range(10)


def test_one_process_gathers_its_own():
    batches = [torch.arange(3), torch.arange(2)]
    assert gather_batches(batches, OneProcess()) is batches
    rows = torch.randn(5, 2)
    assert gather_rows(rows, [5]) is rows
    assert all_agree(True, OneProcess()) is True and all_agree(False, OneProcess()) is False
