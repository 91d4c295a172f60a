"""Every public name has a docstring with an example that ``pytest --doctest-modules`` runs.

Public: the names in ``__all__`` of ``metagrad``, ``metagrad.nn``, ``metagrad.quant``,
``metagrad.tasks`` and of the modules they export, plus what ``metagrad.train`` defines without a
leading underscore (it has no ``__all__``). A new public name without a runnable example fails here.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import types

import pytest

ROOTS = ("metagrad", "metagrad.nn", "metagrad.quant", "metagrad.tasks", "metagrad.train")

# Plain constants: an int or a tuple has no docstring of its own (``__doc__`` is its type's), so
# these are documented by a comment where they are defined and by the functions that use them.
NO_DOCSTRING = {
    "metagrad.quant.BITS_RANGE": "tuple constant, the valid bit widths; used by uniform/lsq",
    "metagrad.tasks.omniglot.SPLIT_SEED": "int constant, the default seed of split_characters",
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
    """``{dotted name: object}``, walking into exported modules (``metagrad.tasks.omniglot``)."""
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
    return found


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
        "metagrad.train.train",
    ):
        assert name in PUBLIC, name
    assert "metagrad.train._chunk_fn" not in PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_has_docstring_and_runnable_example(name):
    if name in NO_DOCSTRING:
        assert not callable(PUBLIC[name]), f"{name} is callable: give it a docstring instead"
        return
    assert problems(PUBLIC[name]) == [], name


def test_allow_list_names_exist():
    assert set(NO_DOCSTRING) <= set(PUBLIC)


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
