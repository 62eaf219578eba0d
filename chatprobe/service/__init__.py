"""The reference customer-service chat service (see app.py) and its runner."""
