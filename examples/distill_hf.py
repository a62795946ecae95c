"""Distil a tiny randomly initialised Llama student from a larger tiny teacher with
memkern's DistillationTrainer, on synthetic data, and print the loss of each step.

    python examples/distill_hf.py --steps 20

The data is a fixed set of sequences the teacher has first been trained to predict a
little, so the student has something to learn. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback, TrainingArguments

from memkern.integrations.hf import DistillationTrainer

VOCAB, SEQ = 256, 24


def synthetic_data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences that count upwards by a per-row step (mod VOCAB), some right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, step = torch.randint(0, VOCAB, (2,), generator=g).tolist()
        ids = (start + (step % 7 + 1) * torch.arange(SEQ)) % VOCAB
        length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(SEQ) < length).long()})
    return rows


def tiny_llama(hidden: int, layers: int) -> AutoModelForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return AutoModelForCausalLM.from_config(config)


def warm_up_teacher(teacher, data, steps: int) -> None:
    """A few steps of plain next-token training, so the teacher's distribution is not uniform."""
    ids = torch.stack([r["input_ids"] for r in data])
    mask = torch.stack([r["attention_mask"] for r in data])
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = teacher(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()


class RecordLoss(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            print(f"step {state.global_step:3d}  loss {logs['loss']:.4f}")


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label cross entropy")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--teacher-steps", type=int, default=20, help="plain training steps of the teacher first")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = synthetic_data(32)
    teacher = tiny_llama(hidden=64, layers=2)
    warm_up_teacher(teacher, data, args.teacher_steps)
    student = tiny_llama(hidden=32, layers=1)
    record = RecordLoss()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=training,
            train_dataset=data,
            kd_options=dict(alpha=args.alpha, temperature=args.temperature),
            callbacks=[record],
        )
        trainer.train()
    return record.losses


if __name__ == "__main__":
    main()
