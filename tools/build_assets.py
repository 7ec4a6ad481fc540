"""Rebuilds agentinfer_jax/assets/ from ../shared/data: the bundled data sample and the tokenizer.

The project must run its default without ../shared, so a small sample of the shared data ships in
the package, with its licences and provenance. The built-in tokenizer is a byte-level BPE trained
on that sample, so token statistics on agent text (drafting, prefix reuse) look like a real model's.

Usage: python tools/build_assets.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ROOT / "agentinfer_jax" / "assets"
NUM_TRACES = 120  # multi-turn FireAct sessions kept in the sample
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

# ChatML template that also renders tools and tool-call history as Qwen2.5 does (<tools>, <tool_call>,
# <tool_response>), with no default system turn without tools; rendered with jinja2 by
# agentinfer_jax.tokenizer.
CHAT_TEMPLATE = (
    "{%- set DEFAULT_SYSTEM = 'You are a helpful assistant.' if tools else '' %}\n"
    "{%- set sys_first = messages and messages[0].role == 'system' %}\n"
    '{%- if tools %}\n'
    "{{- '<|im_start|>system\\n' }}\n"
    '{{- messages[0].content if sys_first else DEFAULT_SYSTEM }}\n'
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}\n"
    "{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}\n"
    '{%- for tool in tools %}\n'
    "{{- '\\n' + (tool | tojson) }}\n"
    '{%- endfor %}\n'
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '\n"
    '    \'<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": \'\n'
    "    '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}\n"
    '{%- elif sys_first %}\n'
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    '{%- elif DEFAULT_SYSTEM %}\n'
    "{{- '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}\n"
    '{%- endif %}\n'
    '{%- for m in messages %}\n'
    "{%- if m.role == 'system' and loop.first %}\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}\n"
    "{{- '<|im_start|>assistant' }}\n"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}\n"
    '{%- for call in m.tool_calls %}\n'
    '{%- set fn = call.function if call.function is defined else call %}\n'
    '{{- \'\\n<tool_call>\\n{"name": "\' + fn.name + \'", "arguments": \' }}\n'
    '{{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) }}\n'
    "{{- '}\\n</tool_call>' }}\n"
    '{%- endfor %}\n'
    "{{- '<|im_end|>\\n' }}\n"
    "{%- elif m.role == 'tool' %}\n"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}\n"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}\n"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
    '{%- else %}\n'
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\n"
    '{%- endif %}\n'
    '{%- endfor %}\n'
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)


def build_data(shared: pathlib.Path) -> list[str]:
    out = ASSETS / "data"
    out.mkdir(parents=True, exist_ok=True)
    traces = json.loads((shared / "data/traces/fireact/hotpotqa_dev_gpt-3.5-turbo-ft.json").read_text())
    # Keep the longest-running sessions first: they are the ones agents spend time in.
    kept = dict(sorted(traces.items(), key=lambda kv: (-len(kv[1]["traj"]), kv[0]))[:NUM_TRACES])
    (out / "fireact_hotpotqa_sample.json").write_text(json.dumps(kept, indent=1))
    shutil.copy(shared / "data/traces/fireact/LICENSE", out / "LICENSE-FireAct")

    corpus = json.loads((shared / "data/hotpotqa/train100_corpus.json").read_text())
    (out / "hotpotqa_corpus.json").write_text(json.dumps(corpus))
    questions = json.loads((shared / "data/hotpotqa/train100_with_paragraphs.json").read_text())
    slim = [{"id": q["_id"], "question": q["question"], "answer": q["answer"], "type": q["type"],
             "supporting_facts": q["supporting_facts"]} for q in questions]
    (out / "hotpotqa_questions.json").write_text(json.dumps(slim, indent=1))
    shutil.copy(shared / "data/hotpotqa/LICENSE-HippoRAG", out / "LICENSE-HippoRAG")

    texts = [m["content"] for r in kept.values() for m in r["traj"]]
    texts += [" ".join(sents) for sents in corpus.values()]
    texts += [q["question"] for q in slim]
    return texts


def build_tokenizer(texts: list[str]) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(ASSETS / "tokenizer.json"))
    config = {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
              "add_bos_token": False, "chat_template": CHAT_TEMPLATE, "model_max_length": 8192}
    (ASSETS / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = parser.parse_args()
    build_tokenizer(build_data(pathlib.Path(args.shared)))


if __name__ == "__main__":
    main()
