import json

import pytest
import torch

from qft.data import QFTDataModule, addition_splits
from qft.data.tokenize import IGNORE, chat_example


def _dm(**kw):
    kw.setdefault("tokenizer", "tiny-llama")
    return QFTDataModule(**kw)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        _dm(task="text", path=str(tmp_path / "nope.txt"))


def test_empty_file_is_named(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    dm = _dm(task="instruct", path=str(p))
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        dm.setup()


@pytest.mark.parametrize("task,name,content,match", [
    ("text", "model.bin", b"\x00\x01\x02binary\x00", r"model\.bin.*binary file"),
    ("text", "latin1.txt", "line one\ncaf\xe9\n".encode("latin-1"), r"latin1\.txt.*line 2 is not UTF-8"),
    ("instruct", "d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     r"d\.jsonl.*line 2 is not valid JSON"),
    ("instruct", "d.json", b'[{"instruction": "a",\n "output": "b"},\n oops]', r"d\.json.*invalid JSON at line 3"),
])
def test_unreadable_data_names_the_file_and_line(tmp_path, task, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        _dm(task=task, path=str(p)).setup()


def test_missing_column_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": "hi", "answer": "x"}) for _ in range(3)))
    with pytest.raises(KeyError, match="'output'"):
        _dm(task="instruct", path=str(p)).setup()


def test_seq_len_longer_than_the_model_supports():
    with pytest.raises(ValueError, match="seq_len=4096.*max_position_embeddings=2048"):
        _dm(task="synthetic", seq_len=4096).setup()


@pytest.mark.parametrize("kw, match", [(dict(task="images"), "task='images'"), (dict(batch_size=0), "batch_size=0"),
                                       (dict(val_fraction=1.0), "val_fraction=1.0"), (dict(task="text"), "path")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _dm(**kw)


def test_text_is_packed_and_split_by_characters(tmp_path):
    text = "".join(f"line {i} of a plain text corpus.\n" for i in range(400))
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    dm = _dm(task="text", path=str(p), seq_len=32, batch_size=4)
    dm.setup()
    assert all(len(e["input_ids"]) == 32 for e in dm.train_set + dm.val_set)
    ratio = len(dm.val_set) / (len(dm.train_set) + len(dm.val_set))
    assert 0.05 < ratio < 0.15
    dm2 = _dm(task="text", path=str(p), seq_len=32, batch_size=4)
    dm2.setup()
    assert dm2.val_set == dm.val_set
    val_text = dm.tokenizer.decode(dm.val_set[-1]["input_ids"])
    assert "line 39" in val_text  # the held-out part is the end of the file
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["labels"], batch["input_ids"])


def test_instruction_loss_is_on_the_response_only(tmp_path, tokenizer):
    rows = [{"instruction": "Name a colour", "input": "", "output": "Blue"},
            {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there"}]}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows * 5))
    dm = _dm(task="instruct", path=str(p), val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    for ex in dm.train_set:
        learned = tokenizer.decode([t for t in ex["labels"] if t != IGNORE])
        assert learned.startswith(("Blue", "Hi there")) and "Name a colour" not in learned


def test_synthetic_splits_are_disjoint_and_deterministic():
    train, val = addition_splits(500, 100, seed=0)

    def key(r):
        return r["messages"][1]["content"]

    assert not {key(r) for r in train} & {key(r) for r in val}
    assert addition_splits(500, 100, seed=0) == (train, val)
    q = val[0]["messages"]
    a, b = [int(t) for t in q[1]["content"].removeprefix("What is ").rstrip("?").split(" + ")]
    assert q[2]["content"] == str(a + b) and 100 <= a <= 999


def test_synthetic_labels_cover_answer_and_end_of_turn(tokenizer):
    train, _ = addition_splits(1, 1)
    ex = chat_example(tokenizer, train[0]["messages"])
    learned = [t for t in ex["labels"] if t != IGNORE]
    assert tokenizer.decode(learned) == train[0]["messages"][2]["content"] + tokenizer.eos_token
