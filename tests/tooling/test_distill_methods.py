"""``distill --method``: the objectives are the official settings and the package's losses, every method
runs end to end (one seed, one epoch) and writes its results, and the table renders them.

The command's learning itself is what the committed results file shows; these tests check plumbing.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import formula
from logitstd_kernels import reference
from logitstd_kernels.cli import main as cli_main
from logitstd_kernels.experiments import digits, kd_methods, method_table
from support import require_modules


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _batch(epoch: int = 1, rows: int = 6, classes: int = 10):
    x = torch.randn(rows, classes, dtype=torch.float64)
    return kd_methods.StudentBatch(x=x, y=torch.randint(0, classes, (rows,)),
                                   teacher_logits=3 * torch.randn(rows, classes, dtype=torch.float64), epoch=epoch)


def _objective(method: str, standardize: bool, epochs: int = 24):
    settings = kd_methods.method_settings(method, standardize)
    loss, extras = kd_methods.build_objective(settings, teacher=nn.Identity(), epochs=epochs,
                                              generator=torch.Generator().manual_seed(0))
    return settings, loss, extras


def test_the_settings_are_the_official_codes():
    assert kd_methods.method_settings("kd", False) == kd_methods.MethodSettings("kd", False, 0.1, 0.9, 4.0)
    assert kd_methods.method_settings("kd", True) == kd_methods.MethodSettings("kd", True, 0.1, 9.0, 2.0)
    assert kd_methods.method_settings("dkd", False) == kd_methods.MethodSettings("dkd", False, 1.0, 1.0, 4.0, 1.0, 8.0)
    assert kd_methods.method_settings("dkd", True) == kd_methods.MethodSettings("dkd", True, 1.0, 1.0, 2.0, 9.0, 72.0)
    assert kd_methods.method_settings("mlkd", False) == kd_methods.MethodSettings("mlkd", False, 0.1, 0.9, 4.0)
    assert kd_methods.method_settings("mlkd", True) == kd_methods.MethodSettings("mlkd", True, 0.1, 9.0, 2.0)
    for standardize, weight in ((False, 0.9), (True, 9.0)):
        ctkd = kd_methods.method_settings("ctkd", standardize)
        assert (ctkd.ce_weight, ctkd.kd_weight) == (0.1, weight)
        assert ctkd.temperature == pytest.approx(1 + 20 / (1 + np.exp(-1.0)))  # the official start, theta = 1
    assert kd_methods.warmup_epochs(240) == 20 and kd_methods.warmup_epochs(24) == 2 and kd_methods.warmup_epochs(1) == 1
    with pytest.raises(ValueError, match="method"):
        kd_methods.method_settings("fitnet", True)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "std"])
def test_kd_objective_is_ce_plus_kd_in_float64(standardize):
    settings, loss, extras = _objective("kd", standardize)
    batch = _batch()
    want = formula.objective_numpy(batch.x.numpy(), batch.teacher_logits.numpy(), batch.y.numpy(),
                                   ce_weight=settings.ce_weight, kd_weight=settings.kd_weight,
                                   temperature=settings.temperature, standardize=standardize)[0]
    assert extras == []
    np.testing.assert_allclose(float(loss(nn.Identity(), batch)), want, rtol=1e-10)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "std"])
def test_dkd_objective_warms_up_its_kd_term(standardize):
    settings, loss, _ = _objective("dkd", standardize, epochs=24)  # warm-up: 2 epochs
    for epoch, factor in ((1, 0.5), (2, 1.0), (7, 1.0)):
        batch = _batch(epoch)
        dkd = reference.dkd_loss(batch.x, batch.teacher_logits, batch.y, alpha=settings.alpha, beta=settings.beta,
                                 temperature=settings.temperature, standardize=standardize)
        want = settings.ce_weight * F.cross_entropy(batch.x, batch.y) + factor * dkd
        torch.testing.assert_close(loss(nn.Identity(), batch), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "std"])
def test_mlkd_objective_is_the_official_weak_and_strong_terms_in_float64(standardize):
    settings, loss, extras = _objective("mlkd", standardize)
    batch = _batch(rows=8)
    teacher = lambda v: 3.0 * v.flip(-1) + 0.5  # noqa: E731  any fixed map of the view to logits
    loss, _ = kd_methods.build_objective(settings, teacher=teacher, epochs=24,
                                         generator=torch.Generator().manual_seed(7))
    got = loss(nn.Identity(), batch)
    views = torch.Generator().manual_seed(7)  # the same draws: weak view first, then strong
    x_weak, x_strong = digits.weak_view(batch.x, views), digits.strong_view(batch.x, views)
    assert not torch.equal(x_weak, batch.x) and not torch.equal(x_strong, x_weak)
    taus = (settings.temperature, 3.0, 5.0, 2.0, 6.0)
    weak = formula.mlkd_numpy(x_weak.numpy(), teacher(x_weak).numpy(), temperatures=taus, confidence="fraction",
                              standardize=standardize)[0]
    strong = formula.mlkd_numpy(x_strong.numpy(), teacher(x_strong).numpy(), temperatures=taus, confidence="none",
                                class_weight=0.0, batch_weight=0.0, standardize=standardize)[0]
    ce = F.cross_entropy(x_weak, batch.y) + F.cross_entropy(x_strong, batch.y)
    want = settings.ce_weight * float(ce) + settings.kd_weight * (weak + strong)
    assert extras == []
    np.testing.assert_allclose(float(got), want, rtol=1e-9)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "std"])
def test_ctkd_objective_trains_its_temperature_against_the_kd_term(standardize):
    settings, loss, extras = _objective("ctkd", standardize, epochs=48)  # the reversal rises over 2 epochs
    (temperature,) = extras
    assert sum(p.numel() for p in temperature.parameters()) == 1
    batch = _batch(epoch=1)
    got = loss(nn.Identity(), batch)
    tau = torch.tensor(settings.temperature, dtype=torch.float64, requires_grad=True)
    want = reference.distillation_loss(batch.x, batch.teacher_logits, batch.y, ce_weight=settings.ce_weight,
                                       kd_weight=settings.kd_weight, temperature=tau, standardize=standardize)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)
    got.backward()
    (d_tau,) = torch.autograd.grad(want, tau)
    sigmoid = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    reversal = 0.5  # cosine_lambda(1, 2): halfway up
    expected = -reversal * d_tau * 20 * sigmoid * (1 - sigmoid)
    torch.testing.assert_close(temperature.theta.grad.double(), expected, rtol=1e-5, atol=1e-9)
    assert float(expected) != 0.0


def _comparison(mean: float, std: float, seeds: int = 5) -> dict:
    return {"method": "kd", "delta_mean": mean, "delta_std": std, "seeds": seeds, "seeds_better": 0, "seeds_worse": 0}


def test_verdict_is_twice_the_standard_error_of_the_paired_difference():
    assert method_table.verdict(_comparison(0.005, 0.004)) == "helped"        # error 0.0018
    assert method_table.verdict(_comparison(0.003, 0.004)) == "no clear difference"
    assert method_table.verdict(_comparison(-0.005, 0.004)) == "hurt"
    assert method_table.verdict(_comparison(0.005, 0.0, seeds=1)) == "no clear difference"  # one seed: unknown
    results = {"comparisons": [dict(_comparison(0.005, 0.004), method="kd"), dict(_comparison(0.005, 0.004), method="dkd"),
                               dict(_comparison(-0.005, 0.004), method="mlkd")]}
    assert method_table.verdict_sentence(results) == "Here logit standardization helped KD and DKD and hurt MLKD."
    results["comparisons"].append(dict(_comparison(0.0, 0.004), method="ctkd"))
    assert method_table.verdict_sentence(results) == ("Here logit standardization helped KD and DKD, hurt MLKD and "
                                                      "made no clear difference to CTKD.")


def test_every_method_runs_and_writes_its_results(tmp_path, capsys):
    require_modules("sklearn")
    methods = list(kd_methods.METHOD_NAMES)
    out = tmp_path / "out"
    assert cli_main(["distill", "--method", *methods, "--seeds", "1", "--epochs", "1", "--teacher-epochs", "1",
                     "--teacher-hidden", "16", "--student-hidden", "8", "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "distill_methods.json").read_text())
    assert [(r["method"], r["standardize"]) for r in results["rows"]] == (
        [("ce", False)] + [(m, s) for m in methods for s in (False, True)])
    for row in results["rows"]:
        assert len(row["accuracies"]) == 1 and 0.0 <= row["mean"] <= 1.0 and row["std"] == 0.0, row
    assert [c["method"] for c in results["comparisons"]] == methods
    meta = results["metadata"]
    assert meta["command"].startswith("python -m logitstd_kernels distill --method")
    assert {"device", "date", "torch", "logitstd_kernels", "git_commit", "python"} <= meta.keys()
    with (out / "distill_methods.csv").open() as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    assert len(rows) == 1 + 2 * len(methods) and rows[0] == {"method": "ce", "standardize": "0", "seed": "0",
                                                             "test_accuracy": f"{results['rows'][0]['mean']:.6f}"}
    for method in methods:
        assert method_table.METHOD_LABELS[method] in printed
    markdown = method_table.markdown_table(results, "x.json")
    kd = results["rows"][1]
    assert f"| KD | {100 * kd['mean']:.2f} ± 0.00 |" in markdown and "from `x.json`" in markdown
