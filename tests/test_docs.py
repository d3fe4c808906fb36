"""The Python examples of the README and of the guides moved out of it run as written, and so does the quick-start script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qat.export.verify import verify_artifact

ROOT = Path(__file__).resolve().parents[1]


# Each file's ```python blocks run in order in one namespace, as a reader would run them: a name that a
# block takes from the file's earlier blocks is there. CHECKS is a name the blocks must have left
# behind, and what must hold of it.
# Every Markdown file of docs/ is listed: a page without Python examples must have none.
DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
CHECKS = {
    "README.md": ("export", lambda export: export.result is not None and export.result.ort.parity.top1_agreement == 1.0),
    "docs/guide/lightning.md": ("trainer", lambda trainer: {"QuantizationAwareTraining", "ONNXExport"}
                                <= {type(c).__name__ for c in trainer.callbacks}),
    "docs/guide/python-api.md": ("program", lambda program: len(program.model_proto.graph.node) > 0),
    "docs/guide/cli.md": ("task", lambda task: task is not None),
    "docs/guide/export.md": ("trainer", lambda trainer: trainer is not None),
    # a fresh model (norm weights all ones under a quantized embedding) has exact int8 ties: docs/guide/llm-on-device.md
    "docs/guide/llm-on-device.md": ("result", lambda result: (result.folder / "genai_config.json").is_file()
                                    and result.cached_max_abs_diff <= 0.05 * result.parity.output_scale),
    "docs/guide/sensitivity.md": ("choice", lambda choice: choice.model_bytes > 0),
    "docs/design/speed.md": ("plain", lambda plain: plain.shape == (4, 8)),
}


def test_every_doc_page_is_collected():
    assert {"README.md", "docs/guide/lightning.md", "docs/design/speed.md", "docs/reference/qat.md"} <= set(DOC_FILES)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_readme_python_blocks_run(doc, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    if doc not in CHECKS:
        assert not blocks, f"{doc} has Python examples: say in CHECKS what they must leave behind"
        return
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, doc, "exec"), namespace)
    name, check = CHECKS[doc]
    assert check(namespace[name])


@pytest.mark.slow
def test_quickstart_example_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "2", "--qat-epochs", "2", "--bits", "4",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "140"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W4A8" in result.stdout and "ONNX Runtime = PyTorch" in result.stdout
    for name in ("digits_w4a8.onnx", "digits_w4a8.ort.onnx"):
        assert (tmp_path / name).stat().st_size > 0
        assert verify_artifact(tmp_path / name).ok  # and its .qparams.json describes it


@pytest.mark.slow
def test_readme_main_job_runs_short(tmp_path):
    """The README's first quick-start command, `qat run <default recipe>`, with the run shortened."""
    pytest.importorskip("mlxtend")
    from qat.app.cli import main
    from qat.app.results import load_results

    bash = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    command = bash.splitlines()[0].split("&&")[1].split("#")[0].split()
    assert command[:2] == ["qat", "run"] and (ROOT / command[2]).is_file()
    assert main(["run", str(ROOT / command[2]), "--out", str(tmp_path), "--calibration-batches", "1", "--latency-runs", "1",
                 "--trainer.max_epochs=1", "--trainer.limit_train_batches=10", "--trainer.limit_val_batches=1",
                 "--trainer.enable_progress_bar=false", "--trainer.logger=false"]) == 0
    results = load_results(tmp_path / "results.json")
    assert all(entry["verified"] for entry in results["artifacts"].values())
    assert results["verified_inputs"] == 448  # MNIST-5k's 500 test digits, in whole batches of the export's 64
