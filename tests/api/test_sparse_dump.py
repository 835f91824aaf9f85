"""Dumping a teacher's top-k (``sparse_dump``, the ``dump-teacher`` command): the dumped teacher is
``SparseTeacher.from_logits`` of the model's logits, with the blocks' padding masked out; a file
round-trips; with k = V the loss of the dump equals the dense loss; the command runs a tiny
transformers model end to end (the ``hf`` extra)."""

from __future__ import annotations

import pytest
import torch

import logitstd_kernels as lsk
from logitstd_kernels.cli import main
from logitstd_kernels.sparse_dump import dump_teacher, load_teacher, save_teacher
from support import require_modules

F64 = torch.float64


def _toy_model(v: int = 17):
    table = torch.randn(v, v, dtype=F64) * 3
    return lambda ids, mask: table[ids] + mask[..., None] * 0.0, table


def _fields(t: lsk.SparseTeacher):
    return (t.ids, t.values, t.row_mean, t.row_std, t.log_normalizer)


def test_dump_is_from_logits_of_every_batch(tmp_path):
    logits_fn, table = _toy_model()
    input_ids = torch.randint(0, 17, (5, 6))
    attention_mask = torch.ones(5, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    options = dict(kind="logprobs", generation_temperature=1.3, temperature=2.0)
    teacher = dump_teacher(logits_fn, input_ids, attention_mask, k=4, batch_size=2, **options)
    want = lsk.SparseTeacher.from_logits(table[input_ids], 4, **options)
    for got, ref in zip(_fields(teacher), _fields(want)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert teacher.kind == "logprobs" and teacher.mask[1, 4:].logical_not().all() and teacher.mask[1, :4].all()
    save_teacher(str(tmp_path / "t.pt"), teacher, dict(options, model="toy"))
    loaded, settings = load_teacher(str(tmp_path / "t.pt"))
    assert settings["k"] == 4 and settings["generation_temperature"] == 1.3 and settings["model"] == "toy"
    for got, ref in zip(_fields(loaded) + (loaded.mask,), _fields(teacher) + (teacher.mask,)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_full_dump_gives_the_dense_loss():
    logits_fn, table = _toy_model()
    input_ids = torch.randint(0, 17, (3, 4))
    teacher = dump_teacher(logits_fn, input_ids, k=17, temperature=1.5)
    student = torch.randn(3, 4, 17, dtype=F64)
    options = dict(temperature=1.5, support="tail", backend="torch")
    torch.testing.assert_close(lsk.distillation_loss(student, teacher, **options),
                               lsk.distillation_loss(student, table[input_ids], **options), rtol=1e-10, atol=1e-12)


def test_load_refuses_other_files(tmp_path):
    torch.save({"ids": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a logitstd-sparse-teacher"):
        load_teacher(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="input_ids"):
        dump_teacher(_toy_model()[0], torch.zeros(3, dtype=torch.long), k=2)


def test_command_with_a_tiny_transformers_model(tmp_path, capsys):
    require_modules("transformers", extra="hf")
    import transformers

    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "teacher")
    blocks = {"input_ids": torch.randint(0, 48, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    blocks["attention_mask"][2, 6:] = 0
    torch.save(blocks, tmp_path / "blocks.pt")
    code = main(["dump-teacher", "--model", str(tmp_path / "teacher"), "--input", str(tmp_path / "blocks.pt"),
                 "--output", str(tmp_path / "teacher.pt"), "--k", "5", "--batch-size", "2", "--device", "cpu"])
    assert code == 0 and "k = 5" in capsys.readouterr().out
    teacher, settings = load_teacher(str(tmp_path / "teacher.pt"))
    with torch.no_grad():
        logits = model(**blocks).logits.float()
    want = lsk.SparseTeacher.from_logits(logits, 5, temperature=2.0)
    for got, ref in zip(_fields(teacher), _fields(want)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert settings["standardize"] and teacher.mask[2, 6:].logical_not().all()
