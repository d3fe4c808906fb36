"""The notebooks run top to bottom (with QAT_NOTEBOOK_QUICK=1: a few batches per step), and git holds them without outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run.py")
run_notebooks = importlib.util.module_from_spec(spec)
sys.modules["run_notebooks"] = run_notebooks
spec.loader.exec_module(run_notebooks)


def test_there_are_notebooks_and_they_carry_no_outputs():
    assert [p.name for p in run_notebooks.NOTEBOOKS] == ["01_quickstart_vision.ipynb", "02_llm_qat.ipynb",
                                                         "03_sensitivity_mixed_precision.ipynb"]
    for path in run_notebooks.NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), path.name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("path", run_notebooks.NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    executed = nbformat.read(run_notebooks.execute(path, tmp_path, quick=True, timeout=600), as_version=4)
    errors = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    images = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) >= {"01_quickstart_vision": 3, "02_llm_qat": 1, "03_sensitivity_mixed_precision": 1}[path.stem]
