"""cifarlab: reproduce and extend a classic CIFAR-10 deep-learning study."""

__version__ = "0.1.0"


def counted(n: int, noun: str, fmt: str = "", plural: str | None = None) -> str:
    """'1 step', '2 steps' (fmt "," gives '15,000 steps'; `plural` for 'entries'): messages count
    things of one and of many."""
    if n == 1:
        return f"{n:{fmt}} {noun}"
    return f"{n:{fmt}} {plural or noun + ('es' if noun.endswith(('s', 'sh', 'ch')) else 's')}"


class CifarlabError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""
