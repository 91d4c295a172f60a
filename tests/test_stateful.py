"""The stateful NNX adapter (metagrad.nn.stateful): dropout masks per task and step from the task
key, batch-norm running averages under each policy against a hand computation in plain jnp,
meta-gradients against float64 finite differences and against the deterministic model, and the
errors for state the adapter does not understand."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT
from flax import nnx

import metagrad as mg
import metagrad.nn as mnn
from metagrad import MetaParams, Task
from metagrad.nn import (
    adapt_stateful,
    dropout_key,
    from_nnx_stateful,
    mse_loss,
    per_step_state,
    stateful_estimator,
    stateful_meta_grad,
    stateful_meta_loss,
)

EPS = 1e-5  # nnx.BatchNorm's default epsilon


class BNNet(nnx.Module):
    """Linear(2, 3) -> BatchNorm -> tanh [-> Dropout] -> Linear(3, 1)."""

    def __init__(self, rngs, *, momentum=0.8, rate=0.0):
        self.lin1 = nnx.Linear(2, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, momentum=momentum, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs) if rate else None
        self.head = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.lin1(x)))
        return self.head(h if self.drop is None else self.drop(h))


class DropMLP(nnx.Module):
    """Linear(1, 8) -> ReLU [-> Dropout] -> Linear(8, 1); without dropout when ``rate is None``."""

    def __init__(self, rngs, rate):
        self.hidden = nnx.Linear(1, 8, rngs=rngs)
        self.drop = None if rate is None else nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.hidden(x))
        return self.head(h if self.drop is None else self.drop(h))


def jiggle(params, key, scale=0.3):
    """Generic parameters (batch norm starts at scale 1, bias 0)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def regression_tasks(key, n, *, support=6, query=5, shift=5.0):
    """``n`` tasks (a leading task axis); query inputs shifted by ``shift``, so any query
    statistics leaking into the running averages would show."""
    k1, k2, k3 = jax.random.split(key, 3)
    xs = jax.random.normal(k1, (n, support, 2))
    xq = jax.random.normal(k2, (n, query, 2)) + shift
    w = jax.random.normal(k3, (n, 1, 2))
    target = lambda x: jnp.sin(jnp.sum(w * x, -1, keepdims=True))
    return Task((xs, target(xs)), (xq, target(xq)))


# ------------------------------------------------------------------------------------ dropout


class MaskProbe(nnx.Module):
    """``sum(dropout(x) * w)``: its gradient with respect to ``w`` is the step's mask (scaled)."""

    def __init__(self, rngs, rate=0.5, features=16):
        self.w = nnx.Param(jnp.zeros(features))
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return jnp.sum(self.drop(x) * self.w[...], axis=-1)


def linear_loss(apply_fn):
    return lambda p, batch: jnp.mean(apply_fn(p, batch[0]))


def test_dropout_masks_differ_across_tasks_and_steps_and_repeat_with_the_same_keys(key):
    """With SGD at lr 1 on sum(mask * x / keep * w), phi_k = -2 sum_{i<k} mask_i (keep 1/2), so
    the differences between 1, 2 and 3 steps are the masks of steps 0, 1, 2 exactly."""
    params, state, apply = from_nnx_stateful(MaskProbe(nnx.Rngs(0)))
    ones = jnp.ones((1, 16))
    batch = (ones, jnp.zeros(1))

    def adapted_w(task_key, steps):
        adapted, _ = adapt_stateful(
            apply, linear_loss, params, state, batch, key=task_key, steps=steps, lr=1.0
        )
        return adapted["w"]

    @jax.jit
    def masks(task_key):
        ws = [adapted_w(task_key, k) for k in range(4)]
        return jnp.stack([(a - b) / 2 for a, b in zip(ws[:-1], ws[1:], strict=True)])

    k_a, k_b = jax.random.split(key)
    m_a, m_b = masks(k_a), masks(k_b)
    assert set(np.unique(np.asarray(m_a)).tolist()) == {0.0, 1.0}  # dropout is on
    # The mask a forward pass with key k draws on this input: d/dw sum(mask * x / keep * w).
    mask_of = jax.jit(jax.grad(lambda w, k: jnp.sum(apply({"w": w}, state, ones, key=k)[0]) / 2))
    for i in range(3):  # step i used dropout_key(task_key, i): the documented policy
        np.testing.assert_array_equal(mask_of(params["w"], dropout_key(k_a, i)), m_a[i])
    distinct = {tuple(np.asarray(m).tolist()) for m in [*m_a, *m_b]}
    assert len(distinct) == 6  # different across steps and across tasks
    # The same keys give the same masks, bit for bit, even from a module seeded differently:
    # the masks depend on the key alone, not on the module's stored stream or call history.
    np.testing.assert_array_equal(masks(k_a), m_a)
    params2, state2, apply2 = from_nnx_stateful(MaskProbe(nnx.Rngs(123)))
    again = adapt_stateful(apply2, linear_loss, params2, state2, batch, key=k_a, steps=1, lr=1.0)
    np.testing.assert_array_equal(again[0]["w"], -2 * m_a[0])

    # The query pass draws its own mask, from dropout_key(task_key): the loss is -2 m_q . sum m_i.
    task = Task(batch, batch)
    loss, _ = jax.jit(
        lambda k: stateful_meta_loss(
            apply, linear_loss, params, state, task, key=k, steps=3, lr=1.0
        )
    )(k_a)
    q_mask = mask_of(params["w"], dropout_key(k_a))
    assert tuple(np.asarray(q_mask).tolist()) not in distinct
    np.testing.assert_allclose(loss, -2 * 2 * jnp.dot(q_mask, m_a.sum(0)), rtol=1e-6)


@pytest.mark.slow
def test_meta_gradient_with_dropout_off_equals_the_deterministic_models(key):
    """Dropout at rate 0, and dropout switched off by eval mode, give metagrad.maml's
    meta-gradient of the same weights without a Dropout layer."""
    params, _, _ = from_nnx_stateful(DropMLP(nnx.Rngs(0), 0.5))
    params = jiggle(params, key)
    plain_params, plain_apply = mnn.functional(DropMLP(nnx.Rngs(0), None))
    assert jax.tree.structure(plain_params) == jax.tree.structure(params)
    k1, k2 = jax.random.split(key)
    xs, xq = jax.random.normal(k1, (5, 1)), jax.random.normal(k2, (7, 1))
    task = Task((xs, jnp.sin(3 * xs)), (xq, jnp.sin(3 * xq)))
    est = mg.maml(steps=2, lr=0.3)
    (want_loss, _), want = jax.jit(
        lambda mp: est.value_and_grad(mse_loss(plain_apply), mp, task, 0)
    )(MetaParams(params))

    for rate, train in [(0.0, True), (0.5, False)]:
        _, state, apply = from_nnx_stateful(DropMLP(nnx.Rngs(0), rate))
        objective = lambda p, apply=apply, state=state, train=train: stateful_meta_loss(
            apply, mse_loss, p, state, task, key=key, steps=2, lr=0.3, train=train
        )
        (loss, _), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_meta_gradient_with_dropout_on_matches_finite_differences(key):
    """With fixed keys the masks are constants: second-order MAML through them is exact."""
    params, state, apply = from_nnx_stateful(DropMLP(nnx.Rngs(0), 0.5))
    k1, k2, k3 = jax.random.split(key, 3)
    xs, xq = jax.random.normal(k1, (5, 1)), jax.random.normal(k2, (7, 1))
    task = Task((xs, jnp.sin(3 * xs)), (xq, jnp.sin(3 * xq)))
    est = stateful_estimator(apply, state, key=k3, steps=2, lr=0.3)
    err = mg.check_meta_grad(est, mse_loss, MetaParams(jiggle(params, key)), task)
    assert err < 1e-6, err


# --------------------------------------------------------------------------------- batch norm


def _stats(p, x):
    h = x @ p["lin1"]["kernel"] + p["lin1"]["bias"]
    return h.mean(0), h.var(0)


def _forward(p, x, mean, var):
    h = x @ p["lin1"]["kernel"] + p["lin1"]["bias"]
    z = (h - mean) / jnp.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
    return jnp.tanh(z) @ p["head"]["kernel"] + p["head"]["bias"]


def _mse(p, x, y, mean, var):
    return jnp.mean((_forward(p, x, mean, var) - y) ** 2)


def _batch_loss(p, x, y):
    return _mse(p, x, y, *_stats(p, x))


def hand_meta_step(theta, running, tasks, *, policy, steps, alpha, momentum, train=True):
    """One meta-step of the chosen policy in plain jnp: per task, `steps` SGD steps on the
    support (normalised with its own statistics), the running averages updated from the support
    statistics at phi_0 .. phi_{K-1} (per_step: slot i at step i), the query loss at phi_K
    (transductive/per_step: the query's statistics; support: the support's at phi_K); then the
    mean loss, the mean meta-gradient and the mean of the tasks' running averages. With
    ``train=False`` every pass uses the running averages and nothing is updated."""
    m = momentum

    def slot(i):
        if policy != "per_step":
            return running
        return jax.tree.map(lambda r: r[min(i, r.shape[0] - 1)], running)

    def task_loss(p, xs, ys, xq, yq):
        phis = []
        for i in range(steps):
            phis.append(p)
            if train:
                g = jax.grad(_batch_loss)(p, xs, ys)
            else:
                g = jax.grad(_mse)(p, xs, ys, slot(i)["mean"], slot(i)["var"])
            p = jax.tree.map(lambda a, b: a - alpha * b, p, g)
        if not train:
            q = slot(steps - 1)
            return _mse(p, xq, yq, q["mean"], q["var"]), phis
        if policy == "support":
            return _mse(p, xq, yq, *_stats(p, xs)), phis
        return _batch_loss(p, xq, yq), phis

    losses, grads, states = [], [], []
    for t in range(tasks.support[0].shape[0]):
        (xs, ys), (xq, yq) = jax.tree.map(lambda a, t=t: a[t], (tasks.support, tasks.query))
        (loss, phis), g = jax.value_and_grad(task_loss, has_aux=True)(theta, xs, ys, xq, yq)
        r = dict(running)
        for i, phi in enumerate(phis if train else []):
            mu, var = _stats(phi, xs)
            if policy == "per_step":
                r = {
                    "mean": r["mean"].at[i].set(m * r["mean"][i] + (1 - m) * mu),
                    "var": r["var"].at[i].set(m * r["var"][i] + (1 - m) * var),
                }
            else:
                r = {"mean": m * r["mean"] + (1 - m) * mu, "var": m * r["var"] + (1 - m) * var}
        losses.append(loss)
        grads.append(g)
        states.append(r)
    mean = lambda *xs: sum(xs) / len(xs)
    return mean(*losses), jax.tree.map(mean, *states), jax.tree.map(mean, *grads)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["transductive", "support", "per_step"])
def test_running_averages_after_meta_steps_match_a_hand_computation(policy, key):
    """Three meta-steps (two tasks, two inner steps, outer SGD): the running mean and variance
    and the parameters equal the plain-jnp computation of the policy."""
    steps, alpha, beta, momentum = 2, 0.1, 0.05, 0.8
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0), momentum=momentum))
    params = jiggle(params, key)
    if policy == "per_step":
        state = per_step_state(state, steps)
    kw = dict(steps=steps, lr=alpha, policy=policy)
    lib_step = jax.jit(
        lambda p, s, t: stateful_meta_grad(apply, mse_loss, p, s, t, **kw)
    )  # fmt: skip
    hand_step = jax.jit(
        lambda p, r, t: hand_meta_step(p, r, t, policy=policy, steps=steps, alpha=alpha,
                                       momentum=momentum)
    )  # fmt: skip
    p_lib, s_lib = params, state
    p_hand, r_hand = params, state["bn"]
    for n in range(3):
        tasks = regression_tasks(jax.random.fold_in(key, n), 2)
        (loss, s_lib), g = lib_step(p_lib, s_lib, tasks)
        loss_hand, r_hand, g_hand = hand_step(p_hand, r_hand, tasks)
        np.testing.assert_allclose(loss, loss_hand, rtol=1e-5)
        p_lib = jax.tree.map(lambda a, b: a - beta * b, p_lib, g)
        p_hand = jax.tree.map(lambda a, b: a - beta * b, p_hand, g_hand)
    for name in ("mean", "var"):
        np.testing.assert_allclose(s_lib["bn"][name], r_hand[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p_lib), jax.tree.leaves(p_hand), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The averages moved. The hand computation updates them from support statistics only and
    # the query inputs are shifted by 5, so an update from a query pass would break the equality.
    assert not np.allclose(s_lib["bn"]["mean"], state["bn"]["mean"])


@pytest.mark.slow
def test_meta_batch_state_is_the_same_under_vmap_and_map(key):
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0)))
    tasks = regression_tasks(key, 3)
    run = lambda batching: stateful_meta_grad(
        apply, mse_loss, params, state, tasks, steps=1, lr=0.1, task_batching=batching
    )
    (l1, s1), g1 = jax.jit(lambda: run("vmap"))()
    (l2, s2), g2 = jax.jit(lambda: run("map"))()
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s2, g2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param(
            dict(lr=0.1, mask=lambda path: path.startswith("head")), marks=pytest.mark.slow
        ),
        pytest.param(dict(optimizer=optax.adam(0.05, eps_root=1e-8)), marks=pytest.mark.slow),
    ],
    ids=["anil_mask", "adam"],
)
def test_adapt_keywords_pass_through_and_the_state_follows_the_trajectory(inner, key):
    """The parameters are metagrad.adapt's with the same keywords; the state is the running
    average folded over apply at phi_0 .. phi_{K-1} (an equivalent composition)."""
    steps = 3
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0)))
    params = jiggle(params, key)
    support = jax.tree.map(lambda a: a[0], regression_tasks(key, 1).support)
    loss_fn = mse_loss(lambda p, x: apply(p, state, x)[0])

    def both(params):
        got = adapt_stateful(apply, mse_loss, params, state, support, steps=steps, **inner)
        want, traj = mg.adapt(
            loss_fn, params, support, steps=steps, return_trajectory=True, **inner
        )
        folded = state
        for i in range(steps):
            phi = params if i == 0 else jax.tree.map(lambda t, i=i: t[i - 1], traj)
            folded = apply(phi, folded, support[0])[1]
        return got, (want, folded)

    (adapted, new), (want, folded) = jax.jit(both)(params)
    for a, b in zip(jax.tree.leaves((adapted, new)), jax.tree.leaves((want, folded)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if "mask" in inner:  # the body stayed, the head moved
        np.testing.assert_array_equal(adapted["lin1"]["kernel"], params["lin1"]["kernel"])
        assert not np.allclose(adapted["head"]["kernel"], params["head"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["transductive", "per_step"])
def test_eval_mode_normalises_with_the_running_averages_and_updates_nothing(policy, key):
    steps = 2
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0)))
    params = jiggle(params, key)
    k1, k2 = jax.random.split(key)
    running = {  # non-trivial averages (per_step: a different slot per step)
        "mean": jax.random.normal(k1, (steps, 3)),
        "var": jnp.exp(jax.random.normal(k2, (steps, 3))),
    }
    if policy != "per_step":
        running = jax.tree.map(lambda r: r[0], running)
    state = {"bn": running}
    tasks = regression_tasks(key, 2)
    (loss, new), _ = jax.jit(
        lambda: stateful_meta_grad(
            apply, mse_loss, params, state, tasks, steps=steps, lr=0.1, policy=policy,
            train=False,
        )
    )()  # fmt: skip
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    hand, _, _ = jax.jit(
        lambda: hand_meta_step(
            params, running, tasks, policy=policy, steps=steps, alpha=0.1, momentum=0.8,
            train=False,
        )
    )()  # fmt: skip
    np.testing.assert_allclose(loss, hand, rtol=1e-5)


@pytest.mark.parametrize(
    "policy, train",
    [
        ("transductive", True),
        pytest.param("support", True, marks=pytest.mark.slow),
        pytest.param("per_step", True, marks=pytest.mark.slow),
        ("support", False),
    ],
)
def test_stateful_meta_gradient_matches_finite_differences(policy, train, key):
    """Batch norm and dropout together; the state and the key fixed, as the policy holds them."""
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0), rate=0.3))
    if policy == "per_step":
        state = per_step_state(state, 2)
    task = jax.tree.map(lambda a: a[0], regression_tasks(key, 1, shift=1.0))
    est = stateful_estimator(apply, state, key=key, steps=2, lr=0.1, policy=policy, train=train)
    err = mg.check_meta_grad(est, mse_loss, MetaParams(jiggle(params, key)), task)
    assert err < 1e-6, err


# ------------------------------------------------------------------------------------- errors


class Counter(nnx.Variable):
    pass


class Counting(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(2, 2, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        return self.lin(x)


class OwnStats(nnx.Module):
    def __init__(self):
        self.mean = nnx.BatchStat(jnp.zeros(2))

    def __call__(self, x):
        return x - self.mean[...]


def test_unknown_state_is_refused_with_its_path_and_type():
    with pytest.raises(TypeError, match=r"Counting holds .*Counter at 'calls'"):
        from_nnx_stateful(Counting(nnx.Rngs(0)))
    nested = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), Counting(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"Counter at 'layers/1/calls'"):
        from_nnx_stateful(nested)
    with pytest.raises(TypeError, match=r"BatchStat at 'mean' belongs to OwnStats, not an nnx"):
        from_nnx_stateful(OwnStats())


def test_functional_refuses_state_the_inner_loop_must_carry():
    with pytest.raises(TypeError, match=r"bn/mean \(BatchStat\).*from_nnx_stateful"):
        mnn.functional(BNNet(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"drop/rngs/.*Rng.*from_nnx_stateful"):
        mnn.from_nnx(DropMLP(nnx.Rngs(0), 0.5))
    # Dropout without a stored stream holds no state (its key comes with each call): accepted.
    params, _ = mnn.functional(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5)))
    assert sorted(params["layers"]) == [0]


def test_bad_arguments_fail_before_compiling(key):
    params, state, apply = from_nnx_stateful(BNNet(nnx.Rngs(0), rate=0.5))
    support = (jnp.ones((4, 2)), jnp.ones((4, 1)))
    run = lambda **kw: adapt_stateful(
        apply, mse_loss, params, kw.pop("state", state), support, steps=1, lr=0.1, **kw
    )
    with pytest.raises(ValueError, match=r"RNG streams at drop/rngs.*pass key="):
        run()
    with pytest.raises(ValueError, match="batch-norm policy must be one of"):
        run(key=key, policy="running")
    with pytest.raises(ValueError, match=r"'per_step' policy needs \(steps, \*\(3,\)\)"):
        run(key=key, policy="per_step")
    with pytest.raises(ValueError, match="state must have the structure"):
        run(key=key, state={})
    with pytest.raises(ValueError, match="sets step_arg= itself"):
        run(key=key, step_arg=True)
    with pytest.raises(TypeError, match="StatefulApply from metagrad.nn.from_nnx_stateful"):
        adapt_stateful(lambda p, s, x: x, mse_loss, params, state, support, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="task_batching must be one of"):
        stateful_meta_grad(apply, mse_loss, params, state, Task(support, support), steps=1,
                           lr=0.1, key=key, task_batching="pmap")  # fmt: skip
    # Eval mode needs no key: no dropout.
    adapted, same = run(train=False)
    assert same is state


@pytest.mark.slow
def test_readme_stateful_snippet_runs(capsys):
    """The README's stateful-layers example runs as written and its check prints True."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- stateful -->\n```python\n(.*?)```\n<!-- /stateful -->", readme, re.S)
    assert block is not None, "README.md lost its <!-- stateful --> python block"
    exec(compile(block.group(1), "README.md:stateful", "exec"), {})
    assert capsys.readouterr().out.split("\n")[-2] == "True"
