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
# # 3. `stop_gradient` and the TD(0) semi-gradient
#
# `jax.lax.stop_gradient(x)` is the identity in the forward pass and a constant to every
# derivative. Its classic use, from JAX's advanced-autodiff tutorial, is temporal-difference
# learning: the TD(0) loss for a value function $v_\theta$ and a transition
# $(s_{t-1}, r_t, s_t)$ is
#
# $$L(\theta) = \big(\operatorname{sg}(r_t + \gamma v_\theta(s_t)) - v_\theta(s_{t-1})\big)^2,$$
#
# where $\operatorname{sg}$ is `stop_gradient`: the bootstrapped target is treated as a label.
# Its gradient, $-2\delta\,\nabla v_\theta(s_{t-1})$ with TD error
# $\delta = r_t + \gamma v(s_t) - v(s_{t-1})$, is the TD(0) *semi-gradient*. `mg.td_loss` is this
# loss; `semi_gradient=False` differentiates the target too (the *residual gradient*).

# %%
import jax
import jax.numpy as jnp
import numpy as np

import metagrad as mg

# %% tags=["parameters"]
num_steps = 200_000  # transitions of the random walk below
lr = 0.05  # step size of the TD updates
seed = 0

# %% [markdown]
# ## The tutorial's numbers
#
# A linear value function $v_\theta(s) = \theta^\top s$ with $\theta = (0.1, -0.1, 0)$,
# $s_{t-1} = (1, 2, -1)$, $r_t = 1$, $s_t = (2, 1, 0)$ and $\gamma = 1$: then
# $v(s_{t-1}) = -0.1$, $v(s_t) = 0.1$ and $\delta = 1.2$, so the semi-gradient is
# $-2 \cdot 1.2 \cdot s_{t-1} = (-2.4, -4.8, 2.4)$ and the residual gradient
# $2 \delta (s_t - s_{t-1}) = (2.4, -2.4, 2.4)$.

# %%
value_fn = lambda theta, s: jnp.dot(theta, s)
theta = jnp.array([0.1, -0.1, 0.0])
s_tm1, r_t, s_t = jnp.array([1.0, 2.0, -1.0]), 1.0, jnp.array([2.0, 1.0, 0.0])

semi = jax.jit(jax.grad(lambda th: mg.td_loss(value_fn, th, s_tm1, r_t, s_t)))(theta)
residual = jax.jit(
    jax.grad(lambda th: mg.td_loss(value_fn, th, s_tm1, r_t, s_t, semi_gradient=False))
)(theta)
print("semi-gradient:    ", semi)
print("residual gradient:", residual)

# %% [markdown]
# ## Which one learns the values?
#
# The 5-state random walk (Sutton & Barto, example 6.2): states 1 to 5, start in the middle,
# step left or right with probability 1/2; leaving on the right pays 1, on the left 0. With
# $\gamma = 1$ the true values are $1/6, 2/6, \dots, 5/6$. We use one-hot features (a table) and
# plain SGD on sampled transitions, averaging the iterates of the second half (Polyak averaging)
# to damp the noise of a constant step size.

# %%
n = 5
true_values = np.arange(1, n + 1) / (n + 1)


def features(state):
    """One-hot features; the two terminal states (0 and n + 1) have value 0."""
    return jnp.where((state >= 1) & (state <= n), jax.nn.one_hot(state - 1, n), 0.0)


def td_learning(semi_gradient, key):
    grad = jax.grad(
        lambda th, s, r, s_next: mg.td_loss(
            value_fn, th, features(s), r, features(s_next), semi_gradient=semi_gradient
        )
    )

    def step(carry, k):
        theta, s = carry
        s_next = s + jnp.where(jax.random.bernoulli(k), 1, -1)
        reward = jnp.where(s_next == n + 1, 1.0, 0.0)
        theta = theta - lr * grad(theta, s, reward, s_next)
        restart = (s_next == 0) | (s_next == n + 1)
        return (theta, jnp.where(restart, (n + 1) // 2, s_next)), theta

    init = (jnp.full(n, 0.5), jnp.asarray((n + 1) // 2))
    _, thetas = jax.lax.scan(step, init, jax.random.split(key, num_steps))
    return jnp.mean(thetas[num_steps // 2 :], axis=0)


run = jax.jit(td_learning, static_argnums=0)
key = jax.random.key(seed)
v_semi = np.asarray(run(True, key))
v_residual = np.asarray(run(False, key))

# %% [markdown]
# What does the residual gradient converge to? On sampled transitions it is the gradient of the
# mean squared TD error $E\big[(r + v(s') - v(s))^2\big]$, with the expectation over the
# states an episode visits (1, 2, 3, 2, 1 times on average) and both successors. That is a
# weighted least-squares problem, solved here in closed form: it is not the value function.

# %%
visits = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
rows, targets, weights = [], [], []
for s in range(1, n + 1):
    for s_next in (s - 1, s + 1):
        rows.append(np.asarray(features(s_next)) - np.asarray(features(s)))
        targets.append(-1.0 if s_next == n + 1 else 0.0)
        weights.append(visits[s - 1] / 2)
sqrt_w = np.sqrt(weights)[:, None]
mstde_min = np.linalg.lstsq(sqrt_w * np.array(rows), sqrt_w[:, 0] * np.array(targets))[0]

np.set_printoptions(precision=3, suppress=True)
print("true values          ", true_values)
print("semi-gradient TD(0)  ", v_semi)
print("residual gradient    ", v_residual)
print("argmin of the MSTDE  ", mstde_min)

# %% [markdown]
# ## When to use the semi-gradient
#
# - **Bootstrapped targets** (TD, Q-learning, actor-critic critics, DQN's target): stop the
#   gradient through the target. The update then moves $v(s_{t-1})$ towards the target, as
#   regression towards a label would; on-policy it converges to the true values with a table
#   (as above) and to the TD fixed point with linear features.
# - The **residual gradient** is the true gradient of the squared TD error, so it is stable
#   (it is plain SGD on a fixed objective), but with stochastic transitions that objective
#   penalises the variance of the next state's value and its minimiser is biased (above: values
#   pulled towards each other); unbiased estimates would need two independent samples of the next
#   state.
# - More generally, `stop_gradient` marks a quantity as data for this update: targets, baselines
#   in REINFORCE, the frozen statistics of a quantizer (notebook 4), or the Hessian term that
#   first-order MAML drops (notebook 2).

# %% [markdown]
# ## Checks

# %%
np.testing.assert_allclose(semi, [-2.4, -4.8, 2.4], rtol=1e-6)
np.testing.assert_allclose(residual, [2.4, -2.4, 2.4], rtol=1e-6)
err_semi = np.sqrt(np.mean((v_semi - true_values) ** 2))
err_residual_to_mstde = np.sqrt(np.mean((v_residual - mstde_min) ** 2))
gap = np.sqrt(np.mean((mstde_min - true_values) ** 2))
print(
    f"RMS: semi-gradient to true values {err_semi:.3f}, residual to MSTDE argmin "
    f"{err_residual_to_mstde:.3f}, MSTDE argmin to true values {gap:.3f}"
)
assert err_semi < 0.05, err_semi
assert err_residual_to_mstde < 0.05, err_residual_to_mstde
assert gap > 0.05, gap  # the residual gradient's fixed point really is elsewhere
print("all checks passed")
