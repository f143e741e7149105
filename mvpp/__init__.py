"""mvpp: retrieval-augmented micro-video popularity prediction."""

__version__ = "0.1.0"
