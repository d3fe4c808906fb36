"""The import graph by role (pyproject.toml's ``[tool.importlinter]`` contracts): each package imports
only the packages below it, so the numeric core never imports the speed wing or the application and
no package has an import cycle."""

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert status == 0, capsys.readouterr().out
