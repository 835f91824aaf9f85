"""Conflict analysis of saved teacher/student logits (seed 000): ``python -m logitstd_kernels analyze``.

Reads one or more bundles (``.npz``/``.pt``), or one split from one file per array (``--teacher``,
``--student-a``, ``--student-b``, ``--labels``: ``.npy`` memory-mapped, or ``.pt``), or generates demo
logits (``--demo synthetic|digits``; saved as an ``.npz`` bundle, 72.5 MB for ``synthetic``, to
``<out-dir>/analyze_demo_<kind>.npz`` or ``--demo-file``, unless ``--no-demo-file``). The file format is
described in :mod:`logitstd_kernels.experiments.logit_io`; the analysis in
:mod:`logitstd_kernels.analysis`. Prints the human-readable report and writes it, with a JSON
version, to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

from ..analysis import SEED_FIGURES, KLSettings, LogitSet, analyze, format_report
from .deps import check_extras, progress
from .logit_io import load_arrays, load_bundle, save_bundle
from .results import write_json

__all__ = ["add_arguments", "run", "load_splits"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m logitstd_kernels analyze``."""
    src = parser.add_argument_group("input (one of)")
    src.add_argument("bundles", nargs="*", type=Path, metavar="FILE",
                     help="bundle(s) .npz or .pt with keys <split>_teacher, <split>_student_a, <split>_student_b, "
                          "<split>_labels (or teacher, student_a, student_b, labels for one split)")
    src.add_argument("--teacher", type=Path, help="teacher logits (N, V): .npy (read a chunk of rows at a time) or .pt (memory-mapped)")
    src.add_argument("--student-a", type=Path, help="student A logits (N, V), e.g. the independently trained one")
    src.add_argument("--student-b", type=Path, help="student B logits (N, V), e.g. the KD student")
    src.add_argument("--labels", type=Path, help="labels (N,): .npy or .pt")
    src.add_argument("--split", default="data", help="name of the split given by --teacher etc. (default data)")
    src.add_argument("--demo", choices=["synthetic", "digits"],
                     help="generate demo logits, save them (see --demo-file) and analyse them: 'synthetic' (two "
                          "equally noisy students on different logit scales, 50000+10000 rows x 100 classes) or "
                          "'digits' (MLPs trained on scikit-learn's digits; needs the examples extra)")
    src.add_argument("--demo-file", type=Path, default=None, metavar="PATH",
                     help="where --demo saves its logits as an .npz bundle (synthetic: 72.5 MB, digits: 0.2 MB; "
                          "default <out-dir>/analyze_demo_<kind>.npz)")
    src.add_argument("--no-demo-file", action="store_true",
                     help="do not save the --demo logits (they are analysed in memory)")
    kl = parser.add_argument_group("per-sample KL")
    kl.add_argument("--temperature", "-T", type=float, default=3.0, help="temperature (default 3, as in the seed)")
    kl.add_argument("--seed-figures", action="store_true",
                    help="reproduce the seed notebook's printed figures: KL averaged over classes (not summed) "
                         "and z-score with std + 1e-8")
    kl.add_argument("--correction", type=int, choices=[0, 1], default=1,
                    help="std convention of the z-score: 1 = torch.std (default), 0 = Algorithm 1")
    kl.add_argument("--eps", type=float, default=None, help="added to the std (default 1e-7; 1e-8 with --seed-figures)")
    kl.add_argument("--backend", default="auto", help="backend of the fused op (default auto)")
    out = parser.add_argument_group("output")
    out.add_argument("--examples", type=int, default=5, help="conflict rows to show per split (default 5)")
    out.add_argument("--chunk-rows", type=int, default=None,
                     help="rows per chunk (default: 32 MiB of float32 per logit array); bounds the memory")
    out.add_argument("--out-dir", type=Path, default=Path("logitstd_results"),
                     help="where analyze.json and analyze.txt go (default ./logitstd_results)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def load_splits(args: argparse.Namespace) -> dict[str, LogitSet]:
    """The splits named by the command line (for ``--demo``: generated, and saved unless ``--no-demo-file``)."""
    per_array = [args.teacher, args.student_a, args.student_b, args.labels]
    sources = sum([bool(args.bundles), any(p is not None for p in per_array), args.demo is not None])
    if sources != 1:
        raise ValueError("give exactly one input: bundle file(s), or --teacher/--student-a/--student-b/--labels, "
                         "or --demo synthetic|digits")
    if (args.demo_file is not None or args.no_demo_file) and args.demo is None:
        raise ValueError("--demo-file and --no-demo-file go with --demo synthetic|digits")
    if args.demo is not None:
        if args.demo == "digits":
            from .analyze_demo import digits_logits

            generated = digits_logits(show_progress=not args.quiet)
        else:
            from .analyze_demo import synthetic_logits

            generated = synthetic_logits()
        if not args.no_demo_file:
            path = save_bundle(args.demo_file or args.out_dir / f"analyze_demo_{args.demo}.npz", generated)
            print(f"wrote the {args.demo} demo logits to {path} ({path.stat().st_size / 1e6:.1f} MB; keys: "
                  f"{', '.join(f'{s}_<teacher|student_a|student_b|labels>' for s in generated)})")
        return generated
    if args.bundles:
        splits: dict[str, LogitSet] = {}
        for bundle in args.bundles:
            for name, logits in load_bundle(bundle).items():
                splits[name if name not in splits else f"{bundle.stem}:{name}"] = logits
        return splits
    if any(p is None for p in per_array):
        raise ValueError("--teacher, --student-a, --student-b and --labels go together: give all four")
    return {args.split: load_arrays(*per_array)}


def _progress(iterable: Iterable[int], total: int, desc: str) -> Iterable[int]:
    return progress(iterable, total=total, desc=desc)


def run(args: argparse.Namespace) -> int:
    """Analyse every split, print the report, write ``analyze.txt`` and ``analyze.json``."""
    if args.demo == "digits" and not check_extras("analyze --demo digits", "sklearn"):
        return 2
    settings = SEED_FIGURES if args.seed_figures else KLSettings()
    settings = replace(settings, temperature=args.temperature, correction=args.correction, backend=args.backend,
                       eps=settings.eps if args.eps is None else args.eps)
    try:
        splits = load_splits(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    reports = analyze(splits, settings, examples=args.examples, chunk_rows=args.chunk_rows,
                      progress=None if args.quiet else _progress)
    seconds = time.perf_counter() - start
    text = format_report(reports)
    print(text)
    rows = sum(r.n for r in reports)
    print(f"analysed {rows} rows in {seconds:.2f} s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "analyze.txt").write_text(text + "\n")
    payload = {"settings": asdict(settings), "seconds": seconds, "splits": [asdict(r) for r in reports]}
    print(f"wrote {args.out_dir / 'analyze.txt'} and {write_json(args.out_dir / 'analyze.json', payload)}")
    return 0
