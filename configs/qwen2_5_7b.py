"""Shapes of Qwen/Qwen2.5-7B(-Instruct) (config.json of the release)."""

from agentinfer_jax.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=152064,  # padded Qwen2 vocabulary
        hidden_size=3584,  # residual width
        intermediate_size=18944,  # SwiGLU width
        num_layers=28,  # decoder blocks
        num_heads=28,  # query heads
        num_kv_heads=4,  # GQA groups of 7
        head_dim=128,  # hidden_size / num_heads
        rms_norm_eps=1e-6,  # RMSNorm epsilon
        rope_theta=1000000.0,  # RoPE base
        rope_scaling=None,  # plain RoPE (YaRN is an opt-in deployment setting)
        tie_word_embeddings=False,  # separate LM head
        attention_bias=True,  # Qwen2 q/k/v bias
        attention_out_bias=False,  # no o_proj bias
        qk_norm=False,  # QK-norm is Qwen3 only
        max_position_embeddings=32768,  # context of the Instruct release
        dtype="bfloat16",  # activations
        param_dtype="bfloat16",  # weights as released
        bos_token_id=151643,  # <|endoftext|> (Qwen adds no BOS in practice)
        eos_token_ids=(151645, 151643),  # <|im_end|>, <|endoftext|>
        model_type="qwen2",  # HF model_type
    )
