"""``python -m bench.faiss_scale --bundle DIR``: the index comparison on a bundle's own trained vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import faiss_scale


def _bundle(folder: Path, n_items: int = 6_000, n_users: int = 400, dim: int = 16) -> Path:
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(30, dim))
    for name, n in (("item_embeddings", n_items), ("user_embeddings", n_users)):
        x = centres[rng.integers(0, 30, n)] + 0.5 * rng.normal(size=(n, dim))
        np.save(folder / f"{name}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return folder


def test_the_trained_kind_measures_the_bundles_items_on_disjoint_users(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    sizes = ["--tuning-users", "150", "--held-out-users", "150"]
    args = faiss_scale.parse_args(
        ["--bundle", str(bundle), "--kinds", "ivf_flat", *sizes, "--json", str(tmp_path / "out" / "r.json")]
    )
    args.command_line = "test"
    assert args.data == ["trained"]
    items, tuning, held_out = faiss_scale.trained_catalogue(bundle, 150, 150, 0)
    assert len(items) == 6_000 and len(tuning) == len(held_out) == 150
    assert not ({row.tobytes() for row in tuning} & {row.tobytes() for row in held_out})
    result = faiss_scale.run(args)
    (row,) = result["runs"]
    assert result["items"] == 6_000 and result["dim"] == 16 and row["data"] == "trained"
    assert row["factory"] == "IVF256,Flat" and row["chosen"] is not None
    assert row["recall_held_out"] >= faiss_scale.RECALL_TARGET and set(row["params"]) == {"nprobe"}
    text = faiss_scale.markdown(result)
    assert text.startswith("## FAISS item index on a trained catalogue: 6,000 items of") and "`IVF256,Flat`" in text


@pytest.mark.parametrize("argv", [["--data", "trained"], ["--bundle", "x", "--data", "tight"]])
def test_trained_and_bundle_go_together(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        faiss_scale.parse_args(argv)


def _run(data: str, kind: str, cpu_ms: float, met: bool = True) -> dict[str, object]:
    return {
        "data": data,
        "kind": kind,
        "factory": f"F-{kind}",
        "chosen": {"params": {}} if met else None,
        "file_bytes": 500_000_000 if kind != "ivf_hnsw_pq" else 173_000_000,
        "latency_ms": {"cpu_p50": cpu_ms, "cpu_mean": cpu_ms},
    }


def test_the_planning_inputs_follow_the_kind_the_build_would_ship() -> None:
    runs = [
        _run("tight", "ivf_hnsw_flat", 0.3),
        _run("tight", "ivf_flat", 0.4),
        _run("loose", "ivf_hnsw_flat", 3.0),
        _run("loose", "ivf_flat", 1.5),
        _run("loose", "ivf_hnsw_pq", 0.9),  # faster, but the memory option: not what the build ships
        _run("medium", "ivf_flat", 0.1, met=False),  # missed the target
        _run("medium", "ivf_hnsw_flat", 0.5),
    ]
    result = {"items": 1_000_000, "dim": 128, "runs": runs}
    assert [faiss_scale.built_kind(result, d)["kind"] for d in ("tight", "medium", "loose")] == [  # type: ignore[index]
        "ivf_hnsw_flat",
        "ivf_hnsw_flat",
        "ivf_flat",
    ]
    inputs = faiss_scale.measurements(result)
    assert inputs["faiss_search_qps_per_core"].value == round(1000 / 1.5)  # the slowest shipped: loose, IVF-Flat
    assert inputs["faiss_bytes_per_item"].value == 500 and inputs["faiss_bytes_per_item_pq"].value == 173
