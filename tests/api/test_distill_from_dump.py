"""The offline recipe (examples/distill_from_dump.py): a tiny run dumps the teacher's top-k, trains the
student against the stored rows alone, and its loss goes down. Needs the ``hf`` extra."""

from __future__ import annotations

from support import load_example, require_modules


def test_tiny_offline_run_learns():
    require_modules("transformers", "accelerate", extra="hf")
    load_example("distill_causal_lm")
    lines: list[str] = []
    losses = load_example("distill_from_dump").main(["--tiny", "--device", "cpu", "--steps", "8", "--k", "16"],
                                                    log=lines.append)
    assert len(losses) == 8 and any(line.startswith("stored teacher:") and "k = 16" in line for line in lines)
    assert sum(losses[-2:]) < sum(losses[:2]) and losses[-1] < losses[0], losses
