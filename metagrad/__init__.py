"""metagrad: gradient-based meta-learning in JAX.

The public API, re-exported from the modules that define it (``tests/test_public_api.py`` pins
this list).
"""

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

__version__ = "0.1.0"

__all__ = [
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
    "straight_through",
    "td_loss",
]
