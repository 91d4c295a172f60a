# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Higher-order derivatives
#
# JAX differentiates functions, and a derivative is again a function, so `jax.grad` can be
# applied as often as we like. metagrad wraps the patterns of JAX's advanced-autodiff tutorial:
#
# - `mg.derivative(f, order=n)`: the n-th derivative of a scalar function of a scalar;
# - `mg.hessian(f)`: the full Hessian, forward-over-reverse (`jacfwd(grad(f))`);
# - `mg.hvp(f, x, v)`: a Hessian-vector product $\nabla^2 f(x)\,v$ without building the Hessian,
#   which is what second-order MAML needs for models far too large for their Hessian.

# %%
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import metagrad as mg
from metagrad import nn

# %% tags=["parameters"]
in_features = 64  # input width of the MLP in the Hessian-vector product section
hidden = 512  # hidden width: (64, 512, 512, 1) has about 3e5 parameters
batch = 128  # examples in the regression loss

# %% [markdown]
# ## n-th derivatives of a polynomial
#
# $f(x) = x^3 + 2x^2 - 3x + 1$ has $f' = 3x^2 + 4x - 3$, $f'' = 6x + 4$, $f''' = 6$ and
# $f'''' = 0$; at $x = 1$ that is 4, 10, 6 and 0.

# %%
f = lambda x: x**3 + 2 * x**2 - 3 * x + 1
derivs = {n: float(jax.jit(mg.derivative(f, order=n))(1.0)) for n in range(1, 5)}
for n, value in derivs.items():
    primes = "'" * n
    print(f"f{primes}(1) = {value}")

# %% [markdown]
# ## The Hessian of $x \cdot x$
#
# $\nabla (x \cdot x) = 2x$, so the Hessian is $2I$ everywhere.

# %%
x = jnp.array([1.0, 2.0, 3.0])
H_dot = jax.jit(mg.hessian(lambda x: x @ x))(x)
print(H_dot)

# %% [markdown]
# ## A Hessian-vector product on a model too large for its Hessian
#
# A regression loss of an MLP, as a function of its parameters. The Hessian has $N^2$ entries
# for $N$ parameters; `mg.hvp` computes $Hv$ with one forward-mode pass over the gradient
# (`jvp` of `grad`), at a few times the cost of one gradient.
#
# The check: $Hv$ is the directional derivative of the gradient, so the central difference
# $\big(\nabla f(\theta + \epsilon v) - \nabla f(\theta - \epsilon v)\big) / 2\epsilon$ must
# agree with it. We compute both in float64 so that the difference quotient is accurate.
# ($v$ has unit length: the step then stays far from the ReLU kinks, where the gradient jumps.)

# %%
with jax.enable_x64(True):
    params, apply = nn.functional(nn.MLP(in_features, (hidden, hidden), 1, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    flat_params, unravel = ravel_pytree(params)  # one vector <-> the params pytree
    k_x, k_y, k_v = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(k_x, (batch, in_features), jnp.float64)
    ys = jax.random.normal(k_y, (batch, 1), jnp.float64)
    loss = lambda p: nn.mse_loss(apply)(p, (xs, ys))

    n_params = flat_params.size
    print(f"parameters N = {n_params:,}")
    print(
        f"the Hessian would hold N^2 = {n_params**2:.2e} floats "
        f"({n_params**2 * 4 / 1e9:,.1f} GB in float32)"
    )

    v_flat = jax.random.normal(k_v, flat_params.shape, jnp.float64)
    v_flat = v_flat / jnp.linalg.norm(v_flat)
    params, v = unravel(flat_params), unravel(v_flat)

    Hv = jax.jit(lambda p, v: mg.hvp(loss, p, v))(params, v)

    @jax.jit
    def grad_difference(flat, v, eps=1e-6):
        grad = lambda x: ravel_pytree(jax.grad(loss)(unravel(x)))[0]
        return (grad(flat + eps * v) - grad(flat - eps * v)) / (2 * eps)

    Hv_flat = ravel_pytree(Hv)[0]
    Hv_fd = grad_difference(flat_params, v_flat)
    hvp_rel_err = float(jnp.linalg.norm(Hv_flat - Hv_fd) / jnp.linalg.norm(Hv_fd))
    hv_norm, vHv = float(jnp.linalg.norm(Hv_flat)), float(v_flat @ Hv_flat)
print(f"||Hv|| = {hv_norm:.4g},  v^T H v = {vHv:.4g}")
print(f"relative error of hvp against the difference of gradients: {hvp_rel_err:.2e}")

# %% [markdown]
# ## Checks
#
# The notebook fails here if any result above is wrong.

# %%
assert derivs == {1: 4.0, 2: 10.0, 3: 6.0, 4: 0.0}, derivs
np.testing.assert_array_equal(H_dot, 2 * np.eye(3))
assert hvp_rel_err < 1e-6, hvp_rel_err
print("all checks passed")
