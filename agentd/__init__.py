"""agentd: the in-container daemon of ZeroLagHub."""

__version__ = "0.1.0"
