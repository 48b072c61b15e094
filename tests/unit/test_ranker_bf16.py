"""The bf16 scorer (export/ranker_bf16.py): the exported ranker's scores to within bf16 rounding, on any chunking
of the users, with out-of-vocabulary features clamped as the model clamps them; a model that moves further in
bf16 is refused; the CPU check reads the cpuinfo flags."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import ranker_bf16
from export.evaluate import default_context
from export.model_export import example_inputs, export_onnx
from export.models import Ranker
from export.ranker_bf16 import BF16_TOLERANCE, Bf16Scorer, Bf16ToleranceError, check_bf16, native_bf16
from export.ranker_factored import FactoredRanker


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(11)
    ranker = Ranker(embedding_dim=32)
    ranker.eval()
    return export_onnx(ranker, tmp_path_factory.mktemp("ranker") / "model.onnx")


def user_rows(n_users: int, n_candidates: int, seed: int) -> dict[str, np.ndarray]:
    """Ranker tensors of ``n_users`` x ``n_candidates`` rows, user-major, each user's inputs on all its rows, in
    the job's one context."""
    tensors = example_inputs(32, n_users * n_candidates, seed=seed)
    for name in ("user_embedding", "user_features"):
        tensors[name] = np.repeat(tensors[name][::n_candidates], n_candidates, axis=0)
    tensors["context_features"] = default_context(n_users * n_candidates)
    return tensors


def bf16_scores(scorer: Bf16Scorer, tensors: dict[str, np.ndarray], n_users: int) -> np.ndarray:
    """``scorer`` on ``tensors`` (from ``user_rows``): each user's candidates are its own rows."""
    n = len(tensors["item_embedding"]) // n_users
    return scorer.score(
        tensors["user_embedding"][::n],
        tensors["user_features"][::n],
        tensors["item_embedding"],
        tensors["item_features"],
        np.arange(n_users * n).reshape(n_users, n),
    )


def test_scores_are_the_models_to_within_bf16_rounding(exported: Path):
    tensors = user_rows(9, 50, seed=3)
    tensors["item_features"][::7] = 10_000  # past every vocabulary: both clamp it
    reference = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, tensors)[0]
    reference = reference.reshape(9, 50)
    got = bf16_scores(Bf16Scorer(FactoredRanker.from_onnx(exported), default_context(1)), tensors, 9)
    diff = np.abs(got - reference)
    assert diff.max() <= BF16_TOLERANCE
    assert diff.max() > 0  # the product really is bf16: fp32 matches to ~1e-7
    # The same user's top 10 keeps its items; only near-ties may swap.
    for ours, theirs in zip(got, reference, strict=True):
        top = set(np.argsort(-theirs, kind="stable")[:10].tolist())
        assert len(top & set(np.argsort(-ours, kind="stable")[:10].tolist())) >= 9


@pytest.mark.parametrize("users_per_call", [1, 4, 16])
def test_any_chunking_of_the_users_gives_the_same_scores(exported: Path, users_per_call: int):
    tensors = user_rows(7, 30, seed=5)  # 7 users: chunks of 4 and 16 do not line up with them
    ranker = FactoredRanker.from_onnx(exported)
    one_by_one = bf16_scores(Bf16Scorer(ranker, default_context(1), users_per_call=1), tensors, 7)
    got = bf16_scores(Bf16Scorer(ranker, default_context(1), users_per_call=users_per_call), tensors, 7)
    np.testing.assert_allclose(got, one_by_one, rtol=0, atol=1e-6)


def test_an_empty_slot_gets_a_score_for_the_caller_to_mask(exported: Path):
    tensors = user_rows(2, 5, seed=1)
    scorer = Bf16Scorer(FactoredRanker.from_onnx(exported), default_context(1))
    candidates = np.array([[0, 1, 2, -1, -1], [5, 6, 7, 8, 9]])
    got = scorer.score(
        tensors["user_embedding"][::5],
        tensors["user_features"][::5],
        tensors["item_embedding"],
        tensors["item_features"],
        candidates,
    )
    full = bf16_scores(scorer, tensors, 2)
    assert got.shape == (2, 5) and np.isfinite(got).all()
    np.testing.assert_allclose(got[0, :3], full[0, :3], atol=1e-6)
    np.testing.assert_allclose(got[1], full[1], atol=1e-6)


def test_a_model_that_moves_further_in_bf16_is_refused(exported: Path):
    tensors = user_rows(4, 8, seed=2)
    reference = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, tensors)[0]
    scorer = Bf16Scorer(FactoredRanker.from_onnx(exported), default_context(1))
    rows = {k: v for k, v in tensors.items() if k != "context_features"}
    assert check_bf16(scorer, reference, rows) <= BF16_TOLERANCE
    with pytest.raises(Bf16ToleranceError, match=r"within 0\.01.*max \|diff\| 0\.05.*--ranker factored"):
        check_bf16(scorer, reference + 0.05, rows)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu avx512f amx_bf16 amx_tile", True),
        ("fpu avx2 fma", False),
    ],
)
def test_native_bf16_reads_the_cpu_flags(tmp_path: Path, flags: str, native: bool):
    cpuinfo = tmp_path / "cpuinfo"
    core = f"model name\t: test\nflags\t\t: {flags}\n"
    cpuinfo.write_text(f"processor\t: 0\n{core}\nprocessor\t: 1\n{core}")
    assert native_bf16(cpuinfo) is native


def test_without_cpuinfo_bf16_is_not_native(tmp_path: Path):
    assert native_bf16(tmp_path / "missing") is False


def test_bf16_on_a_cpu_without_it_says_it_will_be_slower(monkeypatch: pytest.MonkeyPatch, caplog):
    monkeypatch.setattr(ranker_bf16, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="export.ranker_bf16"):
        ranker_bf16.warn_unless_native()
    assert "without avx512_bf16 or amx_bf16" in caplog.text and "slower than fp32" in caplog.text
