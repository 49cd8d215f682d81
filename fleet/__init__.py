"""Fleet: serve large language models on a fleet of GPU nodes."""

__version__ = "0.1.0"
