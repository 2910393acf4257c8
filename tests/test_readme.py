"""The README's Python quickstart runs as written, and the README stays the short page a newcomer reads."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_is_at_most_12_kb_and_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links only
        assert (ROOT / target).exists(), target


def test_readme_python_quickstart_runs_and_exports_the_grid_as_trained(tmp_path, monkeypatch):
    import torch

    from qft.export import load_quantized

    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the quickstart writes runs/quickstart/...
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code, as a user runs it
    trainer, module = scope["trainer"], scope["module"]
    assert trainer.global_step == scope["steps"]
    out = tmp_path / "runs" / "quickstart" / "int4"
    assert (out / "model.safetensors").is_file()
    x = torch.randint(0, module.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    q = load_quantized(out, dtype=module.model.get_input_embeddings().weight.dtype).eval()
    q.set_attn_implementation(module.model.config._attn_implementation)
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(module.model(input_ids=x).logits, q(input_ids=x).logits)  # the model as trained
