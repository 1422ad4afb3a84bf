"""sless command-line client: submit functions, follow them, run the daemon and workers."""

from sless_daemon import __version__

__all__ = ["__version__"]
