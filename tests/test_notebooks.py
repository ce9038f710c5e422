"""Both notebooks run top to bottom in QUICK mode without a cell error, and every figure cell
(tagged ``figure``) shows an image and writes its PNG.

The notebooks run in a kernel of this interpreter (a kernelspec made for the test), with
``QUICK = True`` and ``FIGURE_DIR`` injected in a cell right after the ``parameters`` cell, as
papermill does (replacing the injected cell of the committed full run): ``notebooks/execute_notebook.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the dev extras (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the dev extras (nbformat, nbclient)")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute_notebook import execute  # noqa: E402  (notebooks/execute_notebook.py)

KERNEL = "sdmerge-test-python"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec that starts ipykernel with this interpreter, found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(root))
    patch.setenv("OMP_NUM_THREADS", "1")
    yield KERNEL
    patch.undo()


def run_quick(name: str, kernel: str, figure_dir: Path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert parameters == [1], f"{name}: the first code cell (after the title) must be the only one tagged 'parameters'"
    for name_ in ("QUICK", "DEVICE", "MODEL_PATH", "FIGURE_DIR"):
        assert re.search(rf"^{name_} = ", notebook.cells[1].source, re.M), f"{name}: parameters cell lacks {name_}"
    return execute(NOTEBOOKS / name, {"QUICK": True, "DEVICE": "cpu", "FIGURE_DIR": str(figure_dir)}, kernel, timeout=300)


@pytest.mark.parametrize(
    "name, figures",
    [
        ("speed_comparison.ipynb", {"speed_sd_resolution", "speed_sd_keep_rate", "speed_sd_plan_reuse", "speed_clustering",
                                    "speed_vit_keep_rate", "speed_vit_tokens_per_block"}),
        ("visualize_merging.ipynb", {"groups_vit", "groups_sd"}),
    ],
)
def test_notebook_runs_quick_and_every_figure_cell_shows_an_image(name, figures, kernel, tmp_path):
    notebook = run_quick(name, kernel, tmp_path)
    figure_cells = [cell for cell in notebook.cells if "figure" in cell.metadata.get("tags", [])]
    assert len(figure_cells) == len(figures)
    for cell in figure_cells:
        images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        assert images, f"{name}: figure cell without an image:\n{cell.source}"
        assert any("Reading" in out.get("text", "") for out in cell.outputs), f"{name}: figure cell without its reading"
    written = {path.stem for path in tmp_path.glob("*.png")}
    assert written == figures
