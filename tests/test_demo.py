"""`memkern demo --quick`: the report's structure, and each stage's figures checked
against what memkern's own tools compute for that stage's model."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys

import pytest
import torch

import memkern
from memkern.demo import DemoConfig, run_demo
from memkern.demo.corpus import load_corpus
from memkern.demo.report import COLUMNS, write_all

STAGES = [
    "teacher",
    "student (labels only)",
    "student (distilled)",
    "pruned one-shot (2:4 wanda)",
    "pruned one-shot (2:4 sparsegpt)",
    "pruned one-shot (50% unstructured wanda)",
    "pruned one-shot (50% unstructured sparsegpt)",
    "pruned (2:4 wanda)",
    "int8 (from pruned)",
    "fp16 (from pruned)",
    "int4 (from distilled)",
]


@pytest.fixture(scope="module")
def result():
    return run_demo(DemoConfig.quick(progress=False), log=lambda _: None)


def test_report_has_every_stage_with_finite_figures(result):
    assert [s.name for s in result.stages] == STAGES
    for s in result.stages:
        assert s.parameters > 0 and s.weight_bytes > 0 and s.peak_mib > 0 and s.tokens_per_s > 0
        assert s.perplexity > 1 and s.perplexity < result.config.vocab_size * 2, s
        assert s.bits_per_byte > 0
        expected = "training"
        if s.name.startswith(("int8", "fp16", "int4")):
            expected = "inference"
        elif s.name.startswith("pruned one-shot"):
            expected = "pruning"
        assert s.peak_of == expected, s.name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_unstructured_one_shot_stages_prune_half_of_every_layer(result, method):
    stage = result.stage(f"pruned one-shot (50% unstructured {method})")
    layers = [m for m in stage.model.modules() if isinstance(m, memkern.nn.SparseLinear)]
    assert layers and stage.note.endswith("ms per layer")
    for layer in layers:
        dense = layer.to_dense()
        assert (dense == 0).float().mean().item() == pytest.approx(0.5, abs=1 / dense.shape[1])


def test_each_stage_reports_the_footprint_of_its_model(result):
    for s in result.stages:
        fp = memkern.memory_footprint(s.model)
        assert s.weight_bytes == fp.total_bytes, s.name
        assert s.weight_bytes_by_dtype == fp.by_dtype, s.name
        assert s.parameters == fp.parameters, s.name
    assert result.stage("int8 (from pruned)").weight_bytes_by_dtype.get("int8", 0) > 0
    assert result.stage("fp16 (from pruned)").weight_bytes_by_dtype.get("float16", 0) > 0


def test_pruned_stage_has_the_requested_sparsity(result):
    model = result.stage("pruned (2:4 wanda)").model
    layers = [m for m in model.modules() if isinstance(m, memkern.nn.SparseLinear)]
    assert layers, "no layer was pruned"
    zeros = sum(int((m.to_dense() == 0).sum()) for m in layers)
    total = sum(m.out_features * m.in_features for m in layers)
    assert zeros / total == pytest.approx(result.config.sparsity, abs=1e-3)
    for m in layers:  # 2:4: at most two kept weights in every group of four
        kept = (m.to_dense() != 0).reshape(m.out_features, -1, 4).sum(-1)
        assert (kept <= 2).all()


def test_quantised_stages_stay_within_5_percent_of_the_stage_before(result):
    ppl = {s.name: s.perplexity for s in result.stages}
    assert ppl["int8 (from pruned)"] <= 1.05 * ppl["pruned (2:4 wanda)"]
    assert ppl["fp16 (from pruned)"] <= 1.05 * ppl["int8 (from pruned)"]
    assert abs(ppl["int8 (from pruned)"] / ppl["pruned (2:4 wanda)"] - 1) < 0.05


def test_int4_stage_stores_4_bit_codes_and_keeps_the_students_perplexity(result):
    int4 = result.stage("int4 (from distilled)")
    layers = [m for m in int4.model.modules() if isinstance(m, memkern.nn.Int4WeightOnlyLinear)]
    assert layers and all(m.group_size == 32 for m in layers)  # the quick student is 32 wide
    # Its codes are half a byte a weight: fewer bytes than the same student in int8, whose
    # one scale per row does not make up for the other half byte.
    int8 = memkern.convert(copy.deepcopy(result.stage("student (distilled)").model), "int8")
    assert int4.weight_bytes_by_dtype.get("uint8", 0) > 0
    assert int4.weight_bytes < memkern.memory_footprint(int8).total_bytes
    ppl = result.stage("student (distilled)").perplexity
    assert abs(int4.perplexity / ppl - 1) < 0.05  # 4-bit groups of 32: within 5% of the float32 student
    assert int4.tokens_per_s > 0 and int4.peak_of == "inference"


def test_teacher_and_students_learned_something(result):
    # An untrained model sits near perplexity = vocabulary size.
    vocab = result.config.vocab_size
    for name in ("teacher", "student (labels only)", "student (distilled)"):
        assert result.stage(name).perplexity < 0.9 * vocab, name


def test_csv_and_png_are_written(result, tmp_path):
    csv_path, png_path = write_all(result, str(tmp_path))
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["stage"] for r in rows] == STAGES
    assert float(rows[0]["weight_mib"]) == pytest.approx(result.stages[0].weight_bytes / 2**20, abs=1e-3)
    assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _demo_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memkern.cli", "demo", "--quick", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--corpus", "/nonexistent/texts"], ["/nonexistent/texts", "does not exist"]),
        (["--teacher-steps", "0"], ["--teacher-steps", "at least 1", "0"]),
        (["--share-layers", "0,7"], ["blocks.7", "not a module"]),
        (["--share-layers", "a,b"], ["--share-layers", "'a,b'"]),
    ],
    ids=["missing-corpus", "zero-steps", "share-group-mismatch", "share-group-syntax"],
)
def test_bad_input_is_one_clear_line(args, words):
    out = _demo_cli(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for w in words:
        assert w in out.stderr


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "image.bin").write_bytes(b"\0\1\2" * 100)
    out = _demo_cli("--corpus", str(tmp_path))
    assert out.returncode == 2 and "no readable text" in out.stderr and "Traceback" not in out.stderr


def test_shared_student_ties_its_blocks():
    cfg = DemoConfig.quick(
        progress=False, share_layers="pairs", teacher_steps=2, student_steps=2, finetune_steps=1, eval_windows=2
    )
    res = run_demo(cfg, log=lambda _: None)
    student = res.stage("student (distilled)").model
    assert student.blocks[0] is student.blocks[1]
    unshared = memkern.memory_footprint(res.stage("teacher").model)  # sanity: footprints are per model
    assert res.stage("student (distilled)").weight_bytes < unshared.total_bytes
    assert "saved" in res.stage("student (distilled)").note
    assert torch.isfinite(torch.tensor(res.stage("fp16 (from pruned)").perplexity))


# -- the corpus split ---------------------------------------------------------------------------
def _text(chars: int, seed: int = 0) -> str:
    lines = "".join(
        f"line {i} of text {seed}: the quick brown fox jumps over the lazy dog\n" for i in range(chars // 40)
    )
    return lines[:chars]


def test_a_single_file_corpus_is_split_within_the_file(tmp_path):
    # 490,937 characters: under 2 x 10% of the default 3 MB budget, so the file counts as
    # a validation file; the split has to happen inside it.
    text = _text(490_937)
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "book.txt"), DemoConfig().max_corpus_bytes)
    cut = int(490_937 * 0.9)
    assert corpus.train_text == text[:cut] and corpus.val_text == text[cut:]


def test_a_folder_under_the_validation_share_is_split_by_text(tmp_path):
    texts = [_text(5_000, seed) for seed in range(3)]
    for seed, text in enumerate(texts):
        (tmp_path / f"part{seed}.txt").write_text(text)
    corpus = load_corpus(str(tmp_path), DemoConfig().max_corpus_bytes)
    joined = corpus.train_text + corpus.val_text
    total = 3 * 5_000 + 2  # joined by two newlines
    assert len(joined) == total and all(text in joined for text in texts)
    assert len(corpus.train_text) == int(total * 0.9)
