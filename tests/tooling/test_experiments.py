"""The seed-experiment commands: toy (numbers), distill and ghost (tiny runs that must learn), the CLI.

distill and ghost need the ``examples`` extra (scikit-learn, matplotlib, tqdm); CI installs it.
Their tests check learning, not timing.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from logitstd_kernels.cli import SUMMARIES, main as cli_main
from logitstd_kernels.experiments import deps, toy
from support import require_modules


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The distill and ghost commands set the torch thread count (--threads); undo it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _seed_toy_kl(student, teacher, *, T=1.0, standardize=False, correction=1, eps=1e-8):
    """Seed 000's ``calculate_kl`` (reduction 'sum' on one row), times T^2 as in the package's loss."""
    s, t = torch.tensor([student], dtype=torch.float64), torch.tensor([teacher], dtype=torch.float64)
    if standardize:
        s = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True, correction=correction) + eps)
        t = (t - t.mean(-1, keepdim=True)) / (t.std(-1, keepdim=True, correction=correction) + eps)
    return float(F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="sum")) * T * T


@pytest.mark.parametrize("case", list(toy.CASES.values()), ids=list(toy.CASES))
@pytest.mark.parametrize("temperature,correction", [(1.0, 1), (4.0, 1), (2.0, 0)])
def test_toy_losses_match_the_seed_and_standardization_flips_the_preference(case, temperature, correction):
    result = toy.evaluate_case(case, temperature=temperature, correction=correction)
    for student, logits in zip(result["students"], (case.student1, case.student2)):
        assert student["plain_kd_loss"] == pytest.approx(_seed_toy_kl(logits, case.teacher, T=temperature), abs=1e-5)
        assert student["standardized_kd_loss"] == pytest.approx(
            _seed_toy_kl(logits, case.teacher, T=temperature, standardize=True, correction=correction), abs=1e-5)
    assert [s["agrees_with_teacher"] for s in result["students"]] == [False, True]
    assert result["plain_kd_prefers"] == "student 1"
    assert result["standardized_kd_prefers"] == "student 2"


def test_toy_command_prints_the_seed_numbers(tmp_path, capsys):
    assert cli_main(["toy", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    # seed 000's printed values at T=1: Figure 2 and the 10-class case
    for line in ("student 1  [2, 2.8, 3, 1]        Bird          0.2427           0.1087",
                 "student 2  [0.1, 0.4, 0.3, 0.1]  Dog           0.4274           0.0000"):
        assert line in out
    assert "0.1212" in out and "0.6941" in out and "0.0076" in out
    assert out.count("plain KD prefers student 1 (lower loss)") == 2
    assert out.count("standardized KD prefers student 2 (lower loss)") == 2
    assert [r["case"] for r in json.loads((tmp_path / "toy.json").read_text())] == ["figure2", "ten-class"]
    assert not (tmp_path / "toy.png").exists()  # --no-plot


def test_toy_command_writes_json_and_plot_to_out_dir(tmp_path, capsys):
    require_modules("matplotlib")
    assert cli_main(["toy", "--case", "figure2", "--out-dir", str(tmp_path / "out")]) == 0
    assert f"wrote {tmp_path / 'out' / 'toy.json'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "toy.json").read_text())[0]["case"] == "figure2"
    assert (tmp_path / "out" / "toy.png").stat().st_size > 1000
    # --json / --plot name other files
    assert cli_main(["toy", "--case", "figure2", "--out-dir", str(tmp_path / "unused"), "--json",
                     str(tmp_path / "a.json"), "--plot", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.json").exists() and (tmp_path / "b.png").exists()
    assert not (tmp_path / "unused").exists()


def test_toy_without_matplotlib_skips_the_default_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli_main(["toy", "--out-dir", str(tmp_path)]) == 0
    assert "skipping the plot" in capsys.readouterr().err
    assert (tmp_path / "toy.json").exists() and not (tmp_path / "toy.png").exists()


def test_analyze_demo_says_where_its_logits_go_and_how_big(tmp_path, capsys):
    assert cli_main(["analyze", "--demo", "synthetic", "--quiet", "--out-dir", str(tmp_path / "a")]) == 0
    path = tmp_path / "a" / "analyze_demo_synthetic.npz"
    assert f"wrote the synthetic demo logits to {path} (72.5 MB" in capsys.readouterr().out
    assert 72.4e6 < path.stat().st_size < 72.6e6
    assert cli_main(["analyze", "--demo", "synthetic", "--quiet", "--out-dir", str(tmp_path / "b"),
                     "--no-demo-file"]) == 0
    assert "demo logits" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["analyze.json", "analyze.txt"]
    assert (tmp_path / "b" / "analyze.txt").read_text() == (tmp_path / "a" / "analyze.txt").read_text()


def test_every_command_has_help(capsys):
    for name in SUMMARIES:
        if name == "bench":
            continue
        with pytest.raises(SystemExit) as exit_info:
            cli_main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: python -m logitstd_kernels " + name in capsys.readouterr().out


def test_a_missing_extra_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    message = deps.missing_extra("the distill experiment", "sklearn")
    assert message is not None and ".[examples]" in message and "sklearn" in message
    assert "logitstd-kernels[examples]" not in message  # not on PyPI: install from the checkout
    assert 'pip install --no-build-isolation -e ".[examples]"' in message
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for command in (["distill"], ["ghost"], ["analyze", "--demo", "digits"], ["toy", "--plot", "toy.png"]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        assert "examples" in err and "pip install" in err


def test_distill_tiny_run_learns(tmp_path):
    require_modules("sklearn", "matplotlib", "tqdm")
    from logitstd_kernels.experiments.distill import DistillConfig, format_results, plot_results, run_distill
    from logitstd_kernels.experiments.training import set_threads

    set_threads(1)  # tiny MLPs: more threads only add overhead (the fixture restores the count)
    config = DistillConfig(kd_weights=(3.0,), seeds=(0,), teacher_hidden=(64,), teacher_epochs=8, student_epochs=8)
    results = run_distill(config, show_progress=False)
    assert results["teacher_accuracy"] > 0.85
    assert [(r["method"], r["kd_weight"]) for r in results["rows"]] == [("ce", None), ("kd", 3.0), ("kd+ls", 3.0)]
    for row in results["rows"]:
        assert row["mean"] > 0.7, row  # chance is 0.1
    assert "CE + KD + LS (T=2, w=3)" in format_results(results)
    assert plot_results(results, tmp_path / "distill.png").stat().st_size > 1000


def test_distill_command_writes_json_and_plot(tmp_path, capsys):
    require_modules("sklearn", "matplotlib", "tqdm")
    assert cli_main(["distill", "--kd-weights", "1", "--seeds", "1", "--epochs", "3", "--teacher-epochs", "3",
                     "--teacher-hidden", "32", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert "best mean:" in capsys.readouterr().out
    assert (tmp_path / "distill.png").exists()
    assert len(json.loads((tmp_path / "distill.json").read_text())["rows"]) == 3


def test_ghost_tiny_run_learns_from_ghost_logits_alone(tmp_path, capsys):
    require_modules("sklearn", "matplotlib", "tqdm")
    assert cli_main(["ghost", "--seeds", "1", "--epochs", "4", "--noise-per-epoch", "10000", "--teacher-epochs", "10",
                     "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert "final: plain KD, same init" in capsys.readouterr().out
    results = json.loads((tmp_path / "ghost.json").read_text())
    assert (tmp_path / "ghost.png").exists()
    assert results["teacher_accuracy_mean"] > 0.9
    curves = results["curves"]
    assert set(curves) == {"plain", "standardized", "control"}
    assert all(len(c["mean"]) == 5 for c in curves.values())  # epochs 0..4
    assert curves["plain"]["mean"][0] == curves["standardized"]["mean"][0]  # the same initial weights
    for variant in ("plain", "standardized"):  # never saw a digit, yet well above chance (0.1)
        assert curves[variant]["mean"][-1] > 0.2, curves[variant]["mean"]
        assert curves[variant]["mean"][-1] > curves["control"]["mean"][-1] + 0.1


def test_ghost_is_bit_reproducible(tmp_path):
    """Same settings, same machine: the same curves (every input, initialization and batch is seeded;
    the loss kernel computes each row in a fixed order; one thread)."""
    require_modules("sklearn")
    from logitstd_kernels.experiments.ghost import GhostConfig, run_ghost
    from logitstd_kernels.experiments.training import set_threads

    set_threads(1)
    config = GhostConfig(seeds=(0,), epochs=2, noise_per_epoch=1024, teacher_epochs=2, hidden=(32,), control=False)
    first, second = (run_ghost(config, show_progress=False) for _ in range(2))
    assert first["curves"] == second["curves"]
    assert first["backend"] in ("cpu", "torch") and first["cpu_capability"]
