"""Built-in default model: a tiny Llama-style decoder matching the built-in 4096-token tokenizer.

Small enough for unit tests and a 2-core CPU demo (~0.8M parameters).
"""

from agentinfer_jax.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096,  # the built-in byte-level BPE tokenizer in agentinfer_jax/assets
        hidden_size=128,  # residual width
        intermediate_size=384,  # SwiGLU width (3x hidden)
        num_layers=2,  # decoder blocks
        num_heads=4,  # query heads
        num_kv_heads=2,  # GQA: two query heads per KV head
        head_dim=32,  # hidden_size / num_heads
        rms_norm_eps=1e-6,  # RMSNorm epsilon
        rope_theta=10000.0,  # RoPE base
        rope_scaling=None,  # plain RoPE
        tie_word_embeddings=True,  # LM head shares the embedding table
        attention_bias=False,  # no q/k/v bias
        attention_out_bias=False,  # no o_proj bias
        qk_norm=False,  # no per-head q/k RMSNorm
        max_position_embeddings=4096,  # longest supported context
        dtype="float32",  # activations
        param_dtype="float32",  # weights
        bos_token_id=1,  # <|bos|>
        eos_token_ids=(4, 2),  # <|im_end|> (chat turns) and <|eos|>
        model_type="llama",  # written back to config.json as a Llama model
    )
