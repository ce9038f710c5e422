"""Run a notebook top to bottom with parameters injected after its ``parameters`` cell (as
papermill does), in place or into a returned copy. Used by ``tests/test_notebooks.py`` (QUICK
mode) and to refresh the committed outputs (a full run)::

    OMP_NUM_THREADS=2 python notebooks/execute_notebook.py notebooks/speed_comparison.ipynb notebooks/visualize_merging.ipynb

writes each notebook back with ``QUICK = False`` injected and its outputs (and the README's figures,
``docs/figures/*.png``). Needs the ``notebooks`` extra (nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbclient
import nbformat

INJECTED = "injected-parameters"


def execute(path, parameters: dict, kernel_name: str = "python3", timeout: int = 3600):
    """The notebook at ``path`` executed with ``parameters`` (``{name: value}``, written with
    ``repr``) set in a cell tagged ``injected-parameters`` right after the cell tagged
    ``parameters`` (an earlier injected cell is replaced). Runs in the notebook's folder; raises
    ``nbclient.exceptions.CellExecutionError`` on the first failing cell."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if INJECTED not in cell.metadata.get("tags", [])]
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path}: expected one cell tagged 'parameters', found {len(tagged)}")
    source = "# Injected parameters (papermill style)\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = [INJECTED]
    notebook.cells.insert(tagged[0] + 1, cell)
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return notebook


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--quick", action="store_true", help="QUICK = True instead of the full run")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        start = time.perf_counter()
        notebook = execute(path, {"QUICK": args.quick}, args.kernel)
        nbformat.write(notebook, path)
        print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
