"""Service discovery: how lite mode (and the gateway's fallback) finds inference instances."""
