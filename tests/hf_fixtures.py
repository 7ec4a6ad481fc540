"""Tiny Hugging Face checkpoints written by transformers itself, for parity and loading tests.

Every parameter is re-drawn from a seeded generator (HF's own init zeroes biases and sets norms to
one, which would hide bias/norm mapping bugs).
"""

from __future__ import annotations

import pathlib

FAMILIES = ("llama3", "qwen2", "qwen3")
VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def hf_config(family: str, *, tie: bool):
    """A tiny transformers config of `family` (hidden 64, 2 layers, GQA 4/2)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, pad_token_id=PAD_ID,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "llama3":
        return transformers.LlamaConfig(
            **common, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=32))
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=dict(rope_type="default",
                                                                       rope_theta=1e6))
    if family == "qwen3":
        # head_dim 32 != hidden / heads, as in real Qwen3 configs.
        return transformers.Qwen3Config(**common, head_dim=32,
                                        rope_parameters=dict(rope_type="default",
                                                             rope_theta=1e6))
    raise ValueError(f"unknown family {family!r}")


def make_hf_model(family: str, *, tie: bool, seed: int):
    """A float32 transformers CausalLM with every parameter randomised from `seed`."""
    import torch
    import transformers

    config = hf_config(family, tie=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def write_hf_checkpoint(family: str, directory: pathlib.Path, *, tie: bool, seed: int,
                        max_shard_size: str | None = None):
    """Saves a randomised tiny model with `save_pretrained`; returns the torch model."""
    model = make_hf_model(family, tie=tie, seed=seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


# ---- chat templates with tools ------------------------------------------------------------------
# Written for these tests to render what the Qwen2.5 and Llama 3.1 Instruct templates render for
# tools and tool-call history (same markers, same JSON layout, same grouping of tool results), so
# the parity test against transformers' apply_chat_template exercises what real templates do.

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN25_STYLE_TEMPLATE = r"""
{%- set sys_first = messages and messages[0].role == 'system' %}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{{- messages[0].content if sys_first else DEFAULT_SYSTEM }}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}
{{- '\n' + (tool | tojson) }}
{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif sys_first %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- elif DEFAULT_SYSTEM %}
{{- '<|im_start|>system\n' + DEFAULT_SYSTEM + '<|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'assistant' and m.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- if m.content %}{{- '\n' + m.content }}{%- endif %}
{%- for call in m.tool_calls %}
{%- set fn = call.function if call.function is defined else call %}
{{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
{{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif m.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


def qwen25_style_template(default_system: str | None = QWEN_DEFAULT_SYSTEM) -> str:
    """The Qwen2.5-style template; `default_system=None` writes no system turn unless one is given."""
    value = "''" if default_system is None else repr(default_system)
    return "{%- set DEFAULT_SYSTEM = " + value + " %}" + QWEN25_STYLE_TEMPLATE


LLAMA31_STYLE_TEMPLATE = r"""
{{- bos_token }}
{%- set tools = custom_tools if custom_tools is defined else (tools if tools is defined else none) %}
{%- set tools_in_user = tools_in_user_message if tools_in_user_message is defined else true %}
{%- set today = date_string if date_string is defined else '26 Jul 2024' %}
{%- if messages[0].role == 'system' %}
{%- set system_text = messages[0].content | trim %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system_text = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + today + '\n\n' }}
{%- if tools is not none and not tools_in_user %}
{{- 'You have access to the following functions. To call a function, please respond with JSON for a function call.'
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    'Do not use variables.\n\n' }}
{%- for t in tools %}{{- (t | tojson(indent=4)) + '\n\n' }}{%- endfor %}
{%- endif %}
{{- system_text + '<|eot_id|>' }}
{%- if tools is not none and tools_in_user %}
{%- if not messages %}{{- raise_exception('tools go into the first user message, and there is none') }}{%- endif %}
{%- set first_user = messages[0].content | trim %}
{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments '
    'that best answers the given prompt.\n\n'
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    'Do not use variables.\n\n' }}
{%- for t in tools %}{{- (t | tojson(indent=4)) + '\n\n' }}{%- endfor %}
{{- first_user + '<|eot_id|>' }}
{%- endif %}
{%- for m in messages %}
{%- if 'tool_calls' in m %}
{%- if m.tool_calls | length != 1 %}{{- raise_exception('only one tool call per message is supported') }}{%- endif %}
{%- set fn = m.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + fn.name + '", "parameters": ' }}
{{- (fn.arguments | tojson) + '}<|eot_id|>' }}
{%- elif m.role == 'tool' or m.role == 'ipython' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
{{- (m.content | tojson) if (m.content is mapping or m.content is iterable) else m.content }}
{{- '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + (m.content | trim) + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""


def write_tokenizer_dir(directory: pathlib.Path, chat_template: str, **config) -> pathlib.Path:
    """The built-in tokenizer.json beside a tokenizer_config.json holding `chat_template`."""
    import json
    import shutil

    from agentinfer_jax.tokenizer import ASSETS_DIR

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS_DIR / "tokenizer.json", directory / "tokenizer.json")
    base = json.loads((ASSETS_DIR / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**base, **config, "chat_template": chat_template}))
    return directory
