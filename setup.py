"""l2s_jax: large-to-small kernel distillation in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="l2s_jax",
    version="0.1.0",
    description=(
        "JAX/Flax NNX reimplementation of large-to-small kernel knowledge distillation "
        "(Are Large Kernels Better Teachers than Transformers for ConvNets?, ICML 2023)"
    ),
    packages=find_packages(include=["l2s_jax", "l2s_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "absl-py",
        "filelock>=3",  # JAX's size-capped compilation cache needs it; compile_cache uses its lock
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "tqdm",
        "tensorboardX>=2.6",
        "papermill>=2.6",
    ],
    extras_require={
        # Running the test suite (CPU only).
        "test": ["pytest>=8", "nbformat>=5", "ipykernel>=6", "tbparse>=0.0.9"],
        # Optional live comparisons against PyTorch and the PyTorch side of the benchmarks.
        "torch": ["torch>=2.4"],
    },
    entry_points={"console_scripts": [
        "l2s-train=l2s_jax.cli.train:main",
        "l2s-convert=l2s_jax.cli.convert_weights:main",
        "l2s-erf=l2s_jax.cli.erf:cli",
        "l2s-evaluate=l2s_jax.evaluate:cli",
        "l2s-report=l2s_jax.report:main",
    ]},
)
