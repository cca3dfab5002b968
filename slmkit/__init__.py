"""slmkit: small language models for one domain."""
__version__ = "0.1.0"
