"""notebooks/implicit_hyperparameters.py runs top to bottom with tiny sizes and passes its own
checks (the hypergradient against the closed form and finite differences; per-feature L2
strengths beat the best single one), run as tests/test_notebooks.py runs the numbered ones."""

import pytest

pytest.importorskip("jupytext")
pytest.importorskip("nbclient")
from test_notebooks import _inject, _run  # noqa: E402  (after the skips)

NAME, SMALL = "implicit_hyperparameters", {"meta_steps": 100, "n_test": 200}


def test_tiny_sizes_fit_the_parameters_cell():
    import jupytext
    from test_notebooks import NOTEBOOKS

    _inject(jupytext.read(NOTEBOOKS / f"{NAME}.py"), NAME, SMALL)


@pytest.mark.slow
def test_implicit_hyperparameters_notebook_runs(tmp_path):
    _run(NAME, SMALL, tmp_path)
