"""Shared helpers for the wire tests: real origin processes, raw HTTP, misbehaving sources.

* `origin` — start `fabric origin` as a subprocess on a free loopback port, with a
  token file; wait for /livez; scrape /metrics; kill and restart it.
* `http` — a tiny blocking HTTP client (http.client) that never raises on 4xx/5xx,
  so tests can assert on status codes and JSON error bodies.
* `sources` — real aiohttp servers that speak the chunk-stream protocol and lie,
  stall, or answer "missing", for the sync engine's fault tests.
"""
