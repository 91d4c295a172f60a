"""Pins the names metagrad exports: adding one is a decision, removing one breaks users."""

import metagrad

EXPECTED = {
    "Estimate",
    "MetaGradEstimator",
    "MetaLearner",
    "MetaState",
    "Task",
    "adapt",
    "batch_value_and_grad",
    "check_meta_grad",
    "fomaml",
    "imaml",
    "make_estimator",
    "maml",
    "mamlpp",
    "mask_by_path",
    "meta_learner",
    "meta_loss",
    "reptile",
    "sgd_step",
    "clip_per_example",
    "derivative",
    "gnvp",
    "hessian",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "per_example_grad_norms",
    "per_example_grads",
    "quant",
    "straight_through",
    "td_loss",
}


def test_public_names_are_pinned():
    assert set(metagrad.__all__) == EXPECTED


def test_every_public_name_exists_and_is_documented():
    for name in metagrad.__all__:
        obj = getattr(metagrad, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
