"""PyTorch-equivalent layers: values against live PyTorch, BatchNorm train semantics, drop path."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2s_jax import layers
from l2s_jax.models.policy import Policy, apply_policy
from l2s_jax.io.torch_state import load_state_dict

torch = pytest.importorskip("torch", reason="live layer comparisons need the optional torch extra")


def to_nhwc(t) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def sd_of(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kernel,stride,padding,groups", [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (4, 4, 0, 1),
                                                          (3, 1, 1, 2), (1, 1, 0, 1)])
def test_conv2d_matches_torch(kernel, stride, padding, groups):
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, groups=groups)
    conv = layers.Conv2d(4, 6, kernel, stride=stride, padding=padding, groups=groups, rngs=nnx.Rngs(0))
    load_state_dict(conv, sd_of(tconv))
    x = torch.randn(2, 4, 15, 14)
    np.testing.assert_allclose(conv(to_nhwc(x)), to_nhwc(tconv(x)), atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [((3, 3), 1), ((5, 5), 2), ((3, 3), 2), ((7, 3), 1)])
def test_depthwise_conv_matches_torch(kernel, stride):
    torch.manual_seed(1)
    pad = (kernel[0] // 2, kernel[1] // 2)
    tconv = torch.nn.Conv2d(5, 5, kernel, stride=stride, padding=pad, groups=5, bias=True)
    conv = layers.DepthwiseConv2d(5, kernel, stride=stride, rngs=nnx.Rngs(0))
    load_state_dict(conv, sd_of(tconv))
    x = torch.randn(2, 5, 13, 16)
    for impl in ("direct", "fft", "toeplitz"):
        conv.impl = impl
        np.testing.assert_allclose(conv(to_nhwc(x)), to_nhwc(tconv(x)), atol=1e-5, err_msg=impl)


def test_linear_and_layernorm_match_torch():
    torch.manual_seed(2)
    tlin, tln = torch.nn.Linear(6, 5), torch.nn.LayerNorm(6, eps=1e-6)
    with torch.no_grad():
        tln.weight.uniform_(0.5, 1.5)
        tln.bias.normal_()
    lin = layers.Linear(6, 5, rngs=nnx.Rngs(0))
    ln = layers.LayerNorm(6, eps=1e-6)
    load_state_dict(lin, sd_of(tlin))
    load_state_dict(ln, sd_of(tln))
    x = torch.randn(3, 4, 6) * 3 + 1
    np.testing.assert_allclose(lin(jnp.asarray(x.numpy())), tlin(x).detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ln(jnp.asarray(x.numpy())), tln(x).detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(layers.gelu(jnp.asarray(x.numpy())), torch.nn.GELU()(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(layers.hard_swish(jnp.asarray(x.numpy())), torch.nn.Hardswish()(x).numpy(), atol=1e-6)


def test_batchnorm_train_and_eval_match_torch():
    """Batch statistics, running-stat updates (momentum 0.1, unbiased var) and eval mode."""
    torch.manual_seed(3)
    tbn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.normal_()
    bn = layers.BatchNorm(4)
    load_state_dict(bn, sd_of(tbn))
    tbn.train()
    for step in range(3):
        x = torch.randn(3, 4, 5, 6) * (step + 1) + step
        np.testing.assert_allclose(bn(to_nhwc(x)), to_nhwc(tbn(x)), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], tbn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(bn.var[...], tbn.running_var.numpy(), rtol=1e-5)
    tbn.eval()
    bn.use_running_average = True
    x = torch.randn(2, 4, 3, 3)
    np.testing.assert_allclose(bn(to_nhwc(x)), to_nhwc(tbn(x)), atol=1e-5)


def test_batchnorm_stat_groups_are_per_device_batchnorm():
    """stat_groups=G normalises each contiguous 1/G of the batch by its own statistics (DDP BN)."""
    torch.manual_seed(4)
    x = torch.randn(8, 3, 4, 4)
    bn = layers.BatchNorm(3, stat_groups=2)
    y = bn(to_nhwc(x))
    parts, means, vars_ = [], [], []
    for chunk in x.chunk(2):
        tbn = torch.nn.BatchNorm2d(3).train()
        parts.append(to_nhwc(tbn(chunk)))
        means.append(tbn.running_mean.numpy())
        vars_.append(tbn.running_var.numpy())
    np.testing.assert_allclose(y, jnp.concatenate(parts), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], np.mean(means, 0), atol=1e-6)
    np.testing.assert_allclose(bn.var[...], np.mean(vars_, 0), rtol=1e-5)
    sync = layers.BatchNorm(3)
    assert not np.allclose(sync(to_nhwc(x)), y, atol=1e-3)  # global statistics differ


def test_policy_walks_the_model():
    class Net(nnx.Module):
        def __init__(self):
            self.items = nnx.List([layers.BatchNorm(2), layers.DepthwiseConv2d(2, 3, rngs=nnx.Rngs(0))])

    net = apply_policy(Net(), Policy(bn_stat_groups=4, depthwise_impl="toeplitz"))
    assert net.items[0].stat_groups == 4 and net.items[1].impl == "toeplitz"


def test_drop_path_scales_survivors_and_is_identity_in_eval():
    dp = layers.DropPath(0.25, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((4000, 2, 2, 3))
    y = dp(x)
    kept = np.asarray(y[:, 0, 0, 0] != 0)
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert not np.array_equal(np.asarray(dp(x)), np.asarray(y))  # a fresh mask each call
    dp.deterministic = True
    assert dp(x) is x


def test_bfloat16_compute_keeps_float32_params():
    conv = layers.Conv2d(3, 4, 3, padding=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = conv(jnp.ones((1, 5, 5, 3)))
    assert y.dtype == jnp.bfloat16 and conv.kernel[...].dtype == jnp.float32
    ln = layers.LayerNorm(4, eps=1e-6)
    assert ln(y).dtype == jnp.bfloat16
    assert jax.tree.leaves(nnx.state(conv, nnx.Param))[0].dtype == jnp.float32
