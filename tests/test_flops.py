"""Model FLOP counting (2 x multiply-adds of matmuls and convolutions) and the device peak table."""
import jax
import jax.numpy as jnp
import pytest

from l2s_jax import flops
from l2s_jax.models import create
from l2s_jax.models.policy import Policy


def spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_matmul_conv_and_nested_counts():
    assert flops.count_flops(lambda a, b: a @ b, spec(3, 4), spec(4, 5)) == 2 * 3 * 4 * 5
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=8)
    assert flops.count_flops(conv, spec(2, 6, 6, 8), spec(3, 3, 1, 8)) == 2 * 2 * 6 * 6 * 8 * 9
    # Inside jit and scan: the scan body counts once per iteration.
    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jax.jit(jnp.dot)(c, w), None), x, None, length=3)[0]
    assert flops.count_flops(scanned, spec(2, 4), spec(4, 4)) == 3 * 2 * 2 * 4 * 4


def test_convnext_tiny_bn_matches_published_count():
    # 8.91 GFLOP (2 x MACs, torch.utils.flop_counter) for ConvNeXt-T+BN at 224 px.
    model = create("convnext_tiny_bn", policy=Policy(depthwise_impl="direct"))
    model.eval()
    assert flops.count_flops(lambda x: model(x), spec(1, 224, 224, 3)) / 1e9 == pytest.approx(8.911, rel=1e-3)


def test_peak_table():
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert flops.device_peak_tflops("NVIDIA H200", "float32") == 67.0
    assert flops.device_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 19.5
    assert flops.device_peak_tflops("cpu", "float32") is None
