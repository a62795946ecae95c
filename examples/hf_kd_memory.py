"""Peak CPU memory of one distillation step (forward + backward) on transformers models:
memkern's fused ``distillation_loss`` against the plain loss from full logits.

    python examples/hf_kd_memory.py [--vocab 32000] [--seq 512] [--batch 2] [--hidden 64]

Each way runs in a fresh subprocess, warms up once, then reports the rise of its peak
resident set during one more step (memkern.measure.PeakMemory).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

ALPHA, TEMPERATURE = 0.5, 2.0


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    def model(hidden):
        return AutoModelForCausalLM.from_config(
            LlamaConfig(
                vocab_size=args.vocab,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=args.seq,
            )
        )

    torch.manual_seed(0)
    student, teacher = model(args.hidden), model(2 * args.hidden).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    return student, teacher, ids, torch.ones_like(ids)


def full_logits_step(student, teacher, ids, mask):
    """What one writes without memkern: both models' logits, CE + T^2 KL."""
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = ids[:, 1:].reshape(-1)
    logits, teacher_logits = logits.reshape(targets.numel(), -1), teacher_logits.reshape(targets.numel(), -1)
    ce = F.cross_entropy(logits, targets)
    kl = F.kl_div(
        F.log_softmax(logits / TEMPERATURE, -1),
        F.log_softmax(teacher_logits / TEMPERATURE, -1),
        log_target=True,
        reduction="batchmean",
    )  # sum / rows: the mean over tokens
    loss = ALPHA * ce + (1 - ALPHA) * TEMPERATURE**2 * kl
    loss.backward()


def fused_step(student, teacher, ids, mask):
    from memkern.integrations.hf import distillation_loss

    distillation_loss(student, teacher, ids, mask, alpha=ALPHA, temperature=TEMPERATURE).backward()


def measure(args) -> None:
    from memkern.measure import PeakMemory, pin_malloc_thresholds

    pin_malloc_thresholds()
    student, teacher, ids, mask = build(args)
    step = fused_step if args.measure == "fused" else full_logits_step
    step(student, teacher, ids, mask)
    student.zero_grad(set_to_none=False)  # the gradient buffers exist before the measured step
    with PeakMemory("cpu") as peak:
        step(student, teacher, ids, mask)
    print(json.dumps({"peak_bytes": peak.peak_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="student hidden size (the teacher's is twice)")
    parser.add_argument("--measure", choices=["fused", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    shape = f"batch {args.batch}, seq {args.seq}, vocab {args.vocab}, hidden {args.hidden}/{2 * args.hidden}"
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; {shape}"
    )
    logits_mib = args.batch * (args.seq - 1) * args.vocab * 4 / 2**20
    print(f"one float32 logits tensor: {logits_mib:.0f} MiB")
    for way in ("full", "fused"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--measure", way], capture_output=True, text=True, check=True
        )
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
        print(
            f"{'full logits (eager PyTorch)' if way == 'full' else 'memkern distillation_loss':30s} "
            f"peak {peak:8.1f} MiB"
        )


if __name__ == "__main__":
    main()
