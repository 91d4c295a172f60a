"""The tutorials in ``notebooks/`` run top to bottom, with tiny sizes, and check their own results.

Each notebook is a jupytext "percent" script with a cell tagged ``parameters`` (a reader's
sizes). The test reads it with jupytext, inserts a cell of tiny sizes right after that one (as
papermill does), and executes it with nbclient in a fresh ``python3`` kernel. Every notebook ends
with assertions, so a wrong result fails here like a cell error. Nothing is written to the repo:
the kernel runs in a temporary folder and the executed notebook is discarded.
"""

from pathlib import Path

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = REPO_ROOT / "notebooks"
CELL_TIMEOUT_S = 300


# Tiny sizes: enough for each notebook's own assertions to be meaningful, small enough that all
# six run in about two minutes on two CPU cores with a warm compilation cache.
SMALL = {
    "01_higher_order_derivatives": {"hidden": 64, "batch": 16},
    "02_maml_sinusoid": {
        "meta_steps": 500,
        "meta_batch": 10,
        "eval_tasks": 100,
        "fd_directions": 8,
    },
    "03_stop_gradient_td": {"num_steps": 50_000},
    "04_straight_through_quantization": {
        "meta_steps": 500,
        "meta_batch": 10,
        "bits_sweep": (8, 2),
        "eval_tasks": 100,
    },
    "05_per_example_gradients": {"batch": 64, "features": 32, "repeats": 3},
    "06_few_shot_omniglot": {
        "data_dir": None,  # set per run
        "hidden": 16,
        "meta_steps": 60,
        "log_every": 20,
        "meta_batch": 4,
        "eval_tasks": 50,
    },
    "07_implicit_hyperparameters": {"meta_steps": 100, "n_test": 200},
}


def _inject(nb, name: str, values: dict) -> None:
    """Insert a cell assigning ``values`` right after the cell tagged ``parameters``."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    params_src = nb.cells[tagged[0]].source
    for k in values:  # an override of a name the notebook does not define would test nothing
        assert f"{k} =" in params_src, f"{name}: the parameters cell defines no {k!r}"
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def _kernel_env() -> dict:
    # The kernel shares the tests' persistent compilation cache (conftest's SUBPROCESS_ENV) and
    # caches every program: a notebook's many small eager ops each compile in 10-100 ms.
    return dict(
        SUBPROCESS_ENV,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )


def _run(name: str, values: dict, tmp_path: Path) -> None:
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    _inject(nb, name, values)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute(env=_kernel_env())  # raises CellExecutionError, naming the failing cell


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_tiny_sizes_fit_the_parameters_cell(name):
    # The quick lane's check of what the slow lane runs: each notebook parses, has one cell
    # tagged "parameters", and defines every name the test overrides.
    _inject(jupytext.read(NOTEBOOKS / f"{name}.py"), name, SMALL[name])


# A fresh kernel per notebook, tens of seconds each: the slow lane (plain `pytest` runs it).
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SMALL if n != "06_few_shot_omniglot"])
def test_notebook_runs(name, tmp_path):
    _run(name, SMALL[name], tmp_path)


@pytest.mark.slow
def test_omniglot_notebook_runs(tmp_path, omniglot_dir):
    name = "06_few_shot_omniglot"
    _run(name, dict(SMALL[name], data_dir=str(omniglot_dir)), tmp_path)
