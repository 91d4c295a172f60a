"""Every public name has a docstring with an example that ``pytest --doctest-modules`` runs.

Public: the names in ``__all__`` of the modules in ``ROOTS`` and of the modules they export; a
module without ``__all__`` exports the functions and classes it defines without a leading
underscore. ``ROOTS`` is the package (``metagrad``), each layer's namespace (``metagrad.nn``,
``metagrad.tasks`` and its task families, ``metagrad.experiment``) and every core module
(``_types``, ``autodiff``, ``stop_gradient``, ``inner``, ``estimators``, ``outer``, ``checks``).
A name reachable under several paths is checked once, under its shortest. A new public name
without a runnable example fails here; the names in ``MISSING_EXAMPLES`` are known gaps, checked
to still be gaps (strict xfail), so the list shrinks as examples are written.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import types

import pytest

ROOTS = (
    "metagrad",
    "metagrad._types",
    "metagrad.autodiff",
    "metagrad.stop_gradient",
    "metagrad.inner",
    "metagrad.estimators",
    "metagrad.estimators.protonet",  # their helpers (prototypes, ridge_solve, probe...) too
    "metagrad.estimators.heads",
    "metagrad.estimators.finetune",
    "metagrad.outer",
    "metagrad.checks",
    "metagrad.implicit",
    "metagrad.nn",
    "metagrad.tasks",
    "metagrad.tasks.sinusoid",  # no longer imported by metagrad.tasks
    "metagrad.tasks.omniglot",
    "metagrad.tasks.tieredimagenet",
    "metagrad.tasks.cifar",
    "metagrad.tasks.imageset",
    "metagrad.tasks.miniimagenet_io",
    "metagrad.tasks.folder",
    "metagrad.tasks.cub",
    "metagrad.tasks.fewshot",
    "metagrad.tasks.streaming",
    "metagrad.tasks.augment",
    "metagrad.experiment",
    "metagrad.experiment.image_source",
)

# Plain constants: an int, a tuple or a dict has no docstring of its own (``__doc__`` is its
# type's), so these are documented by a comment where they are defined and by the functions that
# use them.
NO_DOCSTRING = {
    "metagrad.ESTIMATORS": "dict constant, the estimator registry; documented by make_estimator",
    "metagrad.outer.TASK_BATCHING": "tuple constant, the task-batching names; see meta_learner",
    "metagrad.quant.BITS_RANGE": "tuple constant, the valid bit widths; used by uniform/lsq",
    "metagrad.tasks.omniglot.SPLIT_SEED": "int constant, the default seed of split_characters",
}

# Public names of library code that have no runnable example yet (the library's owners write
# them; this file only records the gap). Remove a name once it has one: its test then XPASSes,
# which fails.
MISSING_EXAMPLES = {
    "metagrad.InnerLoop",
    "metagrad.estimators.head_only",
    "metagrad.experiment.Config",
    "metagrad.experiment.ConfigError",
    "metagrad.inner.UpdateRule",
    "metagrad.inner.optax_rule",
    "metagrad.inner.path_str",
    "metagrad.inner.sgd_rule",
    "metagrad.inner.sq_dist",
    "metagrad.inner.unroll_steps",
    "metagrad.inner.with_step",
    "metagrad.outer.task_mesh",
}


def _names(module: types.ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def public_names() -> dict[str, object]:
    """``{dotted name: object}``, walking into exported modules (``metagrad.quant``); a function,
    class, module or dict reachable under several names is listed once, under the shortest."""
    found: dict[str, object] = {}
    todo = [importlib.import_module(name) for name in ROOTS]
    seen = set()
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        for name in _names(module):
            obj = getattr(module, name)
            found[f"{module.__name__}.{name}"] = obj
            if isinstance(obj, types.ModuleType):
                todo.append(obj)
    shortest: dict[int, str] = {}
    for name, obj in found.items():
        if not _interned(obj):
            other = shortest.get(id(obj))
            if other is None or (len(name), name) < (len(other), other):
                shortest[id(obj)] = name
    return {
        name: obj
        for name, obj in sorted(found.items())
        if _interned(obj) or shortest[id(obj)] == name
    }


def _interned(obj) -> bool:
    """Small ints, strings and tuples may be one object under unrelated names: never merged."""
    return isinstance(obj, int | float | str | bytes | tuple) or obj is None


@functools.cache
def _doctests(module_name: str) -> dict[str, doctest.DocTest]:
    module = importlib.import_module(module_name)
    return {t.name: t for t in doctest.DocTestFinder().find(module)}


def problems(obj: object) -> list[str]:
    """What is missing from ``obj``'s documentation; empty when it is complete."""
    doc = obj.__doc__ if isinstance(obj, types.ModuleType) else inspect.getdoc(obj)
    own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else doc  # not inherited
    if not own or len(own.strip()) < 20:
        return ["no docstring"]
    if isinstance(obj, types.ModuleType):
        return []  # a namespace: its public names are checked one by one
    out = []
    if "Example:" not in own and "Examples:" not in own:
        out.append("no Google-style 'Example:' section")
    test = _doctests(obj.__module__).get(f"{obj.__module__}.{obj.__qualname__}")
    runnable = [
        e for e in (test.examples if test else []) if not e.options.get(doctest.SKIP, False)
    ]
    if not runnable:
        out.append("no '>>>' example that doctest runs (a skipped one does not count)")
    return out


PUBLIC = public_names()


def test_the_walk_finds_every_kind_of_public_name():
    for name in (
        "metagrad.maml",  # metagrad.__all__
        "metagrad.quant.uniform",  # an exported module's __all__
        "metagrad.nn.Conv4",
        "metagrad.tasks.omniglot.make_sampler",
        "metagrad.tasks.sinusoid.sample_task",  # a module without __all__
        "metagrad.estimators.msl_weights",  # a core module's name not re-exported by metagrad
        "metagrad.MetaParams",  # metagrad._types, checked under its shorter name
        "metagrad.inner.proximal",
        "metagrad.experiment.train",
        "metagrad.experiment.Experiment",
    ):
        assert name in PUBLIC, name
    assert "metagrad.experiment.loop._chunk_fn" not in PUBLIC
    assert "metagrad.estimators.maml" not in PUBLIC  # checked once, as metagrad.maml


def _case(name):
    if name in MISSING_EXAMPLES:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="known gap"))
    return name


@pytest.mark.parametrize("name", [_case(n) for n in sorted(PUBLIC)])
def test_public_name_has_docstring_and_runnable_example(name):
    if name in NO_DOCSTRING:
        assert not callable(PUBLIC[name]), f"{name} is callable: give it a docstring instead"
        return
    assert problems(PUBLIC[name]) == [], name


def test_allow_list_names_exist():
    assert set(NO_DOCSTRING) <= set(PUBLIC)
    assert MISSING_EXAMPLES <= set(PUBLIC)
    assert not MISSING_EXAMPLES & set(NO_DOCSTRING)


def _documented(x):
    """Doubles ``x``.

    Example:
        >>> _documented(2)
        4
    """
    return 2 * x


def _no_example(x):
    """Doubles ``x``, without an example to show it."""
    return 2 * x


def _skipped_example(x):
    return 2 * x


def test_the_check_fails_without_a_runnable_example():
    # Given here, not in the source, so that pytest's own doctest run does not list a skip.
    _skipped_example.__doc__ = """Doubles ``x``.

    Example:
        >>> _skipped_example(2)  # doctest: +SKIP
        4
    """
    _doctests.cache_clear()
    assert problems(_documented) == []
    assert problems(_no_example) == [
        "no Google-style 'Example:' section",
        "no '>>>' example that doctest runs (a skipped one does not count)",
    ]
    assert problems(_skipped_example) == [
        "no '>>>' example that doctest runs (a skipped one does not count)"
    ]
    assert problems(lambda x: x) == ["no docstring"]
