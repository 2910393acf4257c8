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
