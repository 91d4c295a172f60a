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
# # Hyperparameter optimisation by implicit differentiation
#
# Ridge regression with one L2 strength per feature, $\lambda_j = e^{\rho_j}$, learned on a
# validation loss: a bilevel problem.
#
# $$w^\star(\rho) = \arg\min_w \; \frac{1}{2n}\|Xw - y\|^2 + \frac12 \sum_j e^{\rho_j} w_j^2,
# \qquad \min_\rho \; L_{val}(\rho) = \frac{1}{2m}\|X_v w^\star(\rho) - y_v\|^2 .$$
#
# The inner problem's solution satisfies $F(w^\star, \rho) = \nabla_w(\ldots) = 0$, so by the
# implicit function theorem $\partial w^\star / \partial \rho = -(\partial_w F)^{-1}
# \partial_\rho F$. `mg.implicit_diff(F)` turns any solver of the inner problem into a function
# whose gradient is exactly that, computed by a linear solve with vector products of $F$'s
# Jacobian (here conjugate gradients), never by differentiating the solver's iterations.
#
# With few training examples and many features, most of which carry no signal, one shared
# $\lambda$ must compromise; per-feature strengths can shrink the noise features hard and
# leave the informative ones alone (automatic relevance determination, learned by gradients).

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg

# %% tags=["parameters"]
features = 30  # input dimension
informative = 5  # features with a nonzero true weight
n_train = 40  # training examples (fewer than a well-posed unregularised fit would like)
n_val = 200  # validation examples: the outer loss
n_test = 1000  # held-out examples: the honest score
meta_steps = 300  # Adam steps on the log-strengths rho
meta_lr = 0.1
seed = 0

# %% [markdown]
# ## Data
#
# The first `informative` features carry the signal; the rest are noise.

# %%
k_w, k_x, k_n = jax.random.split(jax.random.key(seed), 3)
w_true = jnp.zeros(features).at[:informative].set(jax.random.normal(k_w, (informative,)) * 2)
X_all = jax.random.normal(k_x, (n_train + n_val + n_test, features))
y_all = X_all @ w_true + 0.5 * jax.random.normal(k_n, (len(X_all),))
splits = np.cumsum([n_train, n_val])
(X, X_val, X_test), (y, y_val, y_test) = np.split(X_all, splits), np.split(y_all, splits)


def mse(w, X, y):
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def train_objective(w, rho):
    return mse(w, X, y) + 0.5 * jnp.sum(jnp.exp(rho) * w**2)


# %% [markdown]
# ## The inner solver, differentiated implicitly
#
# Any solver will do: here conjugate gradients on the normal equations
# $(X^\top X / n + \mathrm{diag}\,\lambda)\, w = X^\top y / n$, 200 iterations at most. The
# decorator needs only the optimality condition $F = \nabla_w$ of the training objective.


# %%
@mg.implicit_diff(jax.grad(train_objective), solve="cg", tol=1e-10, maxiter=200)
def ridge_solver(init, rho):
    matvec = lambda w: X.T @ (X @ w) / len(X) + jnp.exp(rho) * w
    w, _ = jax.scipy.sparse.linalg.cg(matvec, X.T @ y / len(X), x0=init, tol=1e-10, maxiter=200)
    return w


def val_loss(rho):
    return mse(ridge_solver(jnp.zeros(features), rho), X_val, y_val)


hypergrad = jax.jit(jax.value_and_grad(val_loss))

# %% [markdown]
# ## Is the hypergradient right?
#
# Against the closed form, differentiated by JAX through `jnp.linalg.solve` (possible here, since
# the problem is small), and against central finite differences along one direction.


# %%
def closed_form_val_loss(rho):
    A = X.T @ X / len(X) + jnp.diag(jnp.exp(rho))
    return mse(jnp.linalg.solve(A, X.T @ y / len(X)), X_val, y_val)


rho0 = jnp.full(features, jnp.log(0.1))
_, g_implicit = hypergrad(rho0)
g_direct = jax.grad(closed_form_val_loss)(rho0)
direction = jax.random.normal(jax.random.key(1), (features,))
eps = 1e-3
fd = (val_loss(rho0 + eps * direction) - val_loss(rho0 - eps * direction)) / (2 * eps)
rel_closed = float(jnp.linalg.norm(g_implicit - g_direct) / jnp.linalg.norm(g_direct))
rel_fd = abs(float(g_implicit @ direction - fd)) / abs(float(fd))
print(f"implicit vs closed-form gradient: relative difference {rel_closed:.1e}")
print(f"implicit vs finite differences along a direction: {rel_fd:.1e}")

# %% [markdown]
# ## Baselines: no regularisation, and the best single strength on the validation set

# %%
unregularised = mse(ridge_solver(jnp.zeros(features), jnp.full(features, -20.0)), X_test, y_test)
grid = jnp.logspace(-4, 1, 26)
val_by_lam = jnp.array([val_loss(jnp.full(features, jnp.log(lam))) for lam in grid])
best_lam = grid[jnp.argmin(val_by_lam)]
rho_scalar = jnp.full(features, jnp.log(best_lam))
scalar_val = float(val_by_lam.min())
scalar_test = float(mse(ridge_solver(jnp.zeros(features), rho_scalar), X_test, y_test))
print(f"no regularisation: test {float(unregularised):.4f}")
print(f"best single lambda {float(best_lam):.3g}: val {scalar_val:.4f}, test {scalar_test:.4f}")

# %% [markdown]
# ## Learning one strength per feature
#
# Adam on $\rho$, started from the best single strength, with the implicit hypergradient.

# %%
opt = optax.adam(meta_lr)


@jax.jit
def meta_step(rho, opt_state):
    loss, g = jax.value_and_grad(val_loss)(rho)
    updates, opt_state = opt.update(g, opt_state, rho)
    return optax.apply_updates(rho, updates), opt_state, loss


rho, opt_state = rho_scalar, opt.init(rho_scalar)
for step in range(meta_steps):
    rho, opt_state, loss = meta_step(rho, opt_state)
    if step % max(1, meta_steps // 5) == 0:
        print(f"step {step:4d}: validation loss {float(loss):.4f}")
learned_val = float(val_loss(rho))
learned_test = float(mse(ridge_solver(jnp.zeros(features), rho), X_test, y_test))
print(f"per-feature lambdas: val {learned_val:.4f}, test {learned_test:.4f}")
lam = jnp.exp(rho)
print("median lambda, informative features:", float(jnp.median(lam[:informative])))
print("median lambda, noise features:      ", float(jnp.median(lam[informative:])))

# %% [markdown]
# The learned strengths are small on the informative features and large on the noise ones:
# the validation loss, differentiated through the solver's optimality condition, found which
# features to trust.

# %% [markdown]
# ## Checks

# %%
assert rel_closed < 1e-3, rel_closed  # float32: CG to 1e-10 relative, then rounding
assert rel_fd < 1e-2, rel_fd
assert learned_val < scalar_val, (learned_val, scalar_val)
assert learned_test < float(unregularised), (learned_test, float(unregularised))
assert float(jnp.median(lam[informative:])) > float(jnp.median(lam[:informative]))
print("all checks passed")
