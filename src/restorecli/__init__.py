"""restorecli: DiffBIR photo restoration as a command-line tool and a diffusers pipeline."""

__version__ = "0.1.0"

__all__ = ["__version__", "DiffBIRPipeline", "FacePipeline", "load_pipeline"]


def __getattr__(name):
    # Importing torch/diffusers takes seconds; keep `import restorecli` (and `restore --help`) fast.
    if name == "DiffBIRPipeline":
        from .pipeline.diffbir import DiffBIRPipeline

        return DiffBIRPipeline
    if name == "FacePipeline":
        from .faces.pipeline import FacePipeline

        return FacePipeline
    if name == "load_pipeline":
        from .pipeline.build import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'restorecli' has no attribute {name!r}")
