"""iresflow: invertible residual networks and residual flows, on PyTorch Lightning."""

__version__ = "0.1.0"
