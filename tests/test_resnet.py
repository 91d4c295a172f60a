"""The few-shot image backbones: Finn et al.'s mini-ImageNet Conv4 (flattened 5x5x32 features) and
ResNet-12 (shapes, parameter counts, adapters, batch-norm policies, DropBlock, and a second-order
MAML meta-gradient against float64 finite differences)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams
from metagrad import nn as mnn
from metagrad.inner import path_str
from metagrad.nn.losses import cross_entropy_loss
from metagrad.nn.resnet import apply_block_mask, dropblock, dropblock_mask

TINY = (4, 4, 8, 8)
# conv2d's implementations agree to every order (tests/test_conv.py); "lax" compiles fastest here.
LAX = {"conv_impl": "lax"}


def _num_params(module_or_params) -> int:
    tree = module_or_params
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _features(model, x):
    """The last feature map (before pooling and head) of a Conv4 or ResNet12, shapes only."""
    graphdef, state = nnx.split(model)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        for i in range(4):
            x = getattr(m, f"block_{i}")(x)
        return x

    return jax.eval_shape(run, state, x).shape


# ---------------------------------------------------------------- Conv4, Finn et al.'s 84x84 model


def test_conv4_miniimagenet_model_flattens_5x5x32_features():
    def paper():
        return mnn.Conv4(
            3,
            5,
            hidden=32,
            downsample="maxpool",
            pool="flatten",
            maxpool_padding="VALID",
            image_size=84,
            rngs=nnx.Rngs(0),
        )

    model = nnx.eval_shape(paper)
    x = jax.ShapeDtypeStruct((7, 84, 84, 3), jnp.float32)
    assert _features(model, x) == (7, 5, 5, 32)  # 84 -> 42 -> 21 -> 10 -> 5 (VALID max-pool)
    params, apply = mnn.functional(model)
    assert jax.eval_shape(apply, params, x).shape == (7, 5)
    assert model.head.kernel.shape == (5 * 5 * 32, 5)  # flattened, not averaged over space
    # The paper's arithmetic: conv weights, batch-norm scales and biases, head.
    conv = 3 * 3 * 3 * 32 + 3 * (3 * 3 * 32 * 32)  # 28512
    bn = 4 * 2 * 32  # 256
    head = 5 * 5 * 32 * 5 + 5  # 4005
    assert conv + bn + head == 32773
    assert _num_params(params) == 32773


def test_conv4_defaults_unchanged_and_flatten_needs_image_size():
    model = nnx.eval_shape(
        lambda: mnn.Conv4(3, 5, hidden=32, downsample="maxpool", rngs=nnx.Rngs(0))
    )
    x = jax.ShapeDtypeStruct((2, 84, 84, 3), jnp.float32)
    assert _features(model, x) == (2, 6, 6, 32)  # SAME max-pool: 84 -> 42 -> 21 -> 11 -> 6
    assert model.head.kernel.shape == (32, 5)  # averaged over space
    with pytest.raises(ValueError, match="image_size"):
        mnn.Conv4(3, 5, pool="flatten", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool must be"):
        mnn.Conv4(3, 5, pool="max", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------- ResNet-12


@pytest.mark.slow
def test_resnet12_shapes_and_names():
    model = mnn.ResNet12(3, 5, widths=TINY, rngs=nnx.Rngs(0))
    params, apply = mnn.functional(model)
    y = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((6, 20, 20, 3), jnp.float32))
    assert y.shape == (6, 5) and y.dtype == jnp.float32  # 20 -> 10 -> 5 -> 2 -> 1, then head
    assert sorted(params) == ["block_0", "block_1", "block_2", "block_3", "head"]
    assert sorted(params["block_1"]) == [
        "conv_0",
        "conv_1",
        "conv_2",
        "conv_shortcut",
        "norm_0",
        "norm_1",
        "norm_2",
        "norm_shortcut",
    ]
    big = nnx.eval_shape(lambda: mnn.ResNet12(3, 5, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 84, 84, 3), jnp.float32)
    assert _features(big, x) == (2, 5, 5, 640)  # 84 -> 42 -> 21 -> 10 -> 5
    # ANIL adapts the head alone; adapt_batchnorm=False freezes every norm_* (shortcut's too).
    anil = jax.tree_util.tree_leaves_with_path(mnn.adapt_mask(params, head_only=True))
    assert all(m == path_str(p).startswith("head") for p, m in anil)
    frozen = jax.tree_util.tree_leaves_with_path(mnn.adapt_mask(params, adapt_batchnorm=False))
    assert all(m == ("norm_" not in path_str(p)) for p, m in frozen)
    with pytest.raises(ValueError, match="4 blocks"):
        mnn.ResNet12(3, 5, widths=(4, 4, 8), rngs=nnx.Rngs(0))


def test_resnet12_parameter_count_at_84x84():
    model = nnx.eval_shape(lambda: mnn.ResNet12(3, 5, rngs=nnx.Rngs(0)))
    params, apply = mnn.functional(model)
    assert jax.eval_shape(
        apply, params, jax.ShapeDtypeStruct((1, 84, 84, 3), jnp.float32)
    ).shape == (
        1,
        5,
    )

    def block(c_in, w):  # three 3x3 convs, a 1x1 shortcut conv, four batch norms (scale, bias)
        return 3 * 3 * c_in * w + 2 * (3 * 3 * w * w) + c_in * w + 4 * 2 * w

    closed_form = block(3, 64) + block(64, 160) + block(160, 320) + block(320, 640) + (640 * 5 + 5)
    assert closed_form == 12_427_525  # 12,424,320 in the blocks, 3205 in the head
    assert _num_params(params) == closed_form


@pytest.mark.slow
def test_resnet12_functional_round_trip(key):
    model = mnn.ResNet12(3, 4, widths=TINY, rngs=nnx.Rngs(1))
    params, apply = mnn.functional(model)
    x = jax.random.normal(key, (5, 16, 16, 3))
    module_out = nnx.jit(lambda m, x: m(x))(model, x)
    f = jax.jit(apply)
    np.testing.assert_allclose(f(params, x), module_out, rtol=1e-6, atol=1e-6)
    shifted = jax.tree.map(lambda p: p + 0.5, params)
    assert not np.allclose(f(shifted, x), module_out)
    np.testing.assert_allclose(f(params, x), module_out, rtol=1e-6, atol=1e-6)  # untouched


@pytest.mark.slow
def test_resnet12_support_policy_is_not_transductive(key):
    """Each query image's prediction depends on the support set, never on the other queries."""
    model = mnn.ResNet12(3, 3, widths=TINY, bn_policy="support", **LAX, rngs=nnx.Rngs(0))
    params, apply = mnn.functional(model)
    k1, k2 = jax.random.split(key)
    xs, xq = jax.random.normal(k1, (3, 16, 16, 3)), jax.random.normal(k2, (4, 16, 16, 3))
    yq = jnp.arange(4) % 3
    loss = jax.jit(cross_entropy_loss(apply))
    alone = jax.jit(jax.vmap(lambda x, y: loss(params, (x[None], y[None], xs))))(xq, yq)
    together = loss(params, (xq, yq, xs))
    np.testing.assert_allclose(float(together), float(alone.mean()), rtol=1e-5)
    assert abs(float(loss(params, (xq, yq))) - float(together)) > 1e-4  # transductive differs


@pytest.mark.slow
def test_resnet12_per_step_policy_uses_the_steps_parameters(key):
    model = mnn.ResNet12(3, 2, widths=TINY, bn_policy="per_step", steps=3, **LAX, rngs=nnx.Rngs(0))
    params, apply = mnn.functional(model)
    assert params["block_2"]["norm_shortcut"]["scale"].shape == (3, 8)
    x = jax.random.normal(key, (4, 16, 16, 3))
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, x, step=1) ** 2)))(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        if "norm_" in path_str(path):
            assert np.all(leaf[jnp.array([0, 2])] == 0), path_str(path)
            assert np.any(leaf[1] != 0), path_str(path)
    f = jax.jit(apply)
    np.testing.assert_array_equal(f(params, x, step=7), f(params, x, step=2))  # clamped


@pytest.mark.slow  # 7 s with a warm compilation cache, 17-23 s cold on a shared 2-core CPU
def test_resnet12_second_order_maml_matches_finite_differences(key):
    """Second-order MAML through a tiny ResNet-12 against float64 central differences.

    Leaky ReLU and max-pool have kinks; with random unit directions and eps = 1e-6 a difference
    crosses one with negligible probability at a generic point (random inputs, no ties).
    """
    model = mnn.ResNet12(1, 2, widths=(2, 2, 3, 3), **LAX, rngs=nnx.Rngs(3))
    params, apply = mnn.functional(model)
    loss_fn = cross_entropy_loss(apply)
    k1, k2 = jax.random.split(key)
    labels = jnp.array([0, 0, 1, 1])
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        task = mg.Task(
            (jax.random.normal(k1, (4, 16, 16, 1), jnp.float64), labels),
            (jax.random.normal(k2, (4, 16, 16, 1), jnp.float64), labels),
        )
        err = mg.check_meta_grad(
            mg.maml(steps=1, lr=0.1),
            loss_fn,
            MetaParams(params),
            task,
            num_directions=4,
            eps=1e-6,
        )
    assert err < 1e-6, err


# ---------------------------------------------------------------------------------- DropBlock


def test_dropblock_scales_exactly_on_a_fixed_mask():
    seeds = jnp.zeros((1, 4, 4, 2)).at[0, 0, 0, 0].set(1.0).at[0, 2, 1, 1].set(1.0)
    mask = dropblock_mask(seeds, 3)  # a 3x3 block at (0, 0) in channel 0, at (2, 1) in channel 1
    assert mask.shape == (1, 6, 6, 2)
    expected = np.ones((1, 6, 6, 2))
    expected[0, 0:3, 0:3, 0] = 0
    expected[0, 2:5, 1:4, 1] = 0
    np.testing.assert_array_equal(mask, expected)
    x = jnp.arange(72.0).reshape(1, 6, 6, 2) + 1.0
    y = apply_block_mask(x, mask)
    kept = 72 - 2 * 9
    np.testing.assert_allclose(y, x * expected * (72 / kept), rtol=1e-6)
    ones = apply_block_mask(jnp.ones((1, 6, 6, 2)), mask)
    np.testing.assert_allclose(float(ones.mean()), 1.0, rtol=1e-6)  # the mean is preserved


def test_dropblock_drops_whole_blocks_and_is_off_without_a_key(key):
    x = jnp.ones((2, 24, 24, 8))
    b, rate = 3, 0.2
    assert dropblock(x, None, rate=rate, block_size=b) is x
    assert dropblock(x, key, rate=0.0, block_size=b) is x
    y = dropblock(x, key, rate=rate, block_size=b)
    dropped = np.asarray(y == 0)
    # Every dropped unit lies in a b x b square of dropped units: the zeros are a union of blocks.
    window = jax.lax.reduce_window(
        jnp.asarray(dropped, jnp.float32), jnp.inf, jax.lax.min, (1, b, b, 1), (1,) * 4, "VALID"
    )
    np.testing.assert_array_equal(1.0 - dropblock_mask(window, b), dropped)
    kept = y[~dropped]
    np.testing.assert_allclose(kept, x.size / (~dropped).sum(), rtol=1e-6)  # one rescale factor
    assert 0.1 < dropped.mean() < 0.25  # about `rate` of the units


@pytest.mark.slow
def test_resnet12_dropblock_off_matches_plain_and_on_needs_a_key(key):
    plain = mnn.ResNet12(3, 2, widths=TINY, **LAX, rngs=nnx.Rngs(0))
    dropping = mnn.ResNet12(3, 2, widths=TINY, drop_rate=0.3, block_size=2, **LAX, rngs=nnx.Rngs(0))
    p0, apply0 = mnn.functional(plain)
    p1, apply1 = mnn.functional(dropping)
    x = jax.random.normal(key, (4, 32, 32, 3))  # 32 -> 16 -> 8 -> 4 -> 2: blocks fit
    k2 = jax.random.fold_in(key, 1)

    @jax.jit  # one compilation for all the variants
    def outputs(p0, p1, x, key, k2):
        return (
            apply0(p0, x),
            apply1(p1, x),  # no key: off
            apply0(p0, x, key=key),  # drop_rate 0: off
            apply1(p1, x, key=key),
            apply1(p1, x, key=key),
            apply1(p1, x, key=k2),
        )

    reference, no_key, rate_zero, on, again, other = outputs(p0, p1, x, key, k2)
    np.testing.assert_array_equal(no_key, reference)
    np.testing.assert_array_equal(rate_zero, reference)
    assert not np.allclose(on, reference)
    np.testing.assert_array_equal(again, on)  # pure: the key decides
    assert not np.allclose(other, on)
