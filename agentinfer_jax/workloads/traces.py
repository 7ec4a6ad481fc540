"""Readers for the agent-trace formats in ../shared/data, normalised to chat messages.

Formats understood by `load_traces(path)`:
- FireAct trajectory dicts: `{qid: {"traj": [{role, content}, ...] | "<alpaca-style text>", ...}}`.
- OpenAI-messages JSONL: one `{"messages": [...]}` per line, plain chat or OpenAI tool calling
  (assistant messages with `tool_calls` and `content` null or text, role `tool` results with a
  `tool_call_id`), optionally with the `tools` offered (kept in `meta["tools"]`).
- A JSON list of records, each with a `traj` (or `messages`) message list.
- speculative-action runs: a directory holding `<qid>/normalobs.json` files (searched recursively);
  each becomes prompt -> (thought + action, observation)* messages, and its `metrics.json` guess hit
  rates are kept in `meta["guess_hit_rates"]`.

Every trajectory is a list of chat messages; an assistant message is one model call, and the user
(or, with tool calling, tool) messages after it carry the observations. `assistant_turns()` gives
each call's reply as the text the model writes (tool calls in the Qwen/Hermes `<tool_call>` format
the bundled template teaches), and `as_text_chat()` the whole trajectory as plain {role, content}
ChatML turns, for consumers that tokenize message by message.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from agentinfer_jax.serving.tool_parsers import format_hermes_reply

Message = dict[str, Any]
_ROLES = {"system", "user", "assistant"}
_TOOL_ROLES = {"system", "developer", "user", "assistant", "tool"}


class TraceFormatError(ValueError):
    """A trace file that is not in one of the supported formats."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One recorded agent session as chat messages."""

    id: str
    messages: tuple[Message, ...]
    source: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def assistant_turns(self) -> Iterator[tuple[tuple[Message, ...], str]]:
        """Yields (all earlier messages, recorded response text) for every assistant message."""
        for i, m in enumerate(self.messages):
            if m["role"] == "assistant":
                yield self.messages[:i], reply_text(m)

    @property
    def has_tool_calls(self) -> bool:
        return any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)

    def as_text_chat(self) -> Trajectory:
        """The trajectory as {role, content} text turns rendered as the bundled ChatML/Qwen template
        renders tool calling: an assistant turn's calls as `<tool_call>` blocks, and each run of
        tool results as one user turn of `<tool_response>` blocks. Plain trajectories unchanged."""
        if not self.has_tool_calls:
            return self
        out: list[Message] = []
        for m in self.messages:
            if m["role"] == "tool":
                block = f"<tool_response>\n{m['content']}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
                else:
                    out.append({"role": "user", "content": block, "tool_results": True})
            else:
                out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": reply_text(m)})
        plain = tuple({"role": m["role"], "content": m["content"]} for m in out)
        return dataclasses.replace(self, messages=plain)


def reply_text(message: Message) -> str:
    """What the model wrote for an assistant message: its content, then its tool calls."""
    calls = message.get("tool_calls") or []
    content = message.get("content") or ""
    if not calls:
        return content
    return format_hermes_reply(content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])


def _check_messages(msgs: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(msgs, list) or not msgs:
        raise TraceFormatError(f"{where}: expected a non-empty list of messages")
    out = []
    for j, m in enumerate(msgs):
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("role") in ("tool", "developer")):
            out.append(_check_tool_message(m, f"{where}: message {j}"))
            continue
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise TraceFormatError(f"{where}: message {j} is not a {{role, content}} chat message "
                                   "nor an OpenAI tool-calling message")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _check_tool_message(m: dict[str, Any], where: str) -> Message:
    """An OpenAI tool-calling message, normalised: arguments as JSON text, content text or None."""
    role, content = m.get("role"), m.get("content")
    if isinstance(content, list):  # text parts
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
            raise TraceFormatError(f"{where}: only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if role not in _TOOL_ROLES or not (content is None or isinstance(content, str)):
        raise TraceFormatError(f"{where}: not an OpenAI chat message")
    if role == "tool":
        if not isinstance(content, str) or not isinstance(m.get("tool_call_id"), str):
            raise TraceFormatError(f"{where}: a tool message needs string 'content' and 'tool_call_id'")
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": content}
    if role != "assistant":
        if content is None:
            raise TraceFormatError(f"{where}: a {role} message needs 'content'")
        return {"role": role, "content": content}
    calls = []
    for c in m.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise TraceFormatError(f"{where}: a tool call needs a function with a name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        try:
            json.loads(args)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{where}: tool call arguments are not JSON ({e.msg})") from e
        calls.append({"id": str(c.get("id") or f"call_{len(calls)}"), "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return {"role": "assistant", "content": content, "tool_calls": calls}


_STEP_LINE = re.compile(r"^(Thought|Action|Observation)( \d+)?:")


def _alpaca_to_messages(text: str) -> list[Message]:
    """FireAct's Llama format: an instruction block, then Thought/Action/Observation lines."""
    head, sep, body = text.partition("### Response:")
    if not sep:
        raise TraceFormatError("alpaca-style trajectory without '### Response:'")
    instruction = head.split("### Instruction:", 1)[-1].strip()
    msgs: list[Message] = [{"role": "user", "content": instruction}]
    current: list[str] = []
    role = "assistant"
    for line in body.strip().splitlines():
        m = _STEP_LINE.match(line)
        kind = m.group(1) if m else None
        new_role = "user" if kind == "Observation" else ("assistant" if kind else role)
        if new_role != role and current:
            msgs.append({"role": role, "content": "\n".join(current).strip()})
            current = []
        role = new_role
        current.append(line)
    if current:
        msgs.append({"role": role, "content": "\n".join(current).strip()})
    return msgs


def _load_fireact_dict(data: dict, source: str) -> list[Trajectory]:
    out = []
    for qid, rec in data.items():
        if not isinstance(rec, dict) or "traj" not in rec:
            raise TraceFormatError(f"{source}: record {qid!r} has no 'traj'")
        traj = rec["traj"]
        msgs = _alpaca_to_messages(traj) if isinstance(traj, str) else traj
        meta = {k: rec[k] for k in ("gt", "pred", "em", "reward") if k in rec}
        out.append(Trajectory(str(qid), _check_messages(msgs, f"{source}[{qid}]"), source, meta))
    return out


def _load_speculative_action_run(qdir: pathlib.Path, source: str) -> Trajectory:
    rec = json.loads((qdir / "normalobs.json").read_text())

    def as_list(v: Any) -> list[str]:
        return ast.literal_eval(v) if isinstance(v, str) else list(v)

    thoughts, actions, observations = (as_list(rec[k]) for k in ("thoughts", "actions", "observations"))
    msgs: list[Message] = [{"role": "user", "content": rec["prompt"]}]
    for i, (t, a) in enumerate(zip(thoughts, actions), start=1):
        msgs.append({"role": "assistant", "content": f"Thought {i}: {t}\nAction {i}: {a}"})
        if i <= len(observations):
            msgs.append({"role": "user", "content": f"Observation {i}: {observations[i - 1]}"})
    meta: dict[str, Any] = {"tool_times_s": as_list(rec.get("time_taken", []))}
    metrics = qdir / "metrics.json"
    if metrics.exists():
        meta["guess_hit_rates"] = json.loads(metrics.read_text())
    rel = qdir.relative_to(qdir.parents[2]) if len(qdir.parents) > 2 else qdir
    return Trajectory(str(rel), _check_messages(msgs, str(qdir)), source, meta)


def load_traces(path: str | pathlib.Path, limit: int | None = None) -> list[Trajectory]:
    """Loads every trajectory in a file or speculative-action run directory."""
    path = pathlib.Path(path)
    source = path.name
    if path.is_dir():
        runs = sorted(p.parent for p in path.rglob("normalobs.json"))
        if not runs:
            raise TraceFormatError(f"{path}: directory holds no speculative-action runs (normalobs.json)")
        trajs = [_load_speculative_action_run(q, source) for q in runs]
    elif not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    elif path.suffix == ".jsonl":
        trajs = []
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{path}:{n + 1}: malformed JSON ({e.msg})") from e
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            meta = {"tools": rec["tools"]} if isinstance(rec, dict) and rec.get("tools") else {}
            rid = str(rec.get("id", f"{source}:{n}")) if isinstance(rec, dict) else f"{source}:{n}"
            trajs.append(Trajectory(rid, _check_messages(msgs, f"{path}:{n + 1}"), source, meta))
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{path}: malformed JSON ({e.msg})") from e
        if isinstance(data, dict):
            trajs = _load_fireact_dict(data, source)
        elif isinstance(data, list):
            trajs = []
            for n, rec in enumerate(data):
                msgs = rec.get("traj", rec.get("messages")) if isinstance(rec, dict) else None
                rid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
                meta = {"tools": rec["tools"]} if isinstance(rec, dict) and rec.get("tools") else {}
                trajs.append(Trajectory(rid, _check_messages(msgs, f"{path}[{n}]"), source, meta))
        else:
            raise TraceFormatError(f"{path}: expected a dict of trajectories or a list of records")
    return trajs[:limit] if limit is not None else trajs


def default_trace_path() -> pathlib.Path:
    """The bundled FireAct sample (MIT; see assets/data/README.md): works without ../shared."""
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "data" / "fireact_hotpotqa_sample.json"


def portable_path(path: str | pathlib.Path) -> str:
    """`path` as results files should record it: relative to the repository root when inside it,
    `../<rest>` when beside it (the ../shared checkout), else unchanged."""
    p = pathlib.Path(path).resolve()
    repo = pathlib.Path(__file__).resolve().parents[2]
    for base, prefix in ((repo, ""), (repo.parent, "../")):
        if p.is_relative_to(base):
            return prefix + p.relative_to(base).as_posix()
    return str(path)


def shared_trace_paths(shared: str | pathlib.Path) -> Sequence[pathlib.Path]:
    """All trace sources in a ../shared checkout, in a fixed order."""
    root = pathlib.Path(shared) / "data" / "traces"
    fire = root / "fireact"
    return [fire / "hotpotqa_dev_gpt-3.5-turbo-ft.json", fire / "hotpotqa_dev_llama-2-13b-ft.json",
            fire / "hotpotqa_dev_llama-2-7b-ft.json", fire / "finetune_multitask_multimethod.jsonl",
            root / "speculative-action" / "hotpotqa" / "run_metrics"]
