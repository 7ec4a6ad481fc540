"""Paged-KV memory: the functional block allocator (jit or numpy) and the radix prefix cache."""

from agentinfer_jax.cache import block_allocator
from agentinfer_jax.cache.block_allocator import AllocatorState, BlockPool
from agentinfer_jax.cache.prefix_cache import PrefixCache, PrefixCacheStats

__all__ = ["block_allocator", "AllocatorState", "BlockPool", "PrefixCache", "PrefixCacheStats"]
