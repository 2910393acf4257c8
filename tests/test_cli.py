"""The ``qft`` command: every recipe parses, and fit/eval run end to end on tiny-llama."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qft.cli import lightning_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_instantiates(recipe, monkeypatch):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "qft " in first and recipe.name in first, "recipes start with their command"
    text = recipe.read_text()
    if "../shared/data" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("recipe reads ../shared/data, which is absent")
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["--config", str(recipe)], run=False)
    assert cli.model.__class__.__name__.endswith("Module") and cli.datamodule is not None
    assert cli.trainer.max_steps > 0


def _qft(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "qft.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_fit_with_overrides_then_eval_the_checkpoint(tmp_path):
    r = _qft("fit", "--config", "recipes/qlora_synthetic.yaml", "--model.init_args.model=tiny-llama",
             "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
             f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_train=32", "--data.init_args.batch_size=4",
             "--trainer.accelerator=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1 and "step=2" in ckpts[0].name
    r = _qft("eval", "--ckpt", str(ckpts[0]), "--num-val", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy:" in r.stdout


def test_eval_perplexity_on_a_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("To be, or not to be, that is the question.\n" * 40)
    r = _qft("eval", "--model", "tiny-llama", "--text", str(p), "--seq-len", "64", "--windows", "2", "--task", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    ppl = float(r.stdout.split("perplexity:")[1].split()[0])
    assert 1000 < ppl < 1e6  # a random 49k-vocab model is near-uniform


def test_eval_without_anything_to_measure_fails_clearly():
    r = _qft("eval", "--model", "tiny-llama", "--task", "none")
    assert r.returncode != 0 and "nothing to measure" in r.stderr


def _refused(r, *fragments):
    """A refused argument: exit status 2, qft's one-line message on stderr, no traceback."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "qft " in r.stderr and ": error: " in r.stderr, r.stderr[-3000:]
    for f in fragments:
        assert f in r.stderr, (f, r.stderr[-3000:])


def test_fit_with_a_missing_data_file_says_so_without_a_traceback(tmp_path):
    missing = tmp_path / "nope.txt"
    r = _qft("fit", "--config", "recipes/lora_shakespeare.yaml", f"--data.init_args.path={missing}",
             "--model.init_args.model=tiny-llama", f"--trainer.default_root_dir={tmp_path}")
    _refused(r, f"QFTDataModule(path='{missing}'): no such file")
    assert "Union subtypes" not in r.stderr


def test_fit_with_a_model_typo_lists_the_built_ins(tmp_path):
    r = _qft("fit", "--config", "recipes/qlora_synthetic.yaml", "--model.init_args.model=smollm3-135m",
             f"--trainer.default_root_dir={tmp_path}")
    _refused(r, "'smollm3-135m'", "smollm2-135m", "tiny-llama", "network")


def test_eval_of_a_text_file_as_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint\n")
    _refused(_qft("eval", "--ckpt", str(bad), "--num-val", "2"), str(bad), "corrupt")


def test_verbose_keeps_the_traceback(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint\n")
    r = _qft("eval", "--ckpt", str(bad), "--verbose")
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_only_errors_qft_raises_are_shortened():
    from qft.cli import user_error
    from qft.data import QFTDataModule

    try:
        QFTDataModule(task="nope")
    except ValueError as e:
        ours = e
    try:
        int("x")  # raised inside Python, not by qft: keeps its traceback
    except ValueError as e:
        theirs = e
    assert user_error(ours) is ours and user_error(theirs) is None
    try:
        raise RuntimeError("wrapper") from ours  # how jsonargparse wraps a refused __init__
    except RuntimeError as e:
        assert user_error(e) is ours
