"""Inference servers the site agent drives: vLLM, SGLang, Triton/KServe (docs/serving.md).

`build_adapter(cfg)` makes the adapter of a `[[servers]]` block by its kind; the adapters
follow `agents.serving.base.ServerAdapter`. `agents.site.servers` drives them as members of the
site's rollout. Nothing here imports torch or vLLM (`vllm_extension` runs inside vLLM).
"""

from __future__ import annotations

from agents.serving.base import HealthCheck, LoadRecord, ServerAdapter, ServerConfig, Timeouts, parse_servers

__all__ = ["build_adapter", "HealthCheck", "LoadRecord", "ServerAdapter", "ServerConfig", "Timeouts",
           "parse_servers"]


def build_adapter(cfg: ServerConfig) -> ServerAdapter:
    if cfg.kind == "vllm":
        from agents.serving.vllm import VllmAdapter
        return VllmAdapter(cfg)
    if cfg.kind == "sglang":
        from agents.serving.sglang import SglangAdapter
        return SglangAdapter(cfg)
    if cfg.kind in ("kserve", "triton"):
        from agents.serving.kserve import KserveAdapter  # helper E2's v2 repository adapter
        return KserveAdapter(cfg)
    raise ValueError(f"no adapter for server kind {cfg.kind!r}")
