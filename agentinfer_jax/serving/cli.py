"""`agentinfer-serve`: the OpenAI-compatible server from the command line.

  agentinfer-serve --config tiny --port 8000
  agentinfer-serve --checkpoint /models/Llama-3.2-1B-Instruct --max-model-len 8192 --drafter sam

One model over several hosts (the same command on each, process 0 serves HTTP; the mesh spans the
devices of every process, by default 1 x all of them):
  agentinfer-serve --config tiny --coordinator-address host0:9876 --num-processes 2 --process-id 0
  agentinfer-serve --config tiny --coordinator-address host0:9876 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from agentinfer_jax.engine.engine import DEFAULT_CACHE_DIR
from agentinfer_jax.serving import distributed
from agentinfer_jax.serving.argtypes import int_in_range, seconds
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


_PORT = int_in_range(0, 65535)
_POSITIVE = int_in_range(1)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agentinfer-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="HF safetensors checkpoint directory (config.json, *.safetensors)")
    model.add_argument("--config", help="configs/<name>.py with random weights (default: tiny)")
    p.add_argument("--tokenizer", help="tokenizer dir or tokenizer.json, or 'builtin' for the bundled one "
                   "(default: the checkpoint's tokenizer.json, required; --config: built-in)")
    p.add_argument("--model-name",
                   help="model id served in /v1/models (default: the checkpoint folder's or config's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=_PORT, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--dtype", help="activation dtype override, e.g. float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed (--config; default: %(default)s)")
    p.add_argument("--num-blocks", type=int_in_range(2), default=512,
                   help="KV pages in the pool, page 0 reserved (default: %(default)s)")
    p.add_argument("--block-size", type=_POSITIVE, default=16, help="tokens per KV page (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=_POSITIVE, default=16,
                   help="requests running at once, at most (default: %(default)s)")
    p.add_argument("--max-tokens-per-step", type=_POSITIVE, default=256,
                   help="token budget of one engine step: prefill chunks, decode and draft tokens "
                        "(default: %(default)s)")
    p.add_argument("--max-model-len", type=_POSITIVE, default=2048,
                   help="context length in tokens, prompt plus output (default: %(default)s)")
    p.add_argument("--drafter", choices=DRAFTERS, default="none",
                   help="draft tokens for speculative decoding: ngram = prompt lookup, sam = AgentSAM "
                        "(default: %(default)s)")
    p.add_argument("--num-draft-tokens", type=_POSITIVE, default=4,
                   help="draft length k at most, in tokens (default: %(default)s)")
    p.add_argument("--no-adaptive-draft", action="store_true",
                   help="always draft k tokens (default: k per request from measured step cost and acceptance)")
    p.add_argument("--mesh", type=_mesh_shape, metavar="DATA,MODEL",
                   help="shard the engine over DATA x MODEL devices (KV heads and weights on MODEL)")
    p.add_argument("--no-warmup", action="store_true",
                   help="serve at once (default: compile every step shape and time the adaptive switch's "
                        "step costs first, so no request waits on a compilation)")
    p.add_argument("--compilation-cache-dir", default=DEFAULT_CACHE_DIR,
                   help="JAX's persistent compilation cache, so a restart loads compiled steps ('' = off)")
    p.add_argument("--no-overlap", action="store_true",
                   help="wait for each step before planning the next (default: plan step n+1 while n runs)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="fcfs",
                   help="admission order of waiting requests (default: %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse cached KV blocks of earlier prompts (default: reuse them)")
    p.add_argument("--no-share-inflight-prefill", action="store_true",
                   help="admit a request at once even while a running request is prefilling its prompt's "
                   "next blocks (default: wait for them to be cached)")
    p.add_argument("--no-speculation-first", action="store_true",
                   help="admit requests marked speculative in policy order (default: before the others of "
                        "their priority, SPAgent's rule for its short action guesses)")
    p.add_argument("--retention-ttl", type=seconds, default=0.0,
                   help="seconds a finished session call's KV stays held for its next call (0 = off; default: 0)")
    p.add_argument("--max-body-bytes", type=_POSITIVE, default=1 << 20,
                   help="largest request body in bytes; larger ones are refused (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=_POSITIVE, help="largest max_tokens accepted (default: max-model-len)")
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                   help="log level of the server and uvicorn (default: %(default)s)")
    multi = p.add_argument_group("one model over several processes (jax.distributed)")
    multi.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address for jax.distributed (same on every process)")
    multi.add_argument("--num-processes", type=_POSITIVE, default=1,
                       help="processes (hosts) running the model (default: %(default)s)")
    multi.add_argument("--process-id", type=int_in_range(0), default=0,
                       help="this process's index; 0 serves HTTP (default: %(default)s)")
    multi.add_argument("--step-port", type=int_in_range(1, 65535),
                       help="port on the coordinator's host where process 0 sends steps to the others "
                       "(default: coordinator port + 1)")
    args = p.parse_args(argv)
    if args.num_processes > 1 and not args.coordinator_address:
        p.error("--num-processes > 1 needs --coordinator-address")
    if args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    return args


def distributed_from_args(args: argparse.Namespace) -> distributed.DistributedConfig | None:
    """The multi-process setting of `args`, or None for one process."""
    if args.num_processes <= 1:
        return None
    return distributed.DistributedConfig(args.coordinator_address, args.num_processes, args.process_id,
                                         step_port=args.step_port)


def _global_mesh(mesh: tuple[int, int] | None) -> tuple[int, int]:
    """The mesh over every process's devices: --mesh must cover them all (a process without a device
    in the mesh could not take part in the step); by default 1 x all of them."""
    import jax

    total = jax.device_count()
    if mesh is None:
        return 1, total
    if mesh[0] * mesh[1] != total:
        raise ValueError(f"--mesh {mesh[0]},{mesh[1]} must cover all {total} devices of the "
                         f"{jax.process_count()} processes")
    return mesh


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        checkpoint=args.checkpoint, config=None if args.checkpoint else (args.config or "tiny"),
        tokenizer=args.tokenizer, model_name=args.model_name, seed=args.seed, dtype=args.dtype,
        num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_tokens_per_step=args.max_tokens_per_step, max_model_len=args.max_model_len, drafter=args.drafter,
        num_draft_tokens=args.num_draft_tokens, policy=args.policy, prefix_cache=not args.no_prefix_cache,
        share_inflight_prefill=not args.no_share_inflight_prefill, speculation_first=not args.no_speculation_first,
        retention_ttl_s=args.retention_ttl, adaptive_draft=not args.no_adaptive_draft, mesh_shape=args.mesh,
        overlap=not args.no_overlap, compile_at_start=not args.no_warmup, measure_step_costs=not args.no_warmup,
        compilation_cache_dir=args.compilation_cache_dir or None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        multi = distributed_from_args(args)
        config = config_from_args(args)
        if multi is not None:
            distributed.initialize(multi)  # before anything touches a device
            config = dataclasses.replace(config, mesh_shape=_global_mesh(config.mesh_shape))
        stack = build_stack(config)
        limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit)
    except (ValueError, FileNotFoundError) as e:
        print(f"agentinfer-serve: {e}", file=sys.stderr)
        return 2
    if multi is not None and not multi.is_leader:
        steps = distributed.follow(stack.engine, distributed.StepChannel.connect(multi))
        logging.info("agentinfer-serve: process %d ran %d steps; the leader is gone", multi.process_id, steps)
        distributed.shutdown()
        stack.shutdown()
        return 0
    if multi is None:
        serve(stack, args.host, args.port, limits, log_level=args.log_level)
        return 0
    channel = distributed.StepChannel.listen(multi)  # the leader: every step goes to the followers first
    stack.loop.executor = distributed.LockstepExecutor(stack.engine, channel)
    # uvicorn re-raises the signal that stopped it once it is done; with the default handlers that
    # would end this process before it lets the followers go, and they would abort.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        serve(stack, args.host, args.port, limits, log_level=args.log_level)
    finally:
        channel.close()  # the followers leave their loop and meet us in the shutdown barrier
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
