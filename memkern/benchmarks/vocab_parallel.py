"""Per-rank peak memory and bytes communicated of the vocabulary-parallel linear_kd_loss
(memkern.distributed.vocab_parallel) at 1, 2 and 4 ranks.

    python -m memkern.benchmarks.vocab_parallel [--ranks 1 2 4] [--rows 256] [--hidden 256]
        [--vocab 32000] [--vocab2 64000] [--dtype float32]

Each rank count runs in fresh processes (gloo on CPUs, NCCL with one GPU per rank when
CUDA has enough), one warm-up step, then one measured step: forward and backward of
linear_kd_loss with the student's and teacher's lm_heads sharded on the vocabulary
(Shard(0)). Peak memory is memkern.measure.PeakMemory's rise over the step (CPU: peak
resident set; CUDA: max_memory_allocated). Bytes are tallied from the all_reduce calls
the loss issues (wrapped for the step), at two vocabulary sizes: they depend on the rows,
not the vocabulary. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _AllReduceTally:
    """Counts the bytes of every torch.distributed.all_reduce while active."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def __enter__(self):
        self._original = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _step(memkern, mesh, rows, hidden, vocab, dtype, device):
    """One forward + backward; mesh None: whole lm_heads (the one-process path)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    hs = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    ht = torch.randn(rows, hidden, dtype=dtype, device=device)
    ws, wt = (torch.randn(vocab, hidden, dtype=dtype, device=device) * 0.05 for _ in range(2))
    if mesh is not None:
        ws, wt = (distribute_tensor(w, mesh, [Shard(0)]) for w in (ws, wt))
    ws.requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device=device)

    def run():
        hs.grad = ws.grad = None
        loss = memkern.ops.linear_kd_loss(hs, ws, ht, wt, labels, alpha=0.5, temperature=2.0)
        loss.backward()
        return loss.detach()

    return run


def _rank(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import memkern
    from memkern.measure import PeakMemory, pin_malloc_thresholds
    from torch.distributed.tensor import init_device_mesh

    pin_malloc_thresholds()
    mesh = init_device_mesh(device.type, (world,))
    dtype = getattr(torch, args.dtype)
    out = {}
    for key, vocab in ((args.vocab, args.vocab), (args.vocab2, args.vocab2), ("one process", args.vocab)):
        if key == "one process" and world != 1:
            continue
        run = _step(memkern, mesh if key != "one process" else None, args.rows, args.hidden, vocab, dtype, device)
        run()  # warm-up
        dist.barrier()
        with _AllReduceTally() as tally, PeakMemory(device.type) as peak:
            run()
        out[key] = dict(peak=peak.peak_bytes, bytes=tally.bytes, calls=tally.calls)
    results.put((rank, out))
    dist.destroy_process_group()


def measure(world: int, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return [got[r] for r in range(world)]


def main(argv=None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vocab2", type=int, default=64000)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    table = []
    mib = 2**20
    print(f"rows {args.rows}, hidden {args.hidden}, {args.dtype}; peak = rise over a forward + backward step\n")
    print(f"| ranks | peak per rank, V={args.vocab} (MiB) | peak per rank, V={args.vocab2} (MiB) "
          f"| all-reduce bytes per rank, V={args.vocab} | V={args.vocab2} | all-reduce calls |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for world in args.ranks:
        ranks = measure(world, args)
        peak1 = max(r[args.vocab]["peak"] for r in ranks) / mib
        peak2 = max(r[args.vocab2]["peak"] for r in ranks) / mib
        b1, b2 = ranks[0][args.vocab]["bytes"], ranks[0][args.vocab2]["bytes"]
        calls = ranks[0][args.vocab]["calls"]
        table.append((world, peak1, peak2, b1, b2, calls))
        print(f"| {world} | {peak1:.1f} | {peak2:.1f} | {b1} | {b2} | {calls} |", flush=True)
        if "one process" in ranks[0]:
            plain = ranks[0]["one process"]["peak"] / mib
            print(f"| one process, whole lm_heads (V={args.vocab}) | {plain:.1f} | | 0 | | 0 |", flush=True)
    return table


if __name__ == "__main__":
    main()
