"""mapdit: magnitude-preserving diffusion transformers (MaP-DiT) in PyTorch."""

__version__ = "0.1.0"
