"""metagrad: gradient-based meta-learning in JAX.

The public API, re-exported from the modules that define it (``tests/test_public_api.py`` pins
this list).
"""

from metagrad import quant
from metagrad.autodiff import (
    Estimate,
    clip_per_example,
    derivative,
    gnvp,
    hessian,
    hutchinson_diagonal,
    hutchinson_trace,
    hvp,
    per_example_grad_norms,
    per_example_grads,
)
from metagrad.estimators import straight_through, td_loss
from metagrad.inner import adapt, mask_by_path, sgd_step
from metagrad.outer import (
    MetaGradEstimator,
    MetaLearner,
    MetaState,
    batch_value_and_grad,
    check_meta_grad,
    fomaml,
    imaml,
    make_estimator,
    maml,
    mamlpp,
    meta_learner,
    meta_loss,
    reptile,
)
from metagrad.tasks import Task

__version__ = "0.1.0"

__all__ = [
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
]
