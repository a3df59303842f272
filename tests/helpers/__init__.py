"""Helpers shared by the tests (fixtures stay in tests/conftest.py), one module per concern:

* `files` — random bytes and tensors, safetensors files (by the library or byte by
  byte), folder trees written, read and compared, TOML values for config files.
* `store` — publish into and pull from a local store through the library; a store's
  chunk files; compare-and-swap races.
* `cli` — the `fabric` command (`FABRIC`) and `run_cli`/`cli_json` with the test's environment.
* `ports` — free loopback ports.
* `origin` — start `fabric origin` as a subprocess on a free loopback port, with a
  token file; wait for /livez; scrape /metrics; kill and restart it; the CLI with a
  clean environment.
* `agent` — a real `fabric agent` process and its config file.
* `process` — the start/wait/stop shape the server processes share.
* `sockets` — ESTABLISHED connections to a loopback server, and which processes hold them (/proc).
* `http` — a tiny blocking HTTP client (http.client) that never raises on 4xx/5xx,
  so tests can assert on status codes and JSON error bodies.
* `sources` — real aiohttp servers that speak the chunk-stream protocol and lie,
  stall, or answer "missing", for the sync engine's fault tests.
* `s3` — a real SeaweedFS, the hook as a process or in-process server, a throttling proxy.
* `lying_origin` — an aiohttp server in front of a real origin that substitutes, replays,
  reorders and withholds signed statements, and signs with keys an attacker holds.
* `versions` — versions built chunk by chunk, an in-memory store, weights that take small steps.
* `kserve` — a real KServe ModelServer serving Fabric's KServe model; small MLP version folders
  and their expected answers computed with torch.
"""
