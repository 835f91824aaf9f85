"""``bench --sparse``: the records of a tiny run (every teacher, its bytes, the loss against the dense
loss's) and the results file with its metadata."""

from __future__ import annotations

import json

import torch

from logitstd_kernels._backends import unavailable_reason
from logitstd_kernels.bench import sparse
from logitstd_kernels.cli import main
from support import needs


@needs(unavailable_reason("cpu", "cpu") is None, "the C++ extension is not built")
def test_tiny_run_writes_its_records(tmp_path):
    assert main(["bench", "--sparse", "--rows", "8", "--vocab", "300", "--out", str(tmp_path)]) == 0
    (path,) = (tmp_path / "sparse").glob("*.json")
    data = json.loads(path.read_text())
    assert data["metadata"]["sparse"] and data["metadata"]["vocab"] == 300 and data["metadata"]["git_commit"]
    names = [r["teacher"] for r in data["results"]]
    assert names == ["dense", "sparse-renormalize", "sparse-renormalize_teacher", "sparse-tail"]
    dense, *rest = data["results"]
    assert dense["loss_rel_diff_to_dense"] == 0 and all(r["teacher_bytes"] < dense["teacher_bytes"] for r in rest)
    assert all(r["seconds"] > 0 for r in data["results"])


def test_full_support_measures_the_dense_loss():
    records = sparse.measure(dict(rows=4, vocab=64, k=64), torch.device("cpu"), "torch")
    assert all(r["loss_rel_diff_to_dense"] < 1e-5 for r in records)
