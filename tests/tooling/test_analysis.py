"""The conflict analysis (logitstd_kernels.analysis, seed 000) and the ``analyze`` command.

The independent check is ``_seed_rule`` below: a transcription of the seed notebook's
``per_sample_kl`` / ``standardize_logits`` / ``analyze_split``, used only here.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitstd_kernels as lsk
from logitstd_kernels import analysis as an
from logitstd_kernels.cli import main as cli_main
from logitstd_kernels.experiments.logit_io import NpyRows, load_array, load_bundle, save_bundle


def _seed_rule(teacher, student_a, student_b, labels, *, T, class_mean, eps, log_eps):
    """The seed's rule in eager float64 (``class_mean`` and ``log_eps=1e-12`` give the notebook verbatim)."""
    def per_sample_kl(t, s):
        p_t = F.softmax(t / T, dim=1)
        log_p_s = F.log_softmax(s / T, dim=1)
        log_p_t = torch.log(p_t + log_eps) if log_eps else F.log_softmax(t / T, dim=1)
        terms = p_t * (log_p_t - log_p_s)
        return terms.mean(dim=1) if class_mean else terms.sum(dim=1)

    def standardize(x):
        return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)

    t_pred, a_pred, b_pred = teacher.argmax(1), student_a.argmax(1), student_b.argmax(1)
    conflict = ((per_sample_kl(teacher, student_b) < per_sample_kl(teacher, student_a)) & (b_pred != t_pred)
                & ((a_pred == t_pred) | (a_pred == labels)))
    t_std, a_std, b_std = standardize(teacher), standardize(student_a), standardize(student_b)
    corrected = conflict & (per_sample_kl(t_std, a_std) < per_sample_kl(t_std, b_std))
    return conflict.numpy(), corrected.numpy()


def _random_logits(seed: int, n: int = 3000, v: int = 37, dtype=torch.float64) -> an.LogitSet:
    """Fresh logits where conflicts are common: two equally noisy students, A on its own logit scale."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = 2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    teacher[torch.arange(n), labels] += 4.0
    scale = torch.empty(n, 1, dtype=torch.float64).uniform_(0.3, 3.0, generator=g)
    a = scale * (teacher + torch.randn(n, v, generator=g, dtype=torch.float64))
    b = teacher + torch.randn(n, v, generator=g, dtype=torch.float64)
    return an.LogitSet(teacher.to(dtype), a.to(dtype), b.to(dtype), labels)


# the analysis runs on CPU tensors: check every backend that can compute them here
CPU_BACKENDS = [b for b in lsk.available_backends() if b in ("torch", "cpu")]


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


# Rows known by hand (V = 4, labels y):
#  0: Figure 2. B = [2, 2.8, 3, 1] predicts 2, the teacher 1; A = teacher / 10 agrees, but its flat
#     softmax is far from the teacher's, so B has the lower KL: a conflict. Z-scored, A equals the
#     teacher exactly (KL 0): corrected.
#  1: B swaps the teacher's nearly tied top two (KL ~ 0 before and after z-scoring); A = [3, 3.1, 0, 0]
#     agrees but has another shape: a conflict, not corrected.
#  2: like 1 but A predicts class 0, agreeing with neither the teacher nor the label: no conflict.
#  3: A agrees with the label (2), not the teacher (1); B predicts 2 too, but has the lower KL: a
#     conflict through the label clause, not corrected (B is still the closer shape).
#  4: B agrees with the teacher: no conflict.
#  5: A is the teacher itself (KL 0 < KL_B): no conflict.
HAND = an.LogitSet(
    torch.tensor([[1., 4, 3, 1], [0, 5, 4.9, 0], [0, 5, 4, 0], [0, 5, 4.9, 0], [0, 5, 4, 0], [0, 5, 4, 0]]),
    torch.tensor([[.1, .4, .3, .1], [3, 3.1, 0, 0], [5, 0, 0, 0], [0, 0.1, 3, 0], [0, 5, 4, 0], [0, 5, 4, 0]]),
    torch.tensor([[2, 2.8, 3, 1], [0, 4.9, 5, 0], [0, 4, 5, 0], [0, 4.9, 5, 0], [0, 5, 3, 0], [0, 4, 5, 0]]),
    torch.tensor([1, 1, 1, 2, 1, 1]),
)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("class_mean", [False, True])
def test_conflict_rule_on_rows_known_by_hand(temperature, class_mean):
    settings = an.KLSettings(temperature=temperature, class_mean=class_mean)
    stats = an.sample_stats(HAND, settings)
    conflict, corrected = an.conflict_masks(stats)
    assert conflict.tolist() == [True, True, False, True, False, False]
    assert corrected.tolist() == [True, False, False, False, False, False]
    report = an.summarize(stats, split="hand", num_classes=4, settings=settings, examples=10)
    assert (report.conflicts, report.corrected) == (3, 1)
    assert report.conflict_indices == [0, 1, 3] and report.corrected_indices == [0]
    assert report.conflict_fraction == pytest.approx(0.5) and report.corrected_fraction == pytest.approx(1 / 3)
    assert [(e.index, e.label, e.teacher_pred, e.a_pred, e.b_pred, e.corrected) for e in report.examples] == [
        (0, 1, 1, 1, 2, True), (1, 1, 1, 1, 2, False), (3, 2, 1, 2, 2, False)]
    # exactly one student (A) agrees with the teacher in rows 0, 1 and 5 (in 2 and 3 neither does, in 4
    # both); A has the lower KL in row 5 before z-scoring, and in rows 0 and 5 after
    assert report.decisive == 3
    assert (report.lower_kl_agrees_before, report.lower_kl_agrees_after) == (1, 2)


def test_figure2_kls_match_the_seed_formula():
    stats = an.sample_stats(HAND, an.KLSettings(temperature=1.0))
    assert stats.kl_a[0] == pytest.approx(0.4274, abs=1e-4)
    assert stats.kl_b[0] == pytest.approx(0.2427, abs=1e-4)
    assert stats.kl_b_std[0] == pytest.approx(0.1087, abs=1e-4)
    assert abs(stats.kl_a_std[0]) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed_figures", [False, True])
def test_agrees_with_a_direct_implementation_of_the_seed_rule(seed_figures, backend):
    seed = _fresh_seed()
    logits = _random_logits(seed)
    settings = replace(an.SEED_FIGURES if seed_figures else an.KLSettings(), backend=backend)
    conflict, corrected = _seed_rule(*logits, T=3.0, class_mean=seed_figures, eps=settings.eps,
                                     log_eps=1e-12 if seed_figures else 0.0)
    assert conflict.sum() > 50 and 0 < corrected.sum() < conflict.sum(), f"seed {seed}: data not informative"
    for chunk_rows in (None, 257):
        report = an.analyze_split(logits, settings, chunk_rows=chunk_rows)
        assert report.conflict_indices == np.flatnonzero(conflict).tolist(), f"seed {seed}, chunk_rows {chunk_rows}"
        assert report.corrected_indices == np.flatnonzero(corrected).tolist(), f"seed {seed}, chunk_rows {chunk_rows}"


def test_float32_logits_agree_with_the_seed_rule_up_to_float32_ties():
    seed = _fresh_seed()
    logits64 = _random_logits(seed)
    logits32 = an.LogitSet(*(x.float() for x in logits64[:3]), logits64.labels)
    conflict, corrected = _seed_rule(*logits64, T=3.0, class_mean=False, eps=1e-7, log_eps=0.0)
    stats = an.sample_stats(logits32)
    got_conflict, got_corrected = an.conflict_masks(stats)
    # rows where a KL comparison is within float32 noise may legitimately go either way
    close = (np.abs(stats.kl_a - stats.kl_b) < 1e-5 * (stats.kl_a + stats.kl_b)) | \
            (np.abs(stats.kl_a_std - stats.kl_b_std) < 1e-5 * (stats.kl_a_std + stats.kl_b_std))
    assert np.array_equal(got_conflict[~close], conflict[~close]), f"seed {seed}"
    assert np.array_equal(got_corrected[~close], corrected[~close]), f"seed {seed}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_and_unchunked_analysis_agree_exactly(backend):
    logits = _random_logits(_fresh_seed(), n=300, v=50, dtype=torch.float32)
    settings = an.KLSettings(backend=backend)
    whole = an.sample_stats(logits, settings, chunk_rows=10**9)
    for chunk_rows in (1, 3, 64, 299, None):
        parts = an.sample_stats(logits, settings, chunk_rows=chunk_rows)
        for name in vars(whole):
            assert np.array_equal(getattr(parts, name), getattr(whole, name)), (name, chunk_rows)
    assert an.analyze_split(logits, settings, chunk_rows=7) == an.analyze_split(logits, settings, chunk_rows=None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunking_wide_rows(backend):
    """Rows wider than a kernel block. The fused kernel computes each row alone, so any chunking gives
    the same bits; eager PyTorch picks its reduction strategy by shape, so there it agrees to rounding."""
    g = torch.Generator().manual_seed(_fresh_seed())
    t = torch.randn(24, 70000, generator=g)
    logits = an.LogitSet(t, 0.5 * t + torch.randn(24, 70000, generator=g), t + torch.randn(24, 70000, generator=g),
                         torch.zeros(24, dtype=torch.long))
    settings = an.KLSettings(backend=backend)
    whole = an.sample_stats(logits, settings, chunk_rows=24)
    for chunk_rows in (1, 5):
        parts = an.sample_stats(logits, settings, chunk_rows=chunk_rows)
        for name in ("kl_a", "kl_b", "kl_a_std", "kl_b_std"):
            if backend == "torch":
                # Each KL is a float32 sum of V terms whose magnitudes add up to about log V ~ 11:
                # reductions in another order differ by ~1e-6 absolute (seen: 9.5e-7), whatever the KL.
                np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=0, atol=1e-5)
            else:
                assert np.array_equal(getattr(parts, name), getattr(whole, name)), (name, chunk_rows)


def test_memory_mapped_npy_and_tensor_inputs_give_the_same_report(tmp_path):
    logits = _random_logits(_fresh_seed(), n=500, v=20, dtype=torch.float32)
    paths = []
    for name, array in zip(("t", "a", "b", "y"), logits):
        paths.append(tmp_path / f"{name}.npy")
        np.save(paths[-1], array.numpy())
    mapped = an.LogitSet(*(np.load(p, mmap_mode="r") for p in paths))
    assert an.analyze_split(mapped, chunk_rows=33) == an.analyze_split(logits)
    half = an.LogitSet(*(np.asarray(x, dtype=np.float16) for x in mapped[:3]), mapped.labels)
    assert an.analyze_split(half).n == 500  # float16 is analysed in float32


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<f2", "<i8"])
def test_npy_rows_reads_the_same_rows_as_numpy(tmp_path, dtype):
    array = np.arange(7 * 5).reshape(7, 5).astype(dtype)
    np.save(tmp_path / "x.npy", array)
    rows = load_array(tmp_path / "x.npy")
    assert isinstance(rows, NpyRows) and rows.shape == (7, 5) and rows.dtype == array.dtype
    for start, stop in ((0, 7), (2, 3), (5, 100), (7, 9)):
        assert np.array_equal(rows[start:stop], array[start:stop])
    np.save(tmp_path / "f.npy", np.asfortranarray(array))
    with pytest.raises(ValueError, match="Fortran"):
        NpyRows(tmp_path / "f.npy")


def test_default_chunk_rows_bounds_the_chunk():
    assert an.default_chunk_rows(100) == 32 * 2**20 // 400
    assert an.default_chunk_rows(131072) == 64
    assert an.default_chunk_rows(10**9) == 1


def test_bad_inputs_raise_clear_errors():
    t = torch.randn(4, 5)
    with pytest.raises(ValueError, match="student_a"):
        an.sample_stats(an.LogitSet(t, torch.randn(4, 6), t, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="labels"):
        an.sample_stats(an.LogitSet(t, t, t, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        an.sample_stats(an.LogitSet(t[:, :1], t[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="chunk_rows"):
        an.sample_stats(an.LogitSet(t, t, t, torch.zeros(4, dtype=torch.long)), chunk_rows=0)


def test_bundles_round_trip(tmp_path):
    logits = _random_logits(_fresh_seed(), n=300, v=10, dtype=torch.float32)
    path = save_bundle(tmp_path / "logits.npz", {"train": logits, "test": logits})
    splits = load_bundle(path)
    assert list(splits) == ["train", "test"]
    assert an.analyze_split(splits["test"]) == an.analyze_split(logits)
    torch.save({"teacher": logits.teacher, "student_a": logits.student_a, "student_b": logits.student_b,
                "labels": logits.labels}, tmp_path / "one.pt")
    assert list(load_bundle(tmp_path / "one.pt")) == ["data"]
    torch.save({"val": dict(zip(("teacher", "student_a", "student_b", "labels"), logits))}, tmp_path / "nested.pt")
    assert an.analyze_split(load_bundle(tmp_path / "nested.pt")["val"]) == an.analyze_split(logits)
    np.savez(tmp_path / "bad.npz", teacher=logits.teacher.numpy())
    with pytest.raises(ValueError, match="lacks"):
        load_bundle(tmp_path / "bad.npz")


def test_analyze_command_on_npy_files_matches_the_library(tmp_path, capsys):
    logits = _random_logits(_fresh_seed(), n=800, v=30, dtype=torch.float32)
    for name, array in zip(("teacher", "a", "b", "labels"), logits):
        np.save(tmp_path / f"{name}.npy", array.numpy())
    out = tmp_path / "out"
    assert cli_main(["analyze", "--teacher", str(tmp_path / "teacher.npy"), "--student-a", str(tmp_path / "a.npy"),
                     "--student-b", str(tmp_path / "b.npy"), "--labels", str(tmp_path / "labels.npy"),
                     "--split", "val", "--chunk-rows", "100", "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "analyze.json").read_text())["splits"][0]
    expected = an.analyze_split(logits, split="val")
    assert report["conflicts"] == expected.conflicts and report["corrected"] == expected.corrected
    assert report["conflict_indices"] == expected.conflict_indices
    assert "conflicts (B has the lower KL" in printed and "=== VAL:" in printed
    assert (out / "analyze.txt").read_text().startswith("=== VAL:")


def test_analyze_seed_figures_option_averages_over_classes(tmp_path):
    logits = _random_logits(_fresh_seed(), n=200, v=25, dtype=torch.float32)
    path = save_bundle(tmp_path / "l.npz", {"test": logits})
    for extra, name in (([], "sum"), (["--seed-figures"], "mean")):
        assert cli_main(["analyze", str(path), "--out-dir", str(tmp_path / name), "--quiet", *extra]) == 0
    summed = json.loads((tmp_path / "sum" / "analyze.json").read_text())["splits"][0]
    averaged = json.loads((tmp_path / "mean" / "analyze.json").read_text())["splits"][0]
    assert averaged["settings"]["class_mean"] and averaged["settings"]["eps"] == 1e-8
    for s, m in zip(summed["examples"], averaged["examples"]):
        assert m["kl_a"] == pytest.approx(s["kl_a"] / 25, rel=1e-5)


def test_analyze_synthetic_demo_runs_offline(tmp_path, capsys):
    assert cli_main(["analyze", "--demo", "synthetic", "--out-dir", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "analyze.json").read_text())
    assert [s["split"] for s in payload["splits"]] == ["train", "test"]
    assert all(s["conflicts"] > 0 for s in payload["splits"])
    assert (tmp_path / "analyze_demo_synthetic.npz").exists()


def test_analyze_command_rejects_ambiguous_input(tmp_path, capsys):
    assert cli_main(["analyze", "--out-dir", str(tmp_path)]) == 2
    assert "exactly one input" in capsys.readouterr().err
    assert cli_main(["analyze", "--teacher", "t.npy", "--out-dir", str(tmp_path)]) == 2
    assert "give all four" in capsys.readouterr().err
