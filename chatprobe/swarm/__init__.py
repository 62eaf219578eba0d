"""Peak-promotion swarms: fake customers as Locust users, promotion shapes, merged ledgers.

Pure parts: shapes.py (load curves), scripts.py (conversation scripts), collector.py (the
master-side ledger and time series). Edge: engine.py (the asyncio loop thread each Locust
process runs its chat connections on). The locustfile is loadtests/locustfile.py.
"""
