"""chatprobe: proves customer-service chat delivers (stamps, ledger, probes, load, reports).

The top-level modules are the pure core (no I/O): stamp, ledger, histogram, diagnosis,
verdict. Sockets, clocks and files live in protocols/, service/, probe.py and cli.py.
"""

__version__ = "0.1.0"
