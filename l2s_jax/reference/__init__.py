"""PyTorch reference implementations (optional ``torch`` extra) for live parity tests and benchmarks."""
