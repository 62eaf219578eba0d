"""Chat protocol adapters: the interface (base.py) and its implementations."""
