"""mapdit: magnitude-preserving diffusion transformers (MaP-DiT) in PyTorch."""
__version__ = "0.1.0"

# The Python API (mapdit.api, docs/python-api.md), loaded on first use so that `import mapdit` stays light.
_API = ("load_run", "load_dit_checkpoint", "build_model", "Pipeline", "SamplerSpec", "run_config")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mapdit' has no attribute {name!r}")
