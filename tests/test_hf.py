"""memkern.integrations.hf: the fused distillation loss on transformers causal LMs, and the Trainer."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    Qwen2Config,  # noqa: E402
    TrainingArguments,
)

from conftest import CPU_BACKENDS, assert_rel_close, tiny_decoder_config  # noqa: E402
from memkern.integrations.hf import DistillationTrainer, distillation_loss  # noqa: E402

VOCAB = 160
CONFIGS = {
    "llama": lambda: LlamaConfig(**tiny_decoder_config(VOCAB, max_position_embeddings=64)),
    "qwen2": lambda: Qwen2Config(**tiny_decoder_config(VOCAB, max_position_embeddings=64)),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
}


def _pair(config):
    # eval(): GPT-2's dropout would make two forward passes differ; gradients still flow.
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).eval()
    teacher = AutoModelForCausalLM.from_config(config).eval()
    return student, teacher


@pytest.fixture(scope="module")
def model_pairs():
    return {}


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in the second row
    return ids, mask


def full_logits_loss(student, teacher, ids, mask, labels=None, *, alpha, temperature, divisor=None, softcap=None):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) from the models' logits, in float64
    (soft-capped first with ``softcap``: cap * tanh(logits / cap))."""
    targets = (ids if labels is None else labels).masked_fill(mask == 0, -100)[:, 1:]
    s = student(input_ids=ids, attention_mask=mask).logits.double()[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits.double()[:, :-1]
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    kept = targets != -100
    s, t, y = s[kept], t[kept], targets[kept]
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).sum()
    log_pt, log_ps = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    total = alpha * ce + (1 - alpha) * temperature**2 * kl
    return total / (kept.sum() if divisor is None else divisor)


def _student_grads(student, loss):
    student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters()])


# Every CPU backend on one architecture; the other architectures on the default backend.
@pytest.mark.parametrize(
    "arch, backend", [*(("llama", b) for b in CPU_BACKENDS), ("qwen2", "cpp"), ("gpt2", "cpp")], indirect=["backend"]
)
def test_loss_and_student_gradients_equal_the_full_logits_formula(model_pairs, arch, backend):
    if arch not in model_pairs:
        model_pairs[arch] = _pair(CONFIGS[arch]())
    student, teacher = model_pairs[arch]
    ids, mask = _batch()
    opts = dict(alpha=0.3, temperature=2.0)
    loss = distillation_loss(student, teacher, ids, mask, **opts)
    grads = _student_grads(student, loss)
    ref = full_logits_loss(student, teacher, ids, mask, **opts)
    ref_grads = _student_grads(student, ref)
    assert_rel_close(loss, ref, torch.float32)
    assert_rel_close(grads, ref_grads, torch.float32)
    assert all(p.grad is None for p in teacher.parameters())
    # With num_items_in_batch: the sum over this call divided by it (here not this call's count).
    with torch.no_grad():
        summed = distillation_loss(student, teacher, ids, mask, num_items_in_batch=37, **opts)
        assert_rel_close(summed, full_logits_loss(student, teacher, ids, mask, divisor=37, **opts), torch.float32)


def test_padding_and_ignored_labels_count_in_neither_term():
    student, teacher = _pair(CONFIGS["llama"]())
    ids, mask = _batch()
    labels = ids.clone()
    labels[0, 3] = -100
    loss = distillation_loss(student, teacher, ids, mask, labels, alpha=0.5)
    # Other tokens under the padding, and another label where it is ignored: same loss.
    ids2, labels2 = ids.clone(), labels.clone()
    ids2[1, 6:] = (ids2[1, 6:] + 1) % VOCAB
    labels2[1, 6:] = 0
    loss2 = distillation_loss(student, teacher, ids2, mask, labels2, alpha=0.5)
    assert torch.equal(loss, loss2)
    ref = full_logits_loss(student, teacher, ids, mask, labels, alpha=0.5, temperature=1.0)
    assert_rel_close(loss, ref, torch.float32)


def test_scaled_and_soft_capped_logits_are_followed():
    student, teacher = _pair(GraniteConfig(**tiny_decoder_config(VOCAB, logits_scaling=4.0)))
    ids, mask = _batch()
    loss = distillation_loss(student, teacher, ids, mask, alpha=0.2, temperature=1.5)
    assert_rel_close(loss, full_logits_loss(student, teacher, ids, mask, alpha=0.2, temperature=1.5), torch.float32)

    # A soft-cap in the config (Gemma 2's final_logit_softcapping; Granite's forward does not
    # apply it, so the reference applies it to the logits itself): a small cap changes the loss.
    student.config.final_logit_softcapping = teacher.config.final_logit_softcapping = 0.5
    capped = distillation_loss(student, teacher, ids, mask, alpha=0.2, temperature=1.5)
    ref = full_logits_loss(student, teacher, ids, mask, alpha=0.2, temperature=1.5, softcap=0.5)
    assert_rel_close(capped, ref, torch.float32)
    assert not torch.allclose(capped, loss)
    with pytest.raises(TypeError, match="reduction"):
        distillation_loss(teacher, teacher, ids, mask, reduction="sum")
    with pytest.raises(TypeError, match="normalizer"):
        distillation_loss(teacher, teacher, ids, mask, normalizer=3)


def _dataset():
    # Micro-batches of different token counts (15 and 6 targets), where a mean per
    # micro-batch would weigh the tokens differently from one large batch.
    g = torch.Generator().manual_seed(3)
    lengths = [9, 8, 4, 4]
    rows = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (9,), generator=g)
        mask = (torch.arange(9) < n).long()
        rows.append({"input_ids": ids, "attention_mask": mask})
    return rows


def _train_one_step(tmp_path, batch_size, accumulation, kd_options=None):
    student, teacher = _pair(CONFIGS["llama"]())
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=_dataset(),
        kd_options=kd_options or dict(alpha=0.4, temperature=2.0),
    )
    trainer.train()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    return torch.cat([p.detach().reshape(-1) for p in student.parameters()])


# The plain loss, and the options path (soft-caps, the terms returned apart, small chunks):
# both divide the summed loss by num_items_in_batch through normalizer.
_TRAINER_OPTIONS = {
    "plain": dict(alpha=0.4, temperature=2.0),
    "options": dict(
        alpha=0.4, temperature=2.0, student_softcap=3.0, teacher_softcap=4.0, chunk_size=5, return_components=True
    ),
}


@pytest.mark.parametrize("options", sorted(_TRAINER_OPTIONS))
def test_gradient_accumulation_equals_one_step_on_the_doubled_batch(tmp_path, options):
    start = torch.cat([p.detach().reshape(-1) for p in _pair(CONFIGS["llama"]())[0].parameters()])
    accumulated = _train_one_step(tmp_path, batch_size=2, accumulation=2, kd_options=_TRAINER_OPTIONS[options])
    large = _train_one_step(tmp_path, batch_size=4, accumulation=1, kd_options=_TRAINER_OPTIONS[options])
    assert not torch.equal(accumulated, start)
    assert_rel_close(accumulated - start, large - start, torch.float32)


def test_example_distils_a_tiny_model():
    path = pathlib.Path(__file__).parents[1] / "examples" / "distill_hf.py"
    spec = importlib.util.spec_from_file_location("distill_hf", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "3", "--teacher-steps", "5"])
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
