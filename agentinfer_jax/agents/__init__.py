"""Agent orchestration: LLM clients, ReAct tools and loop, AgentCollab, AgentCompress, SPAgent."""

from agentinfer_jax.agents.action_buffer import ActionBuffer, BufferStats
from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.clients import (
    ClientError,
    Completion,
    LatencyModel,
    LLMClient,
    OpenAIClient,
    RecordedCall,
    ReplayClient,
    ScriptedClient,
)
from agentinfer_jax.agents.collab import CollabController, ProgressSignal, parse_progress, strip_progress
from agentinfer_jax.agents.compress import MemoryDistiller, SearchResultFilter
from agentinfer_jax.agents.loop import AgentConfig, AgentFeatures, AgentResult, ReActAgent, SessionMetrics
from agentinfer_jax.agents.react import Action, Step, StepRecord, build_messages, normalize_action_key, parse_step
from agentinfer_jax.agents.spagent import (
    ActionSpeculator,
    Candidate,
    SessionSpeculationInfo,
    SpeculationConfig,
    SpeculationGate,
    SpeculationPlanner,
    parse_plausibility,
)
from agentinfer_jax.agents.tools import ReplayTool, SearchResult, SearchTool, ToolLatency, ToolOutcome, ToolState

__all__ = [
    "Action", "ActionBuffer", "ActionServer", "ActionSpeculator", "AgentConfig", "AgentFeatures", "AgentResult",
    "BufferStats", "Candidate", "ClientError", "CollabController", "Completion", "LLMClient", "LatencyModel",
    "MemoryDistiller", "OpenAIClient", "ProgressSignal", "ReActAgent", "RecordedCall", "ReplayClient", "ReplayTool",
    "ScriptedClient", "SearchResult", "SearchResultFilter", "SearchTool", "SessionMetrics", "SessionSpeculationInfo",
    "SpeculationConfig", "SpeculationGate", "SpeculationPlanner", "Step", "StepRecord", "ToolLatency", "ToolOutcome", "ToolState",
    "build_messages", "normalize_action_key", "parse_plausibility", "parse_progress", "parse_step", "strip_progress",
]
