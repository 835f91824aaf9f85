"""Vocabulary-parallel distillation over torch.distributed (gloo, CPU), 2 and 3 processes spawned from
the test: every rank's loss and gradient slices against the single-process reference on the whole
rows. Each worker checks its own results and writes a one-line report; the test fails on a wrong
report, a missing one, or a worker still running after the timeout (no hang)."""

from __future__ import annotations

import datetime
import functools
import json
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from logitstd_kernels import distributed, reference
from logitstd_kernels.config import DistillConfig, LogitTransforms
from logitstd_kernels.distributed import torch_phases
from logitstd_kernels.distributed import (vocab_parallel_distillation_loss,
                                          vocab_parallel_fused_linear_distillation_loss)
from support import needs, spawn_ranks

TIMEOUT_S = 120


def widths_for(num_classes: int, world: int) -> list[int]:
    """Uneven slices: rank 0 takes the remainder and a few more classes."""
    base = num_classes // world
    widths = [base] * world
    widths[0] += num_classes - base * world
    if world > 1:
        widths[0] += 3
        widths[-1] -= 3
    return widths


def _worker(rank: int, world: int, folder: str, scenarios: tuple[str, ...]) -> None:
    """Run the scenarios one after the other; each one's result or exception goes into the report
    (a scenario that raises the same error on every rank leaves the process group usable)."""
    reports = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for name in scenarios:
            torch.manual_seed(1234)  # the same full rows on every rank
            try:
                reports[name] = {"ok": True, "result": SCENARIOS[name](rank, world)}
            except Exception as exc:  # reported to the test, which decides
                reports[name] = {"ok": False, "type": type(exc).__name__, "error": str(exc),
                                 "traceback": traceback.format_exc()}
    finally:
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(reports))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, scenarios: tuple[str, ...], folder: Path) -> list[dict]:
    """Spawn ``world`` processes running ``scenarios``; their reports (scenario -> report) in rank order."""
    exit_codes = spawn_ranks(_worker, world, folder, scenarios, timeout_s=TIMEOUT_S)
    reports = []
    for r in range(world):
        path = folder / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report (exit code {exit_codes[r]})"
        reports.append(json.loads(path.read_text()))
    return reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, list[dict]]:
    """One spawn per world size, every scenario in it (process start-up dominates a scenario)."""
    runs = {2: tuple(SCENARIOS), 3: ("loss", "loss_triton", "fused_linear")}
    return {world: run_ranks(world, names, tmp_path_factory.mktemp(f"world{world}")) for world, names in runs.items()}


def assert_ok(reports: list[dict], scenario: str) -> list[dict]:
    for r, report in enumerate(reports):
        assert scenario in report, f"rank {r} did not get to {scenario!r}"
        assert report[scenario]["ok"], f"rank {r}: {report[scenario].get('traceback')}"
    return [report[scenario]["result"] for report in reports]


def _slice(rank: int, world: int, num_classes: int) -> slice:
    widths = widths_for(num_classes, world)
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def _compare_loss(rank: int, world: int, backend: str = "torch") -> dict:
    """Every configuration against the reference; returns the worst relative errors per dtype.
    ``backend``: the local phases' (the Triton kernels run under the interpreter here)."""
    num_classes, rows = 1003, 9
    cols = _slice(rank, world, num_classes)
    worst = {"float64": 0.0, "float32": 0.0}
    x64 = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y64 = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (rows,))
    labels[::4] = -100
    mask = torch.rand(rows) > 0.2
    for dtype in (torch.float64, torch.float32):
        for standardize in (True, False):
            for given_labels, given_mask in ((labels, None), (None, mask), (labels, mask)):
                for reduction in ("mean", "sum", "none"):
                    options = dict(standardize=standardize, reduction=reduction, mask=given_mask,
                                   label_smoothing=0.1 if given_labels is not None else 0.0, ce_weight=0.3,
                                   kd_weight=2.0, temperature=1.5, teacher_temperature=2.5)
                    xs = x64.to(dtype)[:, cols].clone().requires_grad_(True)
                    ys = y64.to(dtype)[:, cols].clone().requires_grad_(True)
                    loss = vocab_parallel_distillation_loss(xs, ys, given_labels, backend=backend, **options)
                    upstream = torch.linspace(0.5, 1.5, rows, dtype=loss.dtype) if reduction == "none" else None
                    loss.backward(upstream)
                    xf, yf = x64.clone().requires_grad_(True), y64.clone().requires_grad_(True)
                    want = reference.distillation_loss(xf, yf, given_labels, **options)
                    want.backward(None if upstream is None else upstream.double())
                    errors = [_max_rel(loss, want), _max_rel(xs.grad, xf.grad[:, cols]),
                              _max_rel(ys.grad, yf.grad[:, cols])]
                    name = str(dtype).split(".")[-1]
                    bound = 1e-12 if dtype == torch.float64 else 2e-5
                    assert max(errors) <= bound, (f"{name} standardize={standardize} labels={given_labels is not None} "
                                                  f"mask={given_mask is not None} {reduction}: errors {errors}")
                    worst[name] = max(worst[name], *errors)
    return worst


def _count_collectives(rank: int, world: int) -> dict:
    """The bytes each collective call of a step hands over, whatever the collective."""
    calls = []
    patched = {}
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter", "gather",
                 "scatter", "all_to_all", "all_to_all_single"):
        original = getattr(dist, name)
        patched[name] = original

        def counting(*args, _name=name, _original=original, **kwargs):
            tensor = args[1] if _name in ("all_gather", "all_gather_into_tensor") else args[0]
            calls.append((_name, tensor.numel() * tensor.element_size()))
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    try:
        cols = _slice(rank, world, 500)
        x, y = torch.randn(64, 500), torch.randn(64, 500)
        labels = torch.randint(0, 500, (64,))
        counts = {}
        for check in (False, True):
            calls.clear()
            xs = x[:, cols].clone().requires_grad_(True)
            vocab_parallel_distillation_loss(xs, y[:, cols], labels, check_shards=check).backward()
            counts[str(check)] = list(calls)
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
    return counts


def _phase_backends_agree(rank: int, world: int, device: str = "cpu") -> dict:
    """The Triton phases against the PyTorch phases on slices of several tiles (2600 classes: 1300 or
    more per rank at world 2, against tiles of 1024 and, in float64, 512), rows with a non-unit row
    stride, bf16 too: the same loss and gradients but for rounding (1e-12 in float64, 2e-5 in
    float32, 2^-7 of a bf16 row's largest gradient, one rounding apart)."""
    num_classes, rows = 2 * 1300 + 7, 5
    cols = _slice(rank, world, num_classes)
    x64 = 3 * torch.randn(rows, num_classes, dtype=torch.float64)
    y64 = 5 * torch.randn(rows, num_classes, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (rows,))
    labels[1] = -100
    mask = torch.tensor([True, True, False, True, True])
    worst = {}
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2.0**-7)):
        for standardize in (True, False):
            got = {}
            for backend in ("torch", "triton"):
                width = cols.stop - cols.start
                padded = torch.zeros(rows, width + 37, dtype=dtype, device=device)  # row stride != width
                xs = padded[:, :width].copy_(x64[:, cols]).requires_grad_(True)
                ys = y64[:, cols].to(dtype=dtype, device=device).requires_grad_(True)
                loss = vocab_parallel_distillation_loss(xs, ys, labels.to(device), mask=mask.to(device),
                                                        reduction="none", standardize=standardize,
                                                        label_smoothing=0.1, backend=backend)
                loss.backward(torch.linspace(0.5, 1.5, rows, dtype=loss.dtype, device=device))
                got[backend] = (loss.detach(), xs.grad, ys.grad)
            errors = [_max_rel(a, b) for a, b in zip(got["triton"], got["torch"])]
            assert max(errors) <= bound, f"{dtype} standardize={standardize}: {errors}"
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), *errors)
    return worst


def _edge_rows(rank: int, world: int) -> dict:
    """The base issue's numerics across a shard boundary, on both phase backends: a -inf teacher
    logit without standardization (in the last rank's slice) gives the single-device fused kernels'
    finite loss and a zero teacher gradient there, not NaN; a NaN row stays in its row; float32 rows
    of 1e18 and (eps = 0) 1e-30 keep float32 rounding against the float64 truth."""
    from logitstd_kernels.objective import distillation_loss

    num_classes = 40
    cols = _slice(rank, world, num_classes)
    found = {}
    for backend in ("torch", "triton"):
        x, y = torch.randn(3, num_classes, dtype=torch.float64), torch.randn(3, num_classes, dtype=torch.float64)
        y[0, num_classes - 2] = float("-inf")
        labels = torch.tensor([1, 2, 3])
        xs, ys = x[:, cols].clone().requires_grad_(True), y[:, cols].clone().requires_grad_(True)
        loss = vocab_parallel_distillation_loss(xs, ys, labels, standardize=False, reduction="none", backend=backend)
        loss.sum().backward()
        xf, yf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        want = distillation_loss(xf, yf, labels, standardize=False, reduction="none", backend="cpu")
        want.sum().backward()  # the C++ kernel: p = 0 contributes 0 (the -inf teacher logit's limit)
        errors = [_max_rel(loss, want), _max_rel(xs.grad, xf.grad[:, cols]), _max_rel(ys.grad, yf.grad[:, cols])]
        assert torch.isfinite(loss).all() and torch.isfinite(ys.grad).all() and max(errors) <= 1e-12, errors

        x = torch.randn(3, num_classes)
        x[1, 5] = float("nan")  # in rank 0's slice: every rank's row 1 is NaN, no other row
        xs = x[:, cols].clone().requires_grad_(True)
        loss = vocab_parallel_distillation_loss(xs, torch.randn(3, num_classes)[:, cols], labels, reduction="none",
                                                backend=backend)
        loss.sum().backward()
        assert torch.isnan(loss).tolist() == [False, True, False]
        assert torch.isnan(xs.grad).any(-1).tolist() == [False, True, False]

        for magnitude, options in ((1e18, {}), (1e-30, dict(eps=0.0, correction=0))):
            x64 = magnitude * torch.randn(3, num_classes, dtype=torch.float64)
            y64 = magnitude * torch.randn(3, num_classes, dtype=torch.float64)
            xs = x64.float()[:, cols].clone().requires_grad_(True)
            loss = vocab_parallel_distillation_loss(xs, y64.float()[:, cols], None, reduction="none", backend=backend,
                                                    **options)
            loss.sum().backward()
            xf = x64.float().double().requires_grad_(True)
            want = reference.distillation_loss(xf, y64.float().double(), None, reduction="none", **options)
            want.sum().backward()
            errors = [_max_rel(loss, want), _max_rel(xs.grad, xf.grad[:, cols])]
            assert max(errors) <= 2e-5, (magnitude, errors)
        found[backend] = True
    return found


def _in_row_chunks(rank: int, world: int) -> dict:
    """The loss scenario and the collective count with the phases run over chunks of 2-3 rows
    (``_CHUNK_BYTES`` made small): the same results, still two collectives for all rows."""
    saved = dict(torch_phases._CHUNK_BYTES)
    torch_phases._CHUNK_BYTES["cpu"] = 2 * 512 * 8  # 2 float64 rows of a ~505-wide slice (4 float32 ones)
    try:
        assert len(torch_phases._chunks(9, 500, torch.float64, torch.device("cpu"))) == 5
        return {"loss": _compare_loss(rank, world), "collectives": _count_collectives(rank, world)}
    finally:
        torch_phases._CHUNK_BYTES.update(saved)


def _dtensor(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x, y = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    labels = torch.randint(0, 64, (5,))
    xd = distribute_tensor(x, mesh, [Shard(-1)]).requires_grad_(True)
    yd = distribute_tensor(y, mesh, [Shard(-1)])
    loss = vocab_parallel_distillation_loss(xd, yd, labels)
    loss.backward()
    xf = x.clone().requires_grad_(True)
    want = reference.distillation_loss(xf, y, labels)
    want.backward()
    grad = xd.grad.full_tensor()
    errors = [_max_rel(loss, want), _max_rel(grad, xf.grad)]
    assert max(errors) <= 1e-12, errors
    return {"errors": errors}


#: Logit transforms of the fused lm_head (TRL's keywords), with values that change every row.
TRANSFORMS = dict(student_logit_scale=0.7, student_final_logit_softcapping=3.0, teacher_logit_scale=1.3,
                  teacher_final_logit_softcapping=4.0)


def _fused_linear(rank: int, world: int, backend: str = "torch") -> dict:
    """Teacher by hidden states + weights and by its logits' slice, a student bias, a mask, default
    and explicit chunks, with and without logit transforms; the hidden gradient's partial sums
    all-reduced as the layer's backward would."""
    num_classes, hidden, teacher_hidden, rows = 301, 16, 24, 11
    cols = _slice(rank, world, num_classes)
    h = torch.randn(rows, hidden, dtype=torch.float64)
    w = torch.randn(num_classes, hidden, dtype=torch.float64) / 4
    b = torch.randn(num_classes, dtype=torch.float64)
    ht = torch.randn(rows, teacher_hidden, dtype=torch.float64)
    wt = torch.randn(num_classes, teacher_hidden, dtype=torch.float64) / 3
    labels = torch.randint(0, num_classes, (rows,))
    labels[1::3] = -100
    mask = torch.ones(rows, dtype=torch.bool)
    mask[4] = False
    worst = 0.0
    cases = [(dtype, bound, teacher, chunk, {}) for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 2e-5))
             for teacher, chunk in (("hidden", 4), ("logits", None))]
    cases += [(torch.float64, 1e-12, teacher, 4, TRANSFORMS) for teacher in ("hidden", "logits")]
    for dtype, bound, teacher, chunk, transforms in cases:
        hl = h.to(dtype).clone().requires_grad_(True)
        wl = w.to(dtype)[cols].clone().requires_grad_(True)
        bl = b.to(dtype)[cols].clone().requires_grad_(True)
        given = (dict(teacher_hidden=ht.to(dtype), teacher_weight=wt.to(dtype)[cols]) if teacher == "hidden"
                 else dict(teacher_logits=F.linear(ht, wt).to(dtype)[:, cols]))
        loss = vocab_parallel_fused_linear_distillation_loss(hl, wl, labels=labels, student_bias=bl, mask=mask,
                                                             chunk_size=chunk, backend=backend, **given, **transforms)
        loss.backward()
        grad_hidden = hl.grad.double().clone()
        dist.all_reduce(grad_hidden)  # the tensor-parallel layer's all-reduce of the partial sums
        hf, wf, bf = (t.clone().requires_grad_(True) for t in (h, w, b))
        want = reference.linear_loss_of_config(hf, wf, bf, F.linear(ht, wt), labels, mask, DistillConfig(),
                                               LogitTransforms(**transforms))
        want.backward()
        errors = [_max_rel(loss, want), _max_rel(grad_hidden, hf.grad), _max_rel(wl.grad, wf.grad[cols]),
                  _max_rel(bl.grad, bf.grad[cols])]
        assert max(errors) <= bound, f"{dtype} teacher={teacher} {transforms}: {errors}"
        worst = max(worst, *errors)
    return {"worst": worst}


def _rows_disagree(rank: int, world: int) -> dict:
    rows = 4 if rank == 0 else 5
    vocab_parallel_distillation_loss(torch.randn(rows, 10), torch.randn(rows, 10), None)
    return {}


def _rows_disagree_with_labels(rank: int, world: int) -> dict:
    """The usual mistake: the global labels have 5 rows, rank 0's logits 4; only rank 0's local checks
    see it, and every rank must still raise (not wait in a collective)."""
    rows = 4 if rank == 0 else 5
    vocab_parallel_distillation_loss(torch.randn(rows, 10), torch.randn(rows, 10), torch.zeros(5, dtype=torch.long))
    return {}


def _fused_rows_disagree(rank: int, world: int) -> dict:
    rows = 8 if rank == 0 else 12
    vocab_parallel_fused_linear_distillation_loss(torch.randn(rows, 4), torch.randn(10, 4), torch.randn(rows, 4),
                                                  torch.randn(10, 4), chunk_size=4)
    return {}


def _backend_unknown_on_one_rank(rank: int, world: int) -> dict:
    vocab_parallel_distillation_loss(torch.randn(4, 10), torch.randn(4, 10), None,
                                     backend="bogus" if rank == 0 else "torch")
    return {}


def _fused_full_teacher_logits(rank: int, world: int) -> dict:
    """teacher_logits with all V classes instead of this rank's slice: an error, not a wrong loss."""
    vocab_parallel_fused_linear_distillation_loss(torch.randn(6, 4), torch.randn(10, 4),
                                                  teacher_logits=torch.randn(6, 10 * world))
    return {}


def _fused_uneven_default_chunks(rank: int, world: int) -> dict:
    """Uneven slices whose own default chunk sizes would differ: the chunk comes from the widest."""
    widths = [21846, 21845]
    h = torch.randn(256, 8)
    labels = torch.randint(0, sum(widths), (256,))  # before the rank-dependent draws: the same on every rank
    loss = vocab_parallel_fused_linear_distillation_loss(h, torch.randn(widths[rank], 8), h, torch.randn(widths[rank], 8),
                                                         labels)
    return {"loss": float(loss)}


def _dtype_disagrees(rank: int, world: int) -> dict:
    dtype = torch.float64 if rank == 1 else torch.float32
    vocab_parallel_distillation_loss(torch.randn(4, 10, dtype=dtype), torch.randn(4, 10, dtype=dtype), None)
    return {}


def _ranges_do_not_tile(rank: int, world: int) -> dict:
    start = rank * 10 + (1 if rank == world - 1 else 0)  # a gap before the last rank's slice
    vocab_parallel_distillation_loss(torch.randn(4, 10), torch.randn(4, 10), None, vocab_range=(start, start + 10))
    return {}


def _label_outside(rank: int, world: int) -> dict:
    labels = torch.tensor([3, 10 * world + 2, -100, 1])
    vocab_parallel_distillation_loss(torch.randn(4, 10), torch.randn(4, 10), labels)
    return {}


SCENARIOS = {"loss": _compare_loss, "loss_triton": functools.partial(_compare_loss, backend="triton"),
             "collectives": _count_collectives, "chunked": _in_row_chunks, "dtensor": _dtensor,
             "fused_linear_triton": functools.partial(_fused_linear, backend="triton"),
             "backends_agree": _phase_backends_agree, "edge_rows": _edge_rows,
             "backend": _backend_unknown_on_one_rank,
             "fused_linear": _fused_linear, "uneven_chunks": _fused_uneven_default_chunks, "rows": _rows_disagree,
             "rows_labels": _rows_disagree_with_labels, "dtype": _dtype_disagrees, "ranges": _ranges_do_not_tile,
             "label": _label_outside, "fused_rows": _fused_rows_disagree, "fused_teacher": _fused_full_teacher_logits}


@pytest.mark.parametrize("world", [2, 3])
def test_matches_the_single_process_objective(world, reports):
    """float64 to 1e-12 and float32 to its rounding, uneven slices, labels with ignore_index, masks,
    label smoothing, two temperatures, teacher gradients, every reduction, with and without
    standardization."""
    assert_ok(reports[world], "loss")


def test_two_collectives_of_rows_size_per_step(reports):
    counts = assert_ok(reports[2], "collectives")[0]
    rows = 64
    # without the header check: phase 1 (rows x 9 float64) and phase 2 (rows x 11 float64)
    assert counts["False"] == [["all_gather", rows * 9 * 8], ["all_gather", rows * 11 * 8]]
    # with it: one constant-size header (9 int64) first
    assert counts["True"] == [["all_gather", 9 * 8], ["all_gather", rows * 9 * 8], ["all_gather", rows * 11 * 8]]


@pytest.mark.parametrize("world", [2, 3])
def test_triton_phase_kernels_match_the_single_process_objective(world, reports):
    """The three phases as Triton kernels (interpreted on the CPU): the loss scenario's bounds."""
    assert_ok(reports[world], "loss_triton")


def test_edge_rows_across_a_shard_boundary(reports):
    assert_ok(reports[2], "edge_rows")


def test_triton_phases_on_several_tiles_strided_rows_and_bf16(reports):
    assert_ok(reports[2], "backends_agree")


@pytest.mark.gpu
@needs(torch.cuda.is_available(), "needs a CUDA device", required=False)
def test_triton_phases_on_cuda_with_nccl(tmp_path):
    """The default on CUDA (``backend="auto"``: the Triton phases), compiled, against the PyTorch
    phases: one NCCL rank on one GPU, the whole row in its slice."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        worst = _phase_backends_agree(0, 1, device="cuda")
    finally:
        dist.destroy_process_group()
    assert set(worst) == {"torch.float64", "torch.float32", "torch.bfloat16"}


def test_fused_linear_on_the_triton_phase_kernels(reports):
    assert_ok(reports[2], "fused_linear_triton")


def test_phases_in_row_chunks(reports):
    """Rows processed a few at a time (bounded temporaries): the loss scenario's bounds hold, and the
    collectives are those of the unchunked step."""
    results = assert_ok(reports[2], "chunked")
    assert results[0]["collectives"] == assert_ok(reports[2], "collectives")[0]


def test_dtensor_sharded_on_the_classes(reports):
    assert_ok(reports[2], "dtensor")


@pytest.mark.parametrize("world", [2, 3])
def test_fused_linear_with_a_vocab_sharded_weight(world, reports):
    assert_ok(reports[world], "fused_linear")


def test_fused_linear_default_chunks_with_uneven_slices(reports):
    losses = [result["loss"] for result in assert_ok(reports[2], "uneven_chunks")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("scenario,error,match", [
    ("rows", "ValueError", "ranks disagree on the rows"),
    ("rows_labels", "ValueError", "(labels has shape|failed their checks)"),
    ("fused_rows", "ValueError", "ranks disagree on the rows"),
    ("fused_teacher", "ValueError", "(teacher_logits has shape|failed their checks)"),
    ("dtype", "ValueError", "ranks disagree on the student dtype"),
    ("ranges", "ValueError", "do not tile"),
    ("label", "IndexError", "is outside"),
    ("backend", "ValueError", "(backend must be one of|failed their checks)"),
])
def test_mismatched_shards_fail_on_every_rank(scenario, error, match, reports):
    for r, report in enumerate(reports[2]):
        got = report[scenario]
        assert not got["ok"], f"rank {r} accepted the mismatch"
        assert got["type"] == error and re.search(match, got["error"]), f"rank {r}: {got['traceback']}"
