"""Every notebook in notebooks/ runs from top to bottom, draws its figures, and is committed executed.

Each notebook is executed on a fresh copy (the committed file is never rewritten) by nbclient with the
``python3`` kernel, which jupyter_client starts with this interpreter (``sys.executable``), so the kernel
sees the same virtual environment as the tests.  A cell that raises fails the test, as does a cell
that runs longer than ``CELL_TIMEOUT_S``.  The notebooks assert their own claims (Buffer == model, bit
for bit; the survivors of a killed rank return the model's fold over them, with identical masks; a joiner is
admitted), so executing them is the test.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 90  # a notebook is meant to run in under a minute on 2 CPU cores, whole


def _images(nb) -> int:
    return sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
               if "image/png" in out.get("data", {}))


def _errors(nb) -> list[str]:
    return [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_outputs(path):
    """The committed file was executed in order, without errors, and shows its figures."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    counts = [cell.execution_count for cell in nb.cells if cell.cell_type == "code"]
    assert counts and all(c is not None for c in counts), f"{path.name}: not every code cell was executed"
    assert counts == sorted(counts), f"{path.name}: cells were executed out of order: {counts}"
    assert not _errors(nb), _errors(nb)
    assert _images(nb) > 0, f"{path.name}: no figures in the committed outputs"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_executes(path, monkeypatch):
    """Run the notebook in a fresh kernel; every cell succeeds and the figures are drawn again."""
    committed = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel (and the ranks it starts) inherit it
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.monotonic()
    client.execute()  # raises CellExecutionError (with the cell's traceback) on the first failing cell
    elapsed = time.monotonic() - t0
    print(f"{path.name}: {elapsed:.1f} s, {_images(nb)} figures")
    assert not _errors(nb), _errors(nb)
    assert _images(nb) == _images(committed), (
        f"{path.name}: drew {_images(nb)} figures, the committed file shows {_images(committed)} "
        "(re-execute and commit it)")
