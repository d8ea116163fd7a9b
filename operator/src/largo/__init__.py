"""largo: a Kubernetes operator for large-model training and serving on GPU clusters."""

__version__ = "0.1.0"
