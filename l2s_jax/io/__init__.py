"""Reading foreign checkpoints (PyTorch, safetensors, npz) safely and mapping them onto models."""
