"""cifarlab: reproduce and extend a classic CIFAR-10 deep-learning study."""

__version__ = "0.1.0"


class CifarlabError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""
