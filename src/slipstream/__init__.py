"""Slipstream: asynchronous, disaggregated RL post-training for LLMs over a gRPC service mesh."""

__version__ = "0.1.0"
