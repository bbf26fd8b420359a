"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (the venv's python3).

The kernel is a separate process with its own local Ray instance (started by the
notebook with its CPUs set and no dashboard), so it shares nothing with the test
session's Ray; RAY_ADDRESS is removed so that it cannot join another cluster either.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import ROOT

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def test_quickstart_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    work = tmp_path / "work"
    monkeypatch.setenv("QUICKSTART_DIR", str(work))
    monkeypatch.setenv("QUICKSTART_CONFIG", str(ROOT / "configs" / "smoke.yaml"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    print(f"\nexamples/quickstart.ipynb ran in {time.perf_counter() - started:.0f} s")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 2  # curves and the heatmap
    runs = work / "runs" / "smoke"
    assert (runs / "curves.png").exists() and len(list(runs.glob("epoch_*"))) >= 1
    scores = work / "scores"
    for name in ("wells.csv", "predictions.csv", "report.html", "heatmaps/P001/all_classes.png"):
        assert (scores / name).exists(), name
    served = [output for cell in notebook.cells if "serve_demo_prediction(" in cell.source for output in cell.outputs]
    assert served and "'labels'" in served[-1]["data"]["text/plain"]  # the JSON answer of POST /predict
