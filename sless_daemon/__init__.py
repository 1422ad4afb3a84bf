"""sless daemon side: HTTP API, queue, workers, executor and outcome store."""

__version__ = "0.1.0"
