"""gatepeer: a SORACOM Gate customer gate peer, kept converged."""

__version__ = "0.1.0"
