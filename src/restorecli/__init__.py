"""restorecli: DiffBIR photo restoration as a command-line tool and a diffusers pipeline."""

__version__ = "0.1.0"

__all__ = ["__version__", "DiffBIRPipeline"]


def __getattr__(name):
    # Importing torch/diffusers takes seconds; keep `import restorecli` (and `restore --help`) fast.
    if name == "DiffBIRPipeline":
        from .pipeline.diffbir import DiffBIRPipeline

        return DiffBIRPipeline
    raise AttributeError(f"module 'restorecli' has no attribute {name!r}")
