"""The demo's stages: teacher -> students (labels only, distilled) -> pruned -> quantised.

Every stage is measured the same way: parameters, bytes of weights (memkern.memory_footprint),
peak memory of the stage's training (or, for the converted models, inference), validation
perplexity and bits per byte, and inference tokens per second.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import memkern
from memkern.measure import PeakMemory, pin_malloc_thresholds
from memkern.demo.corpus import CorpusError, Tokenizer, load_corpus
from memkern.demo.conversions import int4_group_size, quantised_stage
from memkern.demo.model import TinyLM

MIB = 2**20


class DemoError(ValueError):
    """Bad demo settings or input, reported without a traceback by the CLI."""


@dataclass
class DemoConfig:
    corpus: str | None = None
    """Text file or folder; None uses the Python standard library's sources."""
    max_corpus_bytes: int = 3_000_000
    vocab_size: int = 2048
    seq_len: int = 64
    batch_size: int = 16
    teacher_dims: tuple[int, int, int] = (128, 4, 4)
    """d_model, layers, heads."""
    student_dims: tuple[int, int, int] = (64, 4, 4)
    teacher_steps: int = 600
    student_steps: int = 600
    finetune_steps: int = 100
    lr: float = 3e-3
    alpha: float = 0.5
    temperature: float = 2.0
    share_layers: str | None = None
    """Student blocks to tie: "pairs" (0,1;2,3;...) or groups of block indices "0,1;2,3"."""
    prune_pattern: str = "2:4"
    """"2:4" (n:m) or "block"."""
    sparsity: float = 0.5
    eval_windows: int = 96
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A sub-minute smoke run."""
        base = cls(
            max_corpus_bytes=300_000,
            vocab_size=512,
            seq_len=32,
            batch_size=8,
            teacher_dims=(64, 2, 2),
            student_dims=(32, 2, 2),
            teacher_steps=25,
            student_steps=25,
            finetune_steps=8,
            eval_windows=16,
        )
        return replace(base, **overrides)

    def validate(self) -> None:
        for name in ("teacher_steps", "student_steps", "finetune_steps"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.prune_pattern not in ("2:4", "block"):
            raise DemoError(f"--prune-pattern must be '2:4' or 'block', got {self.prune_pattern!r}")
        if not 0 < self.sparsity < 1:
            raise DemoError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.prune_pattern == "2:4" and self.sparsity != 0.5:
            raise DemoError(f"2:4 pruning keeps exactly half the weights; --sparsity must be 0.5, got {self.sparsity}")
        if self.device not in ("cpu", "cuda"):
            raise DemoError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise DemoError("--device cuda asked for, but no CUDA device is available")


@dataclass
class Stage:
    name: str
    model: nn.Module = field(repr=False)
    parameters: int
    weight_bytes: int
    weight_bytes_by_dtype: dict[str, int]
    peak_mib: float
    peak_of: str
    """What the peak was measured over: "training", "pruning" or "inference"."""
    val_loss: float
    perplexity: float
    bits_per_byte: float
    tokens_per_s: float
    note: str = ""

    def row(self) -> dict[str, object]:
        return {
            "stage": self.name,
            "parameters": self.parameters,
            "weight_mib": round(self.weight_bytes / MIB, 4),
            "weights_by_dtype": " ".join(f"{k}:{v}" for k, v in sorted(self.weight_bytes_by_dtype.items())),
            "peak_mib": round(self.peak_mib, 2),
            "peak_of": self.peak_of,
            "val_perplexity": round(self.perplexity, 4),
            "bits_per_byte": round(self.bits_per_byte, 4),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "note": self.note,
        }


@dataclass
class DemoResult:
    config: DemoConfig
    corpus_source: str
    train_tokens: int
    val_tokens: int
    stages: list[Stage]
    seconds: float

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# -- data ------------------------------------------------------------------------------
class Batches:
    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, device: str):
        if tokens.numel() <= seq_len + 1:
            raise DemoError(
                f"the training text gives {tokens.numel()} tokens, fewer than one sequence of {seq_len + 1}"
            )
        self.tokens, self.seq_len, self.batch_size, self.device = tokens, seq_len, batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        window = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()]).to(self.device)
        return window[:, :-1], window[:, 1:]


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


# -- training and evaluation -----------------------------------------------------------
def _train(
    model: nn.Module,
    steps: int,
    batches: Batches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lr: float,
    label: str,
    progress: bool,
    after_step: Callable[[], None] | None = None,
) -> float:
    """AdamW with a cosine schedule; returns the last smoothed training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    smoothed = float("nan")
    with _progress(progress) as bar:
        task = bar.add_task(label, total=steps, status="")
        for _ in range(steps):
            x, y = batches.next()
            loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            value = loss.item()
            smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
            bar.update(task, advance=1, status=f"loss {smoothed:.3f}")
    model.eval()
    return smoothed


@torch.no_grad()
def _evaluate(
    model: nn.Module, val: torch.Tensor, token_bytes: torch.Tensor, cfg: DemoConfig
) -> tuple[float, float, float, float]:
    """Validation loss per token, perplexity, bits per byte and tokens per second over
    non-overlapping windows of the validation text."""
    model.eval()
    n = min(cfg.eval_windows, (val.numel() - 1) // cfg.seq_len)
    if n < 1:
        raise DemoError(f"the validation text gives {val.numel()} tokens, fewer than one window of {cfg.seq_len + 1}")
    windows = val[: n * cfg.seq_len + 1]
    x = windows[:-1].view(n, cfg.seq_len).to(cfg.device)
    y = windows[1:].view(n, cfg.seq_len).to(cfg.device)
    nats = 0.0
    start = time.perf_counter()
    for i in range(0, n, cfg.batch_size):
        logits = model(x[i : i + cfg.batch_size]).float()
        nats += F.cross_entropy(logits.flatten(0, 1), y[i : i + cfg.batch_size].flatten(), reduction="sum").item()
    seconds = time.perf_counter() - start
    tokens = y.numel()
    loss = nats / tokens
    bits_per_byte = nats / math.log(2) / token_bytes[y.cpu()].sum().item()
    return loss, math.exp(loss), bits_per_byte, tokens / seconds


# -- the pipeline ----------------------------------------------------------------------
def _share_groups(spec: str, n_layers: int) -> list[list[str]]:
    if spec == "pairs":
        if n_layers < 2:
            raise DemoError(f"--share-layers pairs needs at least 2 student layers, got {n_layers}")
        return [[f"blocks.{i}", f"blocks.{i + 1}"] for i in range(0, n_layers - 1, 2)]
    groups = []
    for part in spec.split(";"):
        try:
            groups.append([f"blocks.{int(i)}" for i in part.split(",")])
        except ValueError:
            raise DemoError(f"--share-layers takes 'pairs' or block indices like '0,1;2,3', got {spec!r}") from None
    return groups


def _sparse_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from memkern.nn import SparseLinear

    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def _pruned_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: sparse.to_dense() == 0 for name, sparse in _sparse_linears(model)}


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    cfg.validate()
    started = time.perf_counter()
    if cfg.device == "cpu":
        pin_malloc_thresholds()
    torch.manual_seed(cfg.seed)

    try:
        corpus = load_corpus(cfg.corpus, cfg.max_corpus_bytes)
    except CorpusError as exc:
        raise DemoError(str(exc)) from None
    train_chars, val_chars = len(corpus.train_text), len(corpus.val_text)
    log(f"corpus: {corpus.source}: {train_chars:,} training and {val_chars:,} validation characters")
    tokenizer = Tokenizer(corpus.train_text, cfg.vocab_size)
    train_tokens, val_tokens = tokenizer.encode(corpus.train_text), tokenizer.encode(corpus.val_text)
    token_bytes = tokenizer.token_bytes()
    log(
        f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens; {train_tokens.numel():,} training and "
        f"{val_tokens.numel():,} validation tokens"
    )
    vocab = tokenizer.vocab_size
    stages: list[Stage] = []

    def batches(offset: int) -> Batches:
        return Batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed + offset, cfg.device)

    def record(name: str, model: nn.Module, peak: PeakMemory, peak_of: str, note: str = "") -> Stage:
        fp = memkern.memory_footprint(model)
        loss, ppl, bpb, tps = _evaluate(model, val_tokens, token_bytes, cfg)
        stage = Stage(
            name,
            model,
            fp.parameters,
            fp.total_bytes,
            fp.by_dtype,
            peak.peak_bytes / MIB,
            peak_of,
            loss,
            ppl,
            bpb,
            tps,
            note,
        )
        stages.append(stage)
        log(
            f"{name}: perplexity {ppl:.2f}, {bpb:.3f} bits/byte, weights {fp.total_bytes / MIB:.2f} MiB, "
            f"peak {stage.peak_mib:.1f} MiB ({peak_of})"
        )
        return stage

    def new_model(dims: tuple[int, int, int]) -> TinyLM:
        d, layers, heads = dims
        return TinyLM(vocab, d, layers, heads, cfg.seq_len).to(cfg.device)

    def ce_loss(model: TinyLM) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    # One throwaway step first, so the one-time costs of the first training step (thread
    # pools, allocator and autograd set-up: ~160 MiB on the CPU) are not charged to the teacher.
    scratch = new_model(cfg.student_dims)
    _train(scratch, 1, batches(0), ce_loss(scratch), cfg.lr, "warm-up", False)
    del scratch

    # 1. teacher
    teacher = new_model(cfg.teacher_dims)
    with PeakMemory(cfg.device) as peak:
        _train(teacher, cfg.teacher_steps, batches(1), ce_loss(teacher), cfg.lr, "teacher", cfg.progress)
    record("teacher", teacher, peak, "training")
    teacher.requires_grad_(False)

    # 2. students: the same budget on labels only, and distilled
    def new_student() -> tuple[TinyLM, str]:
        torch.manual_seed(cfg.seed + 2)
        student = new_model(cfg.student_dims)
        if cfg.share_layers is None:
            return student, ""
        try:
            report = memkern.share_layers(student, _share_groups(cfg.share_layers, cfg.student_dims[1]))
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        return student, f"shared layers: {report}"

    student, note = new_student()
    with PeakMemory(cfg.device) as peak:
        _train(student, cfg.student_steps, batches(2), ce_loss(student), cfg.lr, "student (labels only)", cfg.progress)
    record("student (labels only)", student, peak, "training", note)

    student, note = new_student()
    kd = memkern.nn.LinearKDLoss(alpha=cfg.alpha, temperature=cfg.temperature)

    def distil_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_hidden = teacher.hidden(x).flatten(0, 1)
        return kd(
            student.hidden(x).flatten(0, 1), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, y.flatten()
        )

    with PeakMemory(cfg.device) as peak:
        _train(student, cfg.student_steps, batches(2), distil_loss, cfg.lr, "student (distilled)", cfg.progress)
    record(
        "student (distilled)",
        student,
        peak,
        "training",
        (note + "; " if note else "") + f"LinearKDLoss alpha={cfg.alpha} T={cfg.temperature}",
    )

    # 3. prune the distilled student one-shot with Wanda and with SparseGPT (which also updates
    # the kept weights), side by side, in the chosen pattern and unstructured at the same
    # sparsity; then fine-tune Wanda's (chosen pattern) with the pruned weights held at 0
    calibration = [batches(3).next()[0] for _ in range(4)]
    patterns = {
        cfg.prune_pattern: {"2:4": "n:m", "block": "block"}[cfg.prune_pattern],
        f"{cfg.sparsity:.0%} unstructured": "unstructured",
    }
    one_shot: dict[str, nn.Module] = {}
    reports = {}
    for label, pattern in patterns.items():
        for method in ("wanda", "sparsegpt"):
            model = copy.deepcopy(student)
            started_pruning = time.perf_counter()
            with PeakMemory(cfg.device) as peak:
                report = memkern.prune.prune_model(model, cfg.sparsity, pattern, method=method, calibration=calibration)
            per_layer = (time.perf_counter() - started_pruning) / max(1, len(report.layers))
            if label == cfg.prune_pattern:
                one_shot[method], reports[method] = model, report
            note = f"{report}; {per_layer * 1e3:.1f} ms per layer"
            record(f"pruned one-shot ({label} {method})", model, peak, "pruning", note)
    pruned = copy.deepcopy(one_shot["wanda"])
    with PeakMemory(cfg.device) as peak:
        zero_before = _pruned_positions(pruned)
        _train(pruned, cfg.finetune_steps, batches(4), ce_loss(pruned), cfg.lr / 3, "fine-tune (pruned)", cfg.progress)
    revived = [name for name, sparse in _sparse_linears(pruned) if (sparse.to_dense()[zero_before[name]] != 0).any()]
    if revived:
        raise RuntimeError(f"pruned weights became non-zero during fine-tuning in {', '.join(revived)}")
    zeros = sum(int(z.sum()) for z in zero_before.values())
    total = sum(z.numel() for z in zero_before.values())
    record(
        f"pruned ({cfg.prune_pattern} wanda)",
        pruned,
        peak,
        "training",
        f"{reports['wanda']}; {zeros / total:.1%} of the pruned layers' weights were zero before and "
        f"are still zero after {cfg.finetune_steps} fine-tuning steps",
    )

    # 4. quantise the pruned model, keeping its sparsity where memkern has the layer for it
    for scheme in ("int8", "fp16"):
        converted, note = quantised_stage(pruned, scheme)
        with PeakMemory(cfg.device) as peak:
            _evaluate(converted, val_tokens, token_bytes, cfg)
        record(f"{scheme} (from pruned)", converted, peak, "inference", note)

    # 5. 4-bit weights for the distilled student (W4A16, no pruning: group-wise 4-bit codes
    # cannot hold 2:4 zeros for free)
    def int4_stage() -> None:
        group = int4_group_size(m.in_features for m in student.modules() if isinstance(m, nn.Linear))
        converted = memkern.convert(copy.deepcopy(student), scheme="int4_weight_only", group_size=group)
        with PeakMemory(cfg.device) as peak:
            _evaluate(converted, val_tokens, token_bytes, cfg)
        record(
            "int4 (from distilled)",
            converted,
            peak,
            "inference",
            f"memkern.convert scheme=int4_weight_only group_size={group}",
        )

    int4_stage()

    return DemoResult(
        cfg, corpus.source, train_tokens.numel(), val_tokens.numel(), stages, time.perf_counter() - started
    )
