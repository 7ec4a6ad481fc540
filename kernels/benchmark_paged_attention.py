"""Benchmark ragged paged attention: decode and verification steps over a paged KV cache.

On a GPU it times our Pallas kernel, the pure-JAX reference under XLA and JAX's own
jax.experimental.pallas.ops.gpu.paged_attention (decode only), and reports microseconds, GB/s of
K/V bytes read and the fraction of the device-to-device copy bandwidth measured in the same run.
Without a GPU it says so and times the reference on small shapes.

  python -m agentinfer_jax.kernels.benchmark_paged_attention --json_out /tmp/pa.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from agentinfer_jax.kernels.pallas_gpu import pallas_gpu_ragged_paged_attention
from agentinfer_jax.kernels.reference import reference_ragged_paged_attention


def time_us(fn: Callable[[], jax.Array], iters: int, warmup: int = 3) -> float:
    """Median wall time of fn() in microseconds, each call synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def copy_bandwidth_gbs(iters: int, nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of an nbytes buffer."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0 + 0.0)  # one read, one write; not elided like a no-op
    us = time_us(lambda: copy(x), iters)
    return 2 * x.nbytes / us / 1e3


def make_case(batch: int, context: int, q_len: int, kv_heads: int, head_dim: int, group: int,
              page_size: int, dtype, seed: int = 0):
    """Every sequence has `context` cached tokens (its q_len new ones included) on shuffled pages."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // page_size)
    num_pages = 1 + batch * pages_per_seq
    key = jax.random.key(seed)
    k_pages = jax.random.normal(key, (kv_heads, num_pages, page_size, head_dim), dtype)
    v_pages = jax.random.normal(jax.random.fold_in(key, 1), k_pages.shape, dtype)
    table = (1 + rng.permutation(batch * pages_per_seq)).reshape(batch, pages_per_seq).astype(np.int32)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch * q_len, kv_heads * group, head_dim), dtype)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, kv_lens=jnp.full((batch,), context, jnp.int32),
                page_indices=jnp.asarray(table), cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32) * q_len,
                num_seqs=jnp.int32(batch))


def kv_bytes(case) -> int:
    kp = case["k_pages"]
    return int(np.sum(np.asarray(case["kv_lens"]))) * kp.shape[0] * kp.shape[3] * kp.dtype.itemsize * 2


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=_positive, default=64, help="sequences per step (default: %(default)s)")
    ap.add_argument("--context", type=_positive, default=4096,
                    help="KV tokens per sequence, new ones included (default: %(default)s)")
    ap.add_argument("--kv_heads", type=_positive, default=8, help="KV heads (default: %(default)s)")
    ap.add_argument("--head_dim", type=_positive, default=128, help="dimension per head (default: %(default)s)")
    ap.add_argument("--group", type=_positive, default=4, help="query heads per KV head (default: %(default)s)")
    ap.add_argument("--page_size", type=_positive, default=16, help="tokens per KV page (default: %(default)s)")
    ap.add_argument("--verify_len", type=_positive, default=8,
                    help="query tokens per sequence in the verification case (default: %(default)s)")
    ap.add_argument("--iters", type=_positive, default=20, help="timed calls per case (default: %(default)s)")
    ap.add_argument("--json_out", type=str, default="", help="write the rows here as JSON ('' = do not)")
    args = ap.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        print(f"No GPU (backend={jax.default_backend()}): timing the CPU reference on small shapes only.")
        args.batch, args.context, args.kv_heads, args.iters = 8, 512, 2, min(args.iters, 5)
    dtype = jnp.bfloat16
    copy_gbs = copy_bandwidth_gbs(args.iters, (1 << 30) if on_gpu else (1 << 26))
    rows = []
    for name, q_len in (("decode", 1), (f"verify q_len={args.verify_len}", args.verify_len)):
        case = make_case(args.batch, args.context, q_len, args.kv_heads, args.head_dim, args.group,
                         args.page_size, dtype)
        inputs = tuple(case.values())
        fns: dict[str, Callable[[], jax.Array]] = {
            "reference (XLA)": lambda: reference_ragged_paged_attention(*inputs)}
        if on_gpu:
            fns["pallas_gpu (ours)"] = lambda: pallas_gpu_ragged_paged_attention(*inputs)
            if q_len == 1:
                from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

                scaled_q = case["q"] * jnp.asarray(args.head_dim ** -0.5, dtype)  # it has no sm_scale
                pps = case["page_indices"].shape[1]
                k_splits = max(s for s in (1, 2, 4, 8, 16) if pps % s == 0)
                fns["jax gpu paged_attention"] = lambda: paged_attention(
                    scaled_q, case["k_pages"], case["v_pages"], case["page_indices"], case["kv_lens"],
                    k_splits=k_splits)
        nbytes = kv_bytes(case)
        for impl, fn in fns.items():
            us = time_us(fn, args.iters)
            gbs = nbytes / us / 1e3
            rows.append(dict(case=name, impl=impl, batch=args.batch, context=args.context, q_len=q_len,
                             us=us, kv_gbs=gbs, frac_of_copy_bw=gbs / copy_gbs))

    print(f"device: {jax.devices()[0].device_kind}; measured copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'case':<18}{'impl':<26}{'us':>10}{'GB/s':>10}{'of copy':>9}")
    for r in rows:
        print(f"{r['case']:<18}{r['impl']:<26}{r['us']:>10.1f}{r['kv_gbs']:>10.1f}{r['frac_of_copy_bw']:>9.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                           copy_gbs=copy_gbs, config=vars(args), rows=rows), f, indent=2)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
