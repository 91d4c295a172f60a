"""metagrad: gradient-based meta-learning in JAX.

The public API, re-exported from the modules that define it (``tests/test_public_api.py`` pins
this list). ``import metagrad`` loads JAX and optax only: Flax comes with ``metagrad.nn``, the
application (orbax, matplotlib) with ``metagrad.experiment``. ``metagrad.implicit`` is the
implicit-differentiation module; its estimator is ``metagrad.estimators.implicit`` (a top-level
function of that name would hide the module from ``import metagrad.implicit as ...``).
"""

from metagrad import precision, quant
from metagrad._types import MetaParams, Task
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
from metagrad.checks import check_meta_grad
from metagrad.estimators import (
    ESTIMATORS,
    InnerLoop,
    MetaGradEstimator,
    anil,
    es,
    es_grad,
    fomaml,
    imaml,
    learned_rates,
    make_estimator,
    maml,
    mamlpp,
    meta_loss,
    metasgd,
    pes,
    protomaml,
    protonet,
    r2d2,
    reptile,
    svm,
    truncated,
)
from metagrad.implicit import implicit_diff, implicit_vjp
from metagrad.inner import adapt, check_inner_optimizer, mask_by_path, sgd_step
from metagrad.outer import (
    MetaLearner,
    MetaState,
    batch_value_and_grad,
    default_task_batching,
    meta_learner,
)
from metagrad.precision import mixed_precision
from metagrad.stop_gradient import straight_through, td_loss

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "InnerLoop",
    "MetaGradEstimator",
    "MetaLearner",
    "MetaParams",
    "MetaState",
    "Task",
    "adapt",
    "anil",
    "batch_value_and_grad",
    "check_inner_optimizer",
    "check_meta_grad",
    "clip_per_example",
    "default_task_batching",
    "derivative",
    "es",
    "es_grad",
    "fomaml",
    "gnvp",
    "hessian",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "imaml",
    "implicit_diff",
    "implicit_vjp",
    "learned_rates",
    "make_estimator",
    "maml",
    "mamlpp",
    "mask_by_path",
    "meta_learner",
    "meta_loss",
    "metasgd",
    "mixed_precision",
    "per_example_grad_norms",
    "per_example_grads",
    "pes",
    "precision",
    "protomaml",
    "protonet",
    "quant",
    "r2d2",
    "reptile",
    "sgd_step",
    "straight_through",
    "svm",
    "td_loss",
    "truncated",
]
