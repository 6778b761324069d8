"""mtvision: multi-task dense prediction (segmentation, depth, normals, detection) on one shared backbone."""

__version__ = "0.1.0"

__all__ = ["Predictor"]


def __getattr__(name):
    # mtvision.Predictor without importing torch and the models on `import mtvision`
    if name == "Predictor":
        from .inference import Predictor

        return Predictor
    raise AttributeError(f"module 'mtvision' has no attribute {name!r}")
