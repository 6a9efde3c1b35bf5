"""Several processes (``torchrun``) outside the training step: joining them, sharding, gathering.

Training needs little from here: ``distill`` and ``pretrain`` wrap their trained module with accelerate
(DDP), which also shards their batches. Feature extraction has no trained module, so it shards whole
batches itself and gathers the rows back in dataset order with accelerate's collectives. Without a
launcher every function here is a no-op on one process and initialises nothing.
"""
from __future__ import annotations

import math
import os

import torch


class OneProcess:
    """What :func:`process_state` gives without a launcher: one process, nothing initialised."""
    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass


def launched() -> bool:
    """Whether a launcher (torchrun) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_processes(device: torch.device):
    """This process's state; under torchrun the first call joins the process group.

    Args:
        device: where the work runs; ``cpu`` joins with gloo, ``cuda`` with nccl.

    Returns:
        accelerate's ``PartialState`` (``num_processes``, ``process_index``, ``device``: this process's
        own GPU) under torchrun, else a :class:`OneProcess`.
    """
    if not launched():
        return OneProcess()
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def process_state():
    """accelerate's ``PartialState`` under torchrun (joined by :func:`join_processes` or an
    ``Accelerator``), else a :class:`OneProcess`.

    Without a launcher nothing is initialised, so a later ``Accelerator`` still picks its own device.
    """
    if not launched():
        return OneProcess()
    from accelerate import PartialState

    return PartialState()


def batch_shard(n: int, batch_size: int, state=None) -> range:
    """The dataset positions this process handles: a contiguous run of whole batches.

    Every process then runs exactly the batches one process would, so gathered results do not
    depend on the number of processes. A process may get none when there are fewer batches than
    processes.

    >>> batch_shard(10, 3)  # one process: everything
    range(0, 10)
    """
    state = state or process_state()
    batches = math.ceil(n / batch_size)
    per_process, extra = divmod(batches, state.num_processes)
    first = state.process_index * per_process + min(state.process_index, extra)
    last = first + per_process + (state.process_index < extra)
    return range(min(n, first * batch_size), min(n, last * batch_size))


def gather_batches(batches: list, state=None) -> list:
    """Every process's list of per-batch results, concatenated in process order (CPU tensors are fine
    on any backend: they travel pickled)."""
    state = state or process_state()
    if state.num_processes == 1:
        return batches
    from accelerate.utils import gather_object

    return [item for part in gather_object([batches]) for item in part]


def gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every process's ``rows`` in process order; process i holds ``counts[i]`` rows.

    The tensors stay on the device (gloo for CPU tensors, nccl for GPU ones).
    """
    if len(counts) == 1:
        return rows
    from accelerate.utils import gather, pad_across_processes

    padded = gather(pad_across_processes(rows.contiguous(), dim=0))  # [processes * max(counts), ...]
    width = padded.shape[0] // len(counts)
    return torch.cat([padded[i * width: i * width + count] for i, count in enumerate(counts)])


def all_agree(flag: bool, state=None) -> bool:
    """Whether ``flag`` holds on every process (e.g. a cache file that each node can read)."""
    state = state or process_state()
    if state.num_processes == 1:
        return flag
    from accelerate.utils import gather_object

    return all(gather_object([bool(flag)]))
