"""synthmed: ControlNet on a frozen Stable Diffusion backbone for medical image augmentation."""

__version__ = "0.1.0"
