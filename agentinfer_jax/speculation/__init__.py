"""Model-free drafting for speculative decoding: AgentSAM (suffix automaton + cross-session memory),
prompt lookup, and the adaptive on/off switch."""

from agentinfer_jax.speculation.base import Drafter, UnknownRequestError
from agentinfer_jax.speculation.calibrator import AcceptanceCalibrator
from agentinfer_jax.speculation.ngram import PromptLookupDrafter
from agentinfer_jax.speculation.sam_drafter import SAMDrafter
from agentinfer_jax.speculation.session_memory import SessionMemory
from agentinfer_jax.speculation.suffix_automaton import Matcher, SuffixAutomaton

__all__ = ["Drafter", "UnknownRequestError", "AcceptanceCalibrator", "PromptLookupDrafter", "SAMDrafter",
           "SessionMemory", "Matcher", "SuffixAutomaton"]
