"""The examples run end to end with short outputs: on a tiny random model always, on SmolLM2 when marked slow."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LIBRARY_SECTION = (ROOT / "README.md").read_text().split("## Library front ends", 1)[1].split("\n## ", 1)[0]
SNIPPETS = re.findall(r"```python\n(.*?)```", LIBRARY_SECTION, re.DOTALL)
RUNS = {
    "parallel_chat": [],
    "multi_agent": [],
    "fork_sampling": [],
    "timing": ["--prompts", "3"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_covered():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_runs(name, tiny_model, capsys):
    result = load_example(name).main(["--model", tiny_model, "--max-tokens", "4", *RUNS[name]])
    assert result and capsys.readouterr().out


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_library_snippet_runs(index, tiny_model, monkeypatch, tmp_path, capsys):
    """README library snippets, with shoal.load_model() giving the tiny model."""
    import shoal

    loaded = shoal.load_model(tiny_model)
    monkeypatch.setattr(shoal, "load_model", lambda path=None, **_: loaded)
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README library snippet {index}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_runs_on_the_default_model(name, capsys):
    from shoal.errors import ModelLoadError
    from shoal.models.loader import default_model_path

    try:
        default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    result = load_example(name).main(["--max-tokens", "8", *RUNS[name]])
    assert result and capsys.readouterr().out
