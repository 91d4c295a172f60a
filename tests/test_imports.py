"""Import hygiene: each layer loads only what it needs (DESIGN.md's three layers).

Every check runs in a fresh interpreter and reads its ``sys.modules``: ``import metagrad`` and the
core math load none of Flax, Pillow, matplotlib, Hydra, OmegaConf or orbax; ``metagrad.nn``
brings Flax; the Omniglot reader loads Pillow only to decode images; the application is
Hydra-free and its figures never touch ``matplotlib.pyplot`` (no global backend switch).
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

HEAVY = ("flax", "PIL", "matplotlib", "hydra", "omegaconf", "orbax")
# Importing any metagrad.X imports the package first, so one interpreter that imports these in
# turn, noting what each import adds, attributes a heavy import to the first module that makes it.
CORE = (
    "metagrad",
    "metagrad._types",
    "metagrad.autodiff",
    "metagrad.stop_gradient",
    "metagrad.quant",
    "metagrad.inner",
    "metagrad.estimators",
    "metagrad.outer",
    "metagrad.checks",
)

PROBE = """
import importlib, json, sys

def loaded(names):
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in sys.modules))

heavy = {heavy!r}
out = {{}}
for module in {modules!r}:
    importlib.import_module(module)
    out[module] = loaded(heavy)
{extra}
print(json.dumps(out))
"""


def probe(modules, heavy=HEAVY, extra=""):
    """``{module: heavy modules loaded after importing it}`` from a fresh interpreter (``extra``
    is code run after the imports, which may add entries to ``out``)."""
    code = PROBE.format(heavy=tuple(heavy), modules=tuple(modules), extra=extra)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def core():
    return probe(CORE)


@pytest.mark.parametrize("module", CORE)
def test_core_loads_no_flax_pil_matplotlib_hydra_or_orbax(core, module):
    assert core[module] == [], f"import {module} loaded {core[module]}"


def test_nn_brings_flax():
    out = probe(["metagrad", "metagrad.nn"])
    assert out["metagrad"] == []
    assert out["metagrad.nn"] == ["flax"]  # and nothing else heavy


def test_experiment_is_hydra_free_and_plots_never_import_pyplot():
    out = probe(
        ["metagrad.experiment", "metagrad.experiment.plots"],
        heavy=("hydra", "omegaconf", "matplotlib.pyplot", "matplotlib"),
    )
    assert out["metagrad.experiment"] == []  # figures are made only when a run writes one
    assert out["metagrad.experiment.plots"] == ["matplotlib"]  # the Figure class, not pyplot


def test_omniglot_loads_pillow_only_to_decode_images(tmp_path):
    from test_omniglot_data import synthetic_release, write_zips

    files, _ = synthetic_release()
    data_dir = write_zips(tmp_path / "data", files)
    load = (
        "from metagrad.tasks.omniglot import load_omniglot\n"
        f"data = load_omniglot({str(data_dir)!r}, cache_dir={str(tmp_path / 'cache')!r})\n"
        "assert data.images.shape[0] == 7, data.images.shape\n"
        "out['after load_omniglot'] = loaded(heavy)\n"
    )
    decoded = probe(["metagrad.tasks.omniglot"], heavy=("PIL",), extra=load)
    assert decoded == {"metagrad.tasks.omniglot": [], "after load_omniglot": ["PIL"]}
    cached = probe(["metagrad.tasks.omniglot"], heavy=("PIL",), extra=load)  # a cache hit
    assert cached == {"metagrad.tasks.omniglot": [], "after load_omniglot": []}
