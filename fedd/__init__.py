"""fedd: real-time federated personalization for embedded Linux devices."""

__version__ = "0.1.0"
