"""Built-in behaviour, registered as plugins through the public hooks (see plugins.py)."""
