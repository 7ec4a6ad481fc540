"""Model foundation: config, decoder, attention backends, checkpoints, sharding."""

from agentinfer_jax.model.attention import (AttentionBackend, ContiguousAttention,
                                            ContiguousMeta)
from agentinfer_jax.model.config import Llama3RopeScaling, ModelConfig
from agentinfer_jax.model.transformer import (Transformer, forward, generate, init_cache,
                                              init_model)

__all__ = [
    "AttentionBackend", "ContiguousAttention", "ContiguousMeta", "Llama3RopeScaling",
    "ModelConfig", "Transformer", "forward", "generate", "init_cache", "init_model",
]
