"""Run a test body on several gloo ranks of one machine, with a deadline.

``run_ranks(body, world_size, *args)`` spawns ``world_size`` processes, each of which sets up
a gloo process group and calls ``body(rank, world_size, *args)``; ``body`` must be a
module-level function (spawn pickles it by name). The call returns every rank's result in
rank order, re-raises the first rank's failure with its traceback, and kills every rank and
fails if they have not all finished within ``timeout`` seconds, so a collective that one rank
never reaches fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, body, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            results.put((rank, True, body(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, which re-raises)
        results.put((rank, False, traceback.format_exc()))


def run_ranks(body, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, body, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, object]] = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outcome) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                if dead and results.empty():
                    raise RuntimeError(
                        f"ranks {dead} exited without a result (exit codes {[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            outcome[rank] = (ok, value)
            if not ok:  # one failure is enough: the others may be waiting on it
                raise AssertionError(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [outcome[r][1] for r in range(world_size)]
