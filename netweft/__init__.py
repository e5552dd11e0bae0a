"""netweft: a multi-host container network engine."""
__version__ = "0.1.0"
