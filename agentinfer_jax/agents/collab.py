"""AgentCollab: a large and a small model share one session, switched by the models' own progress checks.

After its thought, the active model writes a PROGRESS block (in the same response, before the
action, so it reuses the thought's KV cache):

    ===PROGRESS===
    <reason>10-20 words</reason>
    <value>TRUE</value>
    ===END_PROGRESS===

Controller rules (per session):
- the first `warmup_large_steps` (K_L) steps run on the large model (planning);
- afterwards the small model runs; FALSE from the small model escalates to the large model for
  at most `escalation_steps` (B_L) steps; TRUE from the large model de-escalates at once;
- `max_large_steps` (optional) caps the large model's escalated steps over the whole session.
"""

from __future__ import annotations

import dataclasses
import re

PROGRESS_INSTRUCTION = """\
After each Thought, before the Action, judge whether the last steps made progress towards the answer
and write exactly this block (reason in 10-20 words, value TRUE or FALSE):
===PROGRESS===
<reason>why you are or are not making progress</reason>
<value>TRUE</value>
===END_PROGRESS==="""

_START = re.compile(r"=+\s*PROGRESS\s*=+", re.IGNORECASE)
_END = re.compile(r"=+\s*END[_ ]?PROGRESS\s*=+", re.IGNORECASE)
# Where a block without its END marker stops: after its value tag, or where the step's Action (or
# a new Thought) line begins; never at the end of the reply, which would swallow the action.
_OPEN_END = re.compile(r"(?P<label>^[ \t]*\**[ \t]*(?:action|thought)\b)|<\s*value\s*>[^<\n]*(?:<\s*/\s*value\s*>)?",
                       re.IGNORECASE | re.MULTILINE)
_VALUE = re.compile(r"<\s*value\s*>\s*(\w+)\s*(?:<\s*/\s*value\s*>)?", re.IGNORECASE)
_REASON = re.compile(r"<\s*reason\s*>(.*?)(?:<\s*/\s*reason\s*>|<\s*value|$)", re.IGNORECASE | re.DOTALL)
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


@dataclasses.dataclass(frozen=True)
class ProgressSignal:
    """A model's progress judgment; `parsed=False` means the default was used."""

    value: bool
    reason: str
    parsed: bool


def _blocks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of each PROGRESS block, in order."""
    blocks = []
    pos = 0
    while (start := _START.search(text, pos)) is not None:
        following = _START.search(text, start.end())
        limit = following.start() if following is not None else len(text)
        end = _END.search(text, start.end(), limit)
        if end is not None:
            blocks.append((start.start(), end.end(), text[start.end():end.start()]))
            pos = end.end()
            continue
        cut = _OPEN_END.search(text, start.end(), limit)
        stop = limit if cut is None else cut.start() if cut.group("label") else cut.end()
        blocks.append((start.start(), stop, text[start.end():stop]))
        pos = max(stop, start.end())
    return blocks


def parse_progress(text: object, default: bool = True) -> ProgressSignal:
    """Reads the PROGRESS block; a missing block or unreadable value gives `default` (never raises)."""
    raw = text if isinstance(text, str) else ""
    blocks = _blocks(raw)
    if not blocks:
        return ProgressSignal(default, "", False)
    body = blocks[0][2]
    reason_match = _REASON.search(body)
    reason = re.sub(r"\s+", " ", reason_match.group(1)).strip() if reason_match else ""
    value_match = _VALUE.search(body)
    word = value_match.group(1).lower() if value_match else ""
    if word in _TRUE:
        return ProgressSignal(True, reason, True)
    if word in _FALSE:
        return ProgressSignal(False, reason, True)
    return ProgressSignal(default, reason, False)


def strip_progress(text: str) -> str:
    """The response without its PROGRESS block (what the history keeps and the action parser reads)."""
    marked, pos = [], 0
    for start, end, _ in _blocks(text):
        marked += [text[pos:start], "\x00"]
        pos = end
    marked = "".join([*marked, text[pos:]])
    return re.sub(r"\s*\x00\s*", "\n", marked).strip()


@dataclasses.dataclass
class CollabMetrics:
    steps: dict[str, int] = dataclasses.field(default_factory=lambda: {"large": 0, "small": 0})
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: {"large": 0, "small": 0})
    escalations: int = 0
    de_escalations: int = 0
    budget_exhaustions: int = 0
    escalations_denied: int = 0
    parse_failures: int = 0

    def step_share(self, role: str) -> float:
        total = sum(self.steps.values())
        return self.steps[role] / total if total else 0.0

    def token_share(self, role: str) -> float:
        total = sum(self.tokens.values())
        return self.tokens[role] / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            **dataclasses.asdict(self),
            "step_share_large": self.step_share("large"),
            "token_share_large": self.token_share("large"),
        }


class CollabController:
    """Decides which model runs the next step of one session (Alg. 1 of AgentInfer)."""

    def __init__(
        self,
        warmup_large_steps: int = 1,
        escalation_steps: int = 2,
        *,
        max_large_steps: int | None = None,
        default_progress: bool = True,
    ) -> None:
        if warmup_large_steps < 0 or escalation_steps < 0:
            raise ValueError("warmup_large_steps (K_L) and escalation_steps (B_L) must be >= 0")
        if max_large_steps is not None and max_large_steps < 0:
            raise ValueError("max_large_steps must be >= 0 or None")
        self.warmup_large_steps = warmup_large_steps
        self.escalation_steps = escalation_steps
        self.max_large_steps = max_large_steps
        self.default_progress = default_progress
        self.metrics = CollabMetrics()
        self._steps_done = 0
        self._escalated_left = 0  # large steps left in the current escalation; 0 = not escalated
        self._escalated_total = 0

    @property
    def escalated(self) -> bool:
        return self._escalated_left > 0

    def role_for_next_step(self) -> str:
        if self._steps_done < self.warmup_large_steps or self.escalated:
            return "large"
        return "small"

    def observe(self, role: str, response: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> ProgressSignal:
        """Records a finished step of `role` and applies its progress signal; returns the signal."""
        if role not in ("large", "small"):
            raise ValueError(f"role must be 'large' or 'small', got {role!r}")
        signal = parse_progress(response, self.default_progress)
        self.metrics.parse_failures += not signal.parsed
        self.metrics.steps[role] += 1
        self.metrics.tokens[role] += prompt_tokens + completion_tokens
        in_warmup = self._steps_done < self.warmup_large_steps
        self._steps_done += 1
        if in_warmup:
            return signal
        if self.escalated and role == "large":
            self._escalated_total += 1
            self._escalated_left -= 1
            if signal.value:
                self._escalated_left = 0
                self.metrics.de_escalations += 1
            elif self._escalated_left == 0 or self._cap_reached():
                self._escalated_left = 0
                self.metrics.budget_exhaustions += 1
        elif role == "small" and not signal.value:
            if self.escalation_steps > 0 and not self._cap_reached():
                self._escalated_left = self.escalation_steps
                self.metrics.escalations += 1
            else:
                self.metrics.escalations_denied += 1
        return signal

    def _cap_reached(self) -> bool:
        return self.max_large_steps is not None and self._escalated_total >= self.max_large_steps
