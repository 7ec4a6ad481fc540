"""Shapes of meta-llama/Llama-3.1-8B(-Instruct) (config.json of the release)."""

from agentinfer_jax.model.config import Llama3RopeScaling, ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=128256,  # Llama 3 tiktoken-based vocabulary
        hidden_size=4096,  # residual width
        intermediate_size=14336,  # SwiGLU width
        num_layers=32,  # decoder blocks
        num_heads=32,  # query heads
        num_kv_heads=8,  # GQA groups of 4
        head_dim=128,  # hidden_size / num_heads
        rms_norm_eps=1e-5,  # RMSNorm epsilon
        rope_theta=500000.0,  # RoPE base
        rope_scaling=Llama3RopeScaling(  # llama3 long-context rescaling
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192),
        tie_word_embeddings=False,  # separate LM head
        attention_bias=False,  # no q/k/v bias
        attention_out_bias=False,  # no o_proj bias
        qk_norm=False,  # no QK-norm
        max_position_embeddings=131072,  # 128K context
        dtype="bfloat16",  # activations
        param_dtype="bfloat16",  # weights as released
        bos_token_id=128000,  # <|begin_of_text|>
        eos_token_ids=(128001, 128008, 128009),  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
        model_type="llama",  # HF model_type
    )
