"""Builds the whole serving stack (model, tokenizer, engine, KV pool, prefix cache, policy, drafter,
scheduler, loop) from one small `ServerConfig`: the one wiring of every consumer (the server and its
CLI, each in-process AgentCollab role via agents.engine_client, the experiments, and the JetStream
adapter through `build_jetstream_engine`). Callers that already hold a model or a tokenizer (several
roles sharing one tokenizer, a pre-filled AgentSAM memory) pass them in instead of re-loading.

Invariants of a built `ServingStack`:
- every token id the tokenizer can produce is a valid model id (tokenizer vocab <= model vocab);
- the scheduler, engine and pool agree on block size, pool size and sequence limits;
- the loop's detokenizer never raises on model output (ids the tokenizer lacks are dropped), so a
  model with a larger vocabulary than its tokenizer (random-weight GPU runs) cannot kill the loop.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pathlib
import re
import time
from collections.abc import Sequence

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.engine.slots import SlotEngine
from agentinfer_jax.engine.structured import GrammarCompiler
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.sharding import make_mesh
from agentinfer_jax.model.transformer import Transformer, init_model
from agentinfer_jax.serving.loop import ServingLoop
from agentinfer_jax.serving.metrics import ServingMetrics
from agentinfer_jax.serving.policies import make_policy
from agentinfer_jax.serving.scheduler import Scheduler, SessionRetention
from agentinfer_jax.speculation import PromptLookupDrafter, SAMDrafter, SessionMemory
from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, MeasuredStepCost
from agentinfer_jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "ServingStack", "build_stack", "build_engine", "build_slot_engine", "build_jetstream_engine",
           "load_model_config", "SafeDetokenizer", "DRAFTERS", "BUILTIN_TOKENIZER"]

BUILTIN_TOKENIZER = "builtin"  # ServerConfig.tokenizer / --tokenizer naming the bundled tokenizer
DRAFTERS = ("none", "ngram", "sam")  # by name (CLI); "custom" = a Drafter object given to build_stack
_CONFIG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What to serve and with which capacity. Exactly one of `checkpoint` / `config` names the model."""

    checkpoint: str | None = None  # HF safetensors dir (config.json + *.safetensors [+ tokenizer.json])
    config: str | None = "tiny"  # configs/<name>.py with random weights (used when checkpoint is None)
    tokenizer: str | None = None  # dir/file, or "builtin"; None = the checkpoint's (required), else the built-in one
    model_name: str | None = None  # id in /v1/models; default: checkpoint dir name or config name
    seed: int = 0  # random-weight init seed
    dtype: str | None = None  # activation dtype override (e.g. "float32" on CPU)
    num_blocks: int = 512  # KV pages (page 0 is the null page)
    block_size: int = 16  # tokens per page
    max_num_seqs: int = 16  # sequences per step
    max_tokens_per_step: int = 256  # token budget per step
    max_model_len: int = 2048  # prompt + output tokens per request
    min_token_bucket: int = 1  # smallest padded step size (padding rows cost; larger = fewer compilations)
    drafter: str = "none"  # "none", "ngram" (prompt lookup) or "sam" (AgentSAM with cross-session memory)
    num_draft_tokens: int = 4  # k at most, when a drafter is on
    adaptive_draft: bool = True  # per-request k from measured step costs and acceptance (0 = off)
    policy: str = "fcfs"  # admission policy (fcfs, sjf, lpm, agentsched)
    prefix_cache: bool = True
    # A waiting request whose next prompt blocks a running request is prefilling waits for them to be
    # cached instead of computing them again (SchedulerConfig.share_inflight_prefill).
    share_inflight_prefill: bool = True
    retention_ttl_s: float = 0.0  # keep a finished session's blocks this long (0 = off)
    # SPAgent's rule between requests: a speculative request (a short action guess whose tool runs
    # beside the reasoning call) is admitted before non-speculative ones of the same priority.
    speculation_first: bool = True
    attention_backend: str | None = None  # kernels backend; None = platform default
    max_draft_tokens: int | None = None  # the engine's verify width K; None = num_draft (at least 1)
    seq_buckets: tuple[int, ...] = ()  # extra padded sequence counts (EngineConfig.seq_buckets)
    kv_dtype: str | None = None  # KV pool dtype; None = the model's activation dtype
    interpret: bool = False  # Pallas interpret mode (CPU tests of the GPU kernel)
    mesh_shape: tuple[int, int] | None = None  # (data, model) devices to shard the engine over; None = one
    overlap: bool = True  # plan and dispatch step n+1 while step n runs (host/device overlap)
    # Before serving: compile every step shape, so no request waits on a compilation (the CLI's
    # default; in-process stacks of one model share compilations, so one warm-up serves them all).
    compile_at_start: bool = False
    # Before serving, with the adaptive switch: time a step of each (batch, tokens) cell it prices,
    # so its first choices are priced, not explored (the CLI's default). Served steps outvote these.
    measure_step_costs: bool = False
    # JAX's persistent compilation cache folder, so a restart loads the warm-up's compiled steps
    # (the CLI's default: ~/.cache/agentinfer_jax/xla); None: $AGENTINFER_JAX_CACHE_DIR if set, else off.
    compilation_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.config is None):
            raise ValueError("give exactly one of checkpoint (a directory) or config (a configs/ name)")
        if self.drafter not in (*DRAFTERS, "custom"):
            raise ValueError(f"unknown drafter {self.drafter!r}; choose one of {', '.join(DRAFTERS)}")
        if self.drafter != "none" and self.num_draft_tokens <= 0:
            raise ValueError(f"num_draft_tokens must be positive with a drafter, got {self.num_draft_tokens}")
        if self.retention_ttl_s < 0:
            raise ValueError(f"retention_ttl_s must be >= 0, got {self.retention_ttl_s}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def num_draft(self) -> int:
        """k the scheduler drafts per decode step (0 without a drafter)."""
        return 0 if self.drafter == "none" else self.num_draft_tokens

    def engine_config(self) -> EngineConfig:
        k = self.max_draft_tokens if self.max_draft_tokens is not None else max(1, self.num_draft)
        return EngineConfig(num_blocks=self.num_blocks, block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                            max_tokens_per_step=self.max_tokens_per_step, max_model_len=self.max_model_len,
                            max_draft_tokens=k, min_token_bucket=self.min_token_bucket,
                            seq_buckets=tuple(self.seq_buckets), attention_backend=self.attention_backend,
                            interpret=self.interpret, kv_dtype=self.kv_dtype,
                            compilation_cache_dir=self.compilation_cache_dir)

    @classmethod
    def from_engine_config(cls, engine: EngineConfig, **fields) -> ServerConfig:
        """A config whose `engine_config()` is `engine`; `fields` set the rest (drafter, policy, ...)."""
        return cls(num_blocks=engine.num_blocks, block_size=engine.block_size, max_num_seqs=engine.max_num_seqs,
                   max_tokens_per_step=engine.max_tokens_per_step, max_model_len=engine.max_model_len,
                   max_draft_tokens=engine.max_draft_tokens, min_token_bucket=engine.min_token_bucket,
                   seq_buckets=tuple(engine.seq_buckets), attention_backend=engine.attention_backend,
                   interpret=engine.interpret, kv_dtype=engine.kv_dtype,
                   compilation_cache_dir=engine.compilation_cache_dir, **fields)


@dataclasses.dataclass
class ServingStack:
    """Everything a server needs; `loop` is not started (call `start()` or drive `loop.step()`)."""

    config: ServerConfig
    model_name: str
    model_config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    engine: Engine
    pool: BlockPool
    prefix_cache: PrefixCache | None
    scheduler: Scheduler
    loop: ServingLoop
    session_memory: SessionMemory | None = None  # AgentSAM's cross-session memory (drafter "sam")

    def start(self) -> None:
        self.loop.start()

    def summary(self) -> str:
        """One line for the start-up log: model, dtypes, KV pages, limits, policy, drafter."""
        c, m = self.config, self.model_config
        usable = c.num_blocks - 1
        if c.drafter == "none":
            drafter = "none"
        else:
            drafter = f"{c.drafter} (k<={c.num_draft_tokens}, {'adaptive' if self.scheduler.adaptive else 'fixed'})"
        return (f"model {self.model_name} ({c.checkpoint or 'configs/' + str(c.config)}), "
                f"dtype {m.dtype} (weights {m.param_dtype}, KV {c.kv_dtype or m.dtype}), "
                f"KV pages {usable} x {c.block_size} tokens ({usable * c.block_size} tokens), "
                f"max_model_len {c.max_model_len}, max_num_seqs {c.max_num_seqs}, policy {c.policy}, "
                f"drafter {drafter}, prefix cache {'on' if self.prefix_cache is not None else 'off'}, "
                f"mesh {c.mesh_shape or 'none'}")

    def shutdown(self) -> None:
        self.loop.shutdown()
        if self.session_memory is not None:
            self.session_memory.close()

    def detokenize(self, ids: Sequence[int]) -> str:
        return SafeDetokenizer(self.tokenizer)(ids)


class SafeDetokenizer:
    """Decodes output ids for the loop's stop-string check and streaming; never raises on ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    def __call__(self, ids: Sequence[int]) -> str:
        known = [int(t) for t in ids if 0 <= int(t) < self.vocab_size]
        return self.tokenizer.decode(known, skip_special_tokens=True)


def load_model_config(name: str) -> ModelConfig:
    """`configs/<name>.py`'s `get_config()`; ValueError naming the problem for unknown names."""
    if not _CONFIG_NAME.match(name):
        raise ValueError(f"bad config name {name!r}: use a module name from configs/ such as 'tiny'")
    try:
        module = importlib.import_module(f"agentinfer_jax.configs.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"unknown model config {name!r} (no configs/{name}.py)") from e
    return module.get_config()


def is_model_config(name: str) -> bool:
    """Whether `load_model_config(name)` finds a config (for flag validators)."""
    try:
        load_model_config(name)
    except ValueError:
        return False
    return True


def _model_config(config: ServerConfig) -> ModelConfig:
    """The model's shapes, read cheaply (no weights) so bad configs fail before any loading."""
    if config.checkpoint is None:
        model_config = load_model_config(config.config)
        return model_config if config.dtype is None else model_config.replace(dtype=config.dtype,
                                                                              param_dtype=config.dtype)
    if not os.path.isdir(config.checkpoint):
        raise ValueError(f"checkpoint directory {config.checkpoint} does not exist")
    return ModelConfig.from_hf(config.checkpoint, dtype=config.dtype)


def _load_model(config: ServerConfig, model_config: ModelConfig) -> tuple[Transformer, str]:
    if config.checkpoint is not None:
        from agentinfer_jax.model.checkpoint import load_hf_checkpoint  # heavy; only when serving a checkpoint
        _, model = load_hf_checkpoint(config.checkpoint, dtype=config.dtype)
        return model, pathlib.Path(config.checkpoint).resolve().name
    return init_model(model_config, seed=config.seed), config.config


def _tokenizer_path(config: ServerConfig) -> str | None:
    """The tokenizer `config` names: None for the built-in one (asked for as "builtin", or the
    default of a `config` model), a path given, else the checkpoint's tokenizer.json. A checkpoint
    without one is an error: silently tokenizing with the built-in vocabulary serves garbage."""
    if config.tokenizer == BUILTIN_TOKENIZER:
        return None
    if config.tokenizer is not None:
        return config.tokenizer
    if config.checkpoint is None:
        return None
    if not os.path.isfile(os.path.join(config.checkpoint, "tokenizer.json")):
        raise ValueError(f"checkpoint {config.checkpoint} has no tokenizer.json: give a tokenizer path, or "
                         f"tokenizer={BUILTIN_TOKENIZER!r} (--tokenizer {BUILTIN_TOKENIZER}) for the built-in one")
    return config.checkpoint


def _grammar_compiler(tokenizer: Tokenizer, vocab_size: int, eos: tuple[int, ...]):
    """Structured outputs' grammar compiler over the tokenizer; None (such requests get a 400)
    when the tokenizer cannot be read by llguidance or no EOS ends a grammar."""
    try:
        return GrammarCompiler.from_tokenizer(tokenizer, vocab_size, eos)
    except Exception as e:  # noqa: BLE001 - structured outputs are optional for serving
        log.warning("structured outputs are off: %s", e)
        return None


def _load_tokenizer(config: ServerConfig) -> Tokenizer:
    return load_tokenizer(_tokenizer_path(config))


def _check_fits(config: ServerConfig, model_config: ModelConfig) -> None:
    if config.max_model_len > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                         f"max_position_embeddings {model_config.max_position_embeddings}")


def build_engine(config: ServerConfig, model) -> Engine:
    """The engine of `config` for `model` (its page pool and compiled step shapes)."""
    _check_fits(config, model.config)
    mesh = None if config.mesh_shape is None else make_mesh(*config.mesh_shape)
    return Engine(model, config.engine_config(), mesh=mesh)


def _drafter(config: ServerConfig, drafter, session_memory: SessionMemory | None):
    """(drafter, the AgentSAM memory the stack owns) for config.drafter."""
    _check_drafter(config, drafter, session_memory)
    if config.drafter == "custom":
        return drafter, None
    if config.drafter == "sam":
        memory = session_memory if session_memory is not None else SessionMemory()
        return SAMDrafter(memory), memory
    return (PromptLookupDrafter() if config.drafter == "ngram" else None), None


def _check_drafter(config: ServerConfig, drafter, session_memory: SessionMemory | None) -> None:
    if (config.drafter == "custom") != (drafter is not None):
        raise ValueError(f'a Drafter object goes with drafter="custom" (got drafter={config.drafter!r} and '
                         f'{"a" if drafter is not None else "no"} object)')
    if session_memory is not None and config.drafter != "sam":
        raise ValueError(f"session_memory is AgentSAM's; drafter is {config.drafter!r}")


def build_stack(config: ServerConfig, *, metrics: ServingMetrics | None = None, model=None,
                tokenizer: Tokenizer | None = None, drafter=None,
                session_memory: SessionMemory | None = None, draft_step_cost=None) -> ServingStack:
    """Builds model, tokenizer, engine, pool, prefix cache, policy, drafter, scheduler and loop.

    `model` / `tokenizer`: use these instead of loading what `config` names (roles of one process
    share them). `drafter`: a Drafter object, with `config.drafter == "custom"`. `session_memory`:
    AgentSAM's cross-session memory for drafter "sam" (e.g. pre-filled); the stack closes it at
    shutdown. The adaptive switch is on whenever a drafter is, unless `config.adaptive_draft` is False;
    it prices k at measured step times, or at `draft_step_cost(batch_size, tokens_fed) -> seconds`
    when given (a projection's target device).
    """
    model_config = model.config if model is not None else _model_config(config)
    _check_fits(config, model_config)  # before any weights load
    policy = make_policy(config.policy, speculation_first=config.speculation_first)
    engine_config = config.engine_config()
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_config.vocab_size}")
    _check_drafter(config, drafter, session_memory)
    if model is None:
        model, default_name = _load_model(config, model_config)
    else:
        default_name = config.config or pathlib.Path(config.checkpoint).name
    engine = build_engine(config, model)
    drafter, memory = _drafter(config, drafter, session_memory)  # after loading: a failed load leaks no memory thread
    pool = BlockPool(config.num_blocks)
    prefix_cache = PrefixCache(config.block_size, pool) if config.prefix_cache else None
    sched_config = engine_config.scheduler_config(model_config, config.num_draft)
    # The chat template ends turns with the tokenizer's EOS; stop on it even if config.json omits it.
    eos = tuple(dict.fromkeys((*sched_config.eos_token_ids, *tokenizer.eos_token_ids)))
    sched_config = dataclasses.replace(sched_config, eos_token_ids=eos,
                                       share_inflight_prefill=config.share_inflight_prefill)
    if draft_step_cost is not None and (drafter is None or not config.adaptive_draft):
        raise ValueError("draft_step_cost prices the adaptive switch's k: it needs a drafter and adaptive_draft")
    adaptive = AdaptiveSpeculation.measured(config.num_draft_tokens, config.max_num_seqs, draft_step_cost) \
        if drafter is not None and config.adaptive_draft else None
    retention = SessionRetention(pool, config.retention_ttl_s) if config.retention_ttl_s > 0 else None
    scheduler = Scheduler(sched_config, pool, prefix_cache, policy, drafter=drafter,
                          retention=retention, adaptive=adaptive,
                          grammar=_grammar_compiler(tokenizer, model_config.vocab_size, eos))
    if config.compile_at_start:
        log.info("warm-up: compiling %d step shapes before serving (--no-warmup skips this)",
                 len(engine.step_shapes(drafting=drafter is not None)))
        start = time.perf_counter()
        compiled = engine.compile_all(drafting=drafter is not None)
        log.info("warm-up: %d step shapes compiled in %.1f s", compiled, time.perf_counter() - start)
    if config.measure_step_costs and isinstance(getattr(adaptive, "step_cost", None), MeasuredStepCost):
        _seed_step_costs(engine, adaptive.step_cost, config)
    loop = ServingLoop(scheduler, engine, detokenize=SafeDetokenizer(tokenizer), metrics=metrics,
                       overlap=config.overlap)
    return ServingStack(config, config.model_name or default_name, model_config, model, tokenizer, engine, pool,
                        prefix_cache, scheduler, loop, memory)


def _seed_step_costs(engine: Engine, cost: MeasuredStepCost, config: ServerConfig) -> None:
    """Times a step per cell the adaptive switch prices, at half the context limit (a cell's price
    is context-blind; served steps refine it), and seeds `cost` with them."""
    cells = cost.cells_to_seed(config.max_num_seqs, config.num_draft, config.max_tokens_per_step)
    for (n, t), seconds in zip(cells, engine.time_steps(cells, config.max_model_len // 2)):
        cost.seed(n, t, seconds)


def build_slot_engine(config: ServerConfig, *, model=None) -> SlotEngine:
    """The JetStream-style `SlotEngine` of `config`. Scheduler-side settings (drafter, policy,
    prefix cache) do not apply: JetStream's orchestrator does its own scheduling."""
    model_config = model.config if model is not None else _model_config(config)
    _check_fits(config, model_config)
    if model is None:
        model, _ = _load_model(config, model_config)
    return SlotEngine(build_engine(config, model))


def build_jetstream_engine(config: ServerConfig, *, model=None, sampling=None):
    """A `JetStreamEngine` (the `jetstream` extra) over `build_slot_engine(config)`, with the
    tokenizer `config` names."""
    from agentinfer_jax.engine.jetstream_adapter import JetStreamEngine  # optional dependency

    return JetStreamEngine(build_slot_engine(config, model=model), tokenizer_path=_tokenizer_path(config),
                           sampling=sampling)
