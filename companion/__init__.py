"""companion: an AI-companion chat service."""

__version__ = "0.1.0"
