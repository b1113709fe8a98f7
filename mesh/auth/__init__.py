"""Authentication at every hop: JWT validation, on-behalf-of exchange, the embedded STS."""
