"""The model `make demo` serves on CPU: the tiny decoder made wide enough (~7.9M parameters, 30 MB
in float32) that a decode step is bound by streaming its weights, as serving a real model on an
accelerator is, rather than by compute, as the 0.8M-parameter tiny model is on a CPU.

Measured on the 2-core CPU box (engine_throughput, context 512, batch 1): verifying 4 drafts costs
1.37x a decode step and 8 drafts 1.83x (tiny: 2.22x and 3.29x). Drafting pays only in the first
regime, so the demo's wall clock shows what the techniques do where they are meant to run.
"""

from agentinfer_jax.configs.tiny import get_config as tiny_config
from agentinfer_jax.model.config import ModelConfig


def get_config() -> ModelConfig:
    return tiny_config().replace(
        hidden_size=384,  # residual width (tiny: 128)
        intermediate_size=1024,  # SwiGLU width
        num_layers=4,  # decoder blocks
        num_heads=6,  # query heads
        num_kv_heads=2,  # GQA: three query heads per KV head
        head_dim=64,  # hidden_size / num_heads
    )
