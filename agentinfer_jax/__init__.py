"""agentinfer-jax: serving LLM agents on JAX."""

__version__ = "0.1.0"
