"""tactful: real-time offer decisioning that puts what customers said above what was inferred."""

__version__ = "0.1.0"
