"""mtvision: multi-task dense prediction (segmentation, depth, normals, detection) on one shared backbone."""

__version__ = "0.1.0"
