"""Meta-gradient estimators, one family a file, and the one registry the CLI and users share.

An estimator computes a meta-gradient for one task and owns the inner loop it adapts with; what
applies the gradient (an optax optimizer in :func:`metagrad.meta_learner`) is separate, as in
learned_optimization.
"""

from __future__ import annotations

from metagrad.estimators.base import (
    InnerLoop,
    MetaGradEstimator,
    check_meta_params,
    learned_rates,
)
from metagrad.estimators.es import es, es_grad, pes
from metagrad.estimators.finetune import finetune
from metagrad.estimators.heads import r2d2, r2d2_head, svm, svm_head
from metagrad.estimators.imaml import imaml
from metagrad.estimators.implicit import implicit, proximal_optimality
from metagrad.estimators.maml import (
    anil,
    fomaml,
    head_only,
    maml,
    meta_loss,
    metasgd,
    truncated,
)
from metagrad.estimators.mamlpp import mamlpp, msl_weights
from metagrad.estimators.protonet import evaluate_tasks, protomaml, protonet
from metagrad.estimators.reptile import reptile

ESTIMATORS = {
    "maml": maml,
    "fomaml": fomaml,
    "anil": anil,
    "metasgd": metasgd,
    "mamlpp": mamlpp,
    "reptile": reptile,
    "imaml": imaml,
    "protonet": protonet,
    "protomaml": protomaml,
    "r2d2": r2d2,
    "svm": svm,
    "finetune": finetune,
}


def make_estimator(name: str, **kwargs) -> MetaGradEstimator:
    """The estimator called ``name`` (one of ``ESTIMATORS``), built with ``kwargs``.

    Example:
        >>> make_estimator("maml", steps=1, lr=0.01).name
        'maml'
        >>> make_estimator("anil", steps=1, lr=0.01).inner.mask("head/kernel")
        True
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown meta-gradient estimator {name!r}; choose one of {sorted(ESTIMATORS)}"
        )
    return ESTIMATORS[name](**kwargs)


__all__ = [
    "ESTIMATORS",
    "InnerLoop",
    "MetaGradEstimator",
    "anil",
    "check_meta_params",
    "finetune",
    "es",
    "es_grad",
    "evaluate_tasks",
    "fomaml",
    "head_only",
    "imaml",
    "implicit",
    "learned_rates",
    "make_estimator",
    "maml",
    "mamlpp",
    "meta_loss",
    "metasgd",
    "msl_weights",
    "pes",
    "protomaml",
    "protonet",
    "proximal_optimality",
    "r2d2",
    "r2d2_head",
    "reptile",
    "svm",
    "svm_head",
    "truncated",
]
