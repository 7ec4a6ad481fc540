"""`agentinfer-serve`: the OpenAI-compatible server from the command line.

  agentinfer-serve --config tiny --port 8000
  agentinfer-serve --checkpoint /models/Llama-3.2-1B-Instruct --max-model-len 8192 --drafter sam
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from agentinfer_jax.serving.builder import DRAFTERS, ServerConfig, build_stack
from agentinfer_jax.serving.policies import POLICY_NAMES
from agentinfer_jax.serving.server import ServerLimits, serve


def _mesh_shape(text: str) -> tuple[int, int]:
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh takes DATA,MODEL (e.g. 1,4), got {text!r}") from None
    if data < 1 or model < 1:
        raise argparse.ArgumentTypeError(f"--mesh sizes must be >= 1, got {text!r}")
    return data, model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agentinfer-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="HF safetensors checkpoint directory (config.json, *.safetensors)")
    model.add_argument("--config", help="configs/<name>.py with random weights (default: tiny)")
    p.add_argument("--tokenizer", help="tokenizer dir or tokenizer.json, or 'builtin' for the bundled one "
                   "(default: the checkpoint's tokenizer.json, required; --config: built-in)")
    p.add_argument("--model-name", help="model id served in /v1/models")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", help="activation dtype override, e.g. float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed (--config)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV pages")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-tokens-per-step", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--drafter", choices=DRAFTERS, default="none")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="draft length k at most")
    p.add_argument("--no-adaptive-draft", action="store_true",
                   help="always draft k tokens (default: k per request from measured step cost and acceptance)")
    p.add_argument("--mesh", type=_mesh_shape, metavar="DATA,MODEL",
                   help="shard the engine over DATA x MODEL devices (KV heads and weights on MODEL)")
    p.add_argument("--no-overlap", action="store_true",
                   help="wait for each step before planning the next (default: plan step n+1 while n runs)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="fcfs")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--retention-ttl", type=float, default=0.0, help="session KV retention seconds (0 = off)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens accepted (default: max-model-len)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        checkpoint=args.checkpoint, config=None if args.checkpoint else (args.config or "tiny"),
        tokenizer=args.tokenizer, model_name=args.model_name, seed=args.seed, dtype=args.dtype,
        num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_tokens_per_step=args.max_tokens_per_step, max_model_len=args.max_model_len, drafter=args.drafter,
        num_draft_tokens=args.num_draft_tokens, policy=args.policy, prefix_cache=not args.no_prefix_cache,
        retention_ttl_s=args.retention_ttl, adaptive_draft=not args.no_adaptive_draft, mesh_shape=args.mesh,
        overlap=not args.no_overlap)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        stack = build_stack(config_from_args(args))
        limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit)
    except (ValueError, FileNotFoundError) as e:
        print(f"agentinfer-serve: {e}", file=sys.stderr)
        return 2
    serve(stack, args.host, args.port, limits, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
