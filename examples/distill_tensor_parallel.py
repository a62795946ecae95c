"""Distillation with vocabulary-parallel lm_heads: each rank holds a slice of the student's
and the teacher's lm_head (torch.distributed.tensor.parallel's ColwiseParallel: DTensor
weights sharded on the vocabulary), the rest of both models is replicated, and
memkern.nn.LinearKDLoss computes the loss from the hidden states and the sharded weights
without any rank holding rows x vocabulary logits.

    torchrun --nproc-per-node 2 examples/distill_tensor_parallel.py [--steps 5] [--vocab 32000]

gloo on CPUs, NCCL when CUDA is available. Prints the loss of each step (the same on every
rank) and each rank's peak memory.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import memkern
from memkern.measure import PeakMemory


class TinyLM(nn.Module):
    """Embedding, one MLP block, lm_head: enough to show where the vocabulary is."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.block = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.norm(x + self.block(x))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--no-tensor-parallel", action="store_true", help="one-process lm_heads (for comparison)")
    return p.parse_args(argv)


def main(argv=None) -> list[float]:
    """The loss of each step. Uses the process group it finds, or starts one (torchrun)."""
    args = parse(argv)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))

    torch.manual_seed(0)  # the same replicated parts and the same data on every rank
    student = TinyLM(args.vocab, args.hidden).to(device)
    teacher = TinyLM(args.vocab, args.teacher_hidden).to(device).requires_grad_(False)
    if not args.no_tensor_parallel:
        # lm_head.weight becomes a DTensor sharded on the vocabulary (Shard(0)) over "tp"
        for model in (student, teacher):
            parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel()})
    loss_fn = memkern.nn.LinearKDLoss(alpha=0.5, temperature=2.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    losses = []
    with PeakMemory(device.type) as peak:
        for step in range(args.steps):
            with torch.no_grad():
                teacher_hidden = teacher.hidden_states(inputs)
            loss = loss_fn(
                student.hidden_states(inputs), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if rank == 0:
                print(f"step {step}: loss {loss.item():.6f}", flush=True)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak.peak_bytes)
    if rank == 0:
        for r, p in enumerate(peaks):
            print(f"rank {r}: peak memory {p / 2**20:.1f} MiB above the start ({device.type})", flush=True)
    if started:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
