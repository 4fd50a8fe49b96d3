"""normlightning: a PyTorch Lightning framework for training and studying normalization layers."""

__version__ = "0.1.0"
