"""djinnd: the Djinn daemon."""
__version__ = "0.1.0"
