"""Tiny models, pictures and a real webui for the tests and the tools alike (no test lives here)."""
