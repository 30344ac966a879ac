"""The example notebook: committed without outputs, and runs from top to bottom.

The execution test runs ``examples/paper_walkthrough.ipynb`` with nbclient in a
temporary working directory, on a smaller scan than the notebook's default (the cell
tagged ``parameters`` is extended, papermill-style). It is marked ``slow``: the two
full workflows and two HTML reports take one to a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "paper_walkthrough.ipynb"
SMALL = "SCAN = (32, 32)  # injected by tests/test_notebook.py"


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_stripped():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} have outputs or execution counts: clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_notebook_has_parameters_cell():
    nb = _read()
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "SCAN" in tagged[0].source and "WORKDIR" in tagged[0].source


def _kernel_name() -> str:
    """``python3`` if its kernel spec exists, else install one for this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:
        import subprocess
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user",
                        "--name", "python3"], check=True, capture_output=True)
        return "python3"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_notebook_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = _read()
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source += "\n" + SMALL
    monkeypatch.chdir(tmp_path)
    # the kernel must import this checkout of spedflow and use the non-interactive backend
    root = str(NOTEBOOK.parents[1])
    env_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", env_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.output_type == "stream")
    # the stage-by-stage run found the same vectors as the one-call workflow
    assert "same vectors as stage by stage: True" in text
    for method in ("vdf", "nmf"):
        assert (tmp_path / "walkthrough_output" / f"report_{method}" / "report.html").is_file()
        assert (tmp_path / "walkthrough_output" / f"{method}.zarr").is_dir()
