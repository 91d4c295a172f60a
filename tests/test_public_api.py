"""Pins the names metagrad exports: adding one is a decision, removing one breaks users."""

import metagrad

EXPECTED = {
    # types
    "MetaParams",
    "Task",
    # autodiff
    "Estimate",
    "clip_per_example",
    "derivative",
    "gnvp",
    "hessian",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "per_example_grad_norms",
    "per_example_grads",
    # stop_gradient and quantizers
    "quant",
    "straight_through",
    "td_loss",
    # inner loop
    "adapt",
    "check_inner_optimizer",
    "mask_by_path",
    "sgd_step",
    # estimators and their registry
    "ESTIMATORS",
    "InnerLoop",
    "MetaGradEstimator",
    "anil",
    "fomaml",
    "imaml",
    "learned_rates",
    "make_estimator",
    "maml",
    "mamlpp",
    "meta_loss",
    "metasgd",
    "reptile",
    "truncated",
    # metric and closed-form heads (their first argument is an embedding)
    "protomaml",
    "protonet",
    "r2d2",
    "svm",
    # zero-order
    "es",
    "es_grad",
    "pes",
    # mixed precision
    "mixed_precision",
    "precision",
    # implicit differentiation
    "implicit_diff",
    "implicit_vjp",
    # outer loop
    "MetaLearner",
    "MetaState",
    "batch_value_and_grad",
    "default_task_batching",
    "meta_learner",
    # checks
    "check_meta_grad",
}

# DESIGN.md's pinned names: tests, notebooks, the README and users rely on these.
PINNED = {
    "derivative",
    "hessian",
    "hvp",
    "per_example_grads",
    "straight_through",
    "sgd_step",
    "adapt",
    "meta_loss",
    "check_meta_grad",
}


def test_public_names_are_pinned():
    assert sorted(metagrad.__all__) == sorted(EXPECTED)
    assert len(metagrad.__all__) == len(set(metagrad.__all__))  # no name listed twice


def test_implicit_module_is_not_shadowed():
    import metagrad.implicit as implicit_module

    assert implicit_module.implicit_diff is metagrad.implicit_diff
    assert metagrad.estimators.implicit.__module__ == "metagrad.estimators.implicit"


def test_design_pinned_names_are_exported():
    assert PINNED <= set(metagrad.__all__)


def test_every_public_name_exists_and_is_documented():
    for name in metagrad.__all__:
        obj = getattr(metagrad, name)
        if name == "ESTIMATORS":  # a dict: documented by its module and by make_estimator
            assert set(obj) == {
                *("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml"),
                *("protonet", "protomaml", "r2d2", "svm", "finetune"),
            }
            continue
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_estimator_registry_builds_every_estimator():
    for name, factory in metagrad.ESTIMATORS.items():
        kwargs = {"steps": 1} if name == "metasgd" else {"steps": 1, "lr": 0.1}  # learns its lr
        if name in ("protonet", "r2d2", "svm", "finetune"):  # no inner loop: a fitted classifier
            kwargs = {}
        est = metagrad.make_estimator(name, **kwargs)
        assert isinstance(est, metagrad.MetaGradEstimator), name
        assert est.name == name and factory is metagrad.ESTIMATORS[name]
