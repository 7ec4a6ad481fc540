"""ReAct parsing: generated responses in many spellings must give back the action they were built from."""

import json
import random
import string

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agentinfer_jax.agents.react import (
    ACTION_KINDS,
    Action,
    StepRecord,
    build_messages,
    cut_at_observation,
    normalize_action_key,
    parse_step,
)

WORDS = ["Colorado", "orogeny", "High", "Plains", "Lilu", "(mythology)", "Arthur's", "Magazine", "1844", "dice"]


def _random_arg(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def _render(rng: random.Random, kind: str, arg: str, thought: str) -> str:
    """One of many ways a model writes a step; all must parse to Action(kind, arg)."""
    name = rng.choice([kind, kind.upper(), kind.capitalize()])
    n = rng.randint(1, 9)
    label = rng.choice([f"Action {n}:", "Action:", f"action {n} :", f"ACTION {n}:", f"**Action {n}**:"])
    body = rng.choice([f"{name}[{arg}]", f"{name}[ {arg} ]", f"{name}[{arg}", f"{name}[{arg}] because it helps"])
    extra = rng.choice(["", f"\nAction {n + 1}: Search[Other thing]", f"\nObservation {n}: Search[Hallucinated]"])
    head = rng.choice([f"Thought {n}: {thought}\n", f"thought: {thought}\n", f"{thought}\n"])
    return f"{head}{label} {body}{extra}"


def test_generated_spellings_parse_to_their_action():
    rng = random.Random(0)
    for _ in range(500):
        kind = rng.choice(ACTION_KINDS)
        arg = _random_arg(rng)
        thought = "I need to find " + _random_arg(rng) + "."
        step = parse_step(_render(rng, kind, arg, thought))
        assert step.error is None, step
        assert step.action == Action(kind, arg)
        assert step.thought == thought


def test_bare_and_parenthesised_actions_and_thought_without_labels():
    assert parse_step("Action 3: Search Colorado orogeny").action == Action("search", "Colorado orogeny")
    assert parse_step("Action: lookup: eastern sector").action == Action("lookup", "eastern sector")
    assert parse_step("Action 1: Search(High Plains)").action == Action("search", "High Plains")
    step = parse_step("I should look at Search[Lilu (mythology)] and then Lookup[demon]")
    assert step.action == Action("search", "Lilu (mythology)") and step.thought == "I should look at"


def test_missing_or_empty_action_is_an_error_not_an_exception():
    for text in ["Thought: I will search for it", "", "Action 2: Search[]", "Action: dance[now]", None, 42]:
        step = parse_step(text)
        assert step.action is None and step.error


def test_normalize_action_key_equates_spellings_only():
    rng = random.Random(1)
    for _ in range(200):
        kind, arg = rng.choice(ACTION_KINDS), _random_arg(rng)
        variant = rng.choice([arg.upper(), arg.replace(" ", "_"), f"  {arg}  ", arg.replace(" ", "   "), f'"{arg}"'])
        assert normalize_action_key(Action(kind, arg)) == normalize_action_key(Action(kind, variant))
        other = arg + " extra"
        assert normalize_action_key(Action(kind, arg)) != normalize_action_key(Action(kind, other))
    assert normalize_action_key(Action("search", "x")) != normalize_action_key(Action("lookup", "x"))


def test_cut_at_observation_and_messages_layout():
    assert cut_at_observation("Thought 1: a\nAction 1: Search[b]\nObservation 1: c") == "Thought 1: a\nAction 1: Search[b]"
    steps = [StepRecord("Thought 1: a\nAction 1: Search[b]", "page b"), StepRecord("Action 2: Lookup[c]", "(Result 1 / 1) c")]
    msgs = build_messages("Q?", steps, instruction="INSTR", extra_instruction="EXTRA")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == "INSTR\n\nEXTRA" and msgs[1]["content"] == "Question: Q?"
    assert msgs[3]["content"] == "Observation 1: page b" and msgs[5]["content"].startswith("Observation 2: ")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=string.printable + "[]()：ÄΩ", max_size=200))
def test_parser_fuzz_never_raises(text):
    step = parse_step(text)
    assert (step.action is None) != (step.error is None)
    if step.action is not None:
        assert step.action.kind in ACTION_KINDS
    assert step.raw == text


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from(ACTION_KINDS), st.text(alphabet=string.ascii_letters + " '-", min_size=1, max_size=30), st.text(max_size=40))
def test_fuzzed_action_after_label_is_recovered(kind, arg, noise):
    assume(any(c.isalpha() for c in arg))
    text = f"{noise.replace('[', '').replace(']', '')}\nAction 4: {kind}[{arg}]"
    assume("observation" not in noise.lower() and "action" not in noise.lower())  # labels in noise change the reading
    step = parse_step(text)
    assert step.action is not None and normalize_action_key(step.action) == normalize_action_key(Action(kind, arg))


# ---- native tool calling ------------------------------------------------------------------------


def test_tool_calls_round_trip_to_actions_and_bad_calls_are_none():
    from agentinfer_jax.agents.react import REACT_TOOLS, action_from_tool_call, tool_call_for

    rng = random.Random(3)
    names = {t["function"]["name"] for t in REACT_TOOLS}
    assert names == set(ACTION_KINDS)
    for _ in range(100):
        action = Action(rng.choice(ACTION_KINDS), _random_arg(rng))
        call = tool_call_for(action, "call_x")
        assert action_from_tool_call(call) == action
        # The arguments follow the tool's own schema: exactly its one required string property.
        schema = next(t for t in REACT_TOOLS if t["function"]["name"] == action.kind)["function"]["parameters"]
        assert set(json.loads(call["function"]["arguments"])) == set(schema["required"]) == set(schema["properties"])
    for bad in (None, {}, {"function": {"name": "delete", "arguments": "{}"}},
                {"function": {"name": "search", "arguments": "{not json"}},
                {"function": {"name": "search", "arguments": '{"entity": 3}'}},
                {"function": {"name": "search", "arguments": '{"entity": "  "}'}}):
        assert action_from_tool_call(bad) is None


def test_native_agent_history_is_openai_tool_calling_messages():
    import asyncio

    from agentinfer_jax.agents.clients import Completion, ScriptedClient
    from agentinfer_jax.agents.loop import AgentConfig, ReActAgent
    from agentinfer_jax.agents.react import tool_call_for
    from agentinfer_jax.agents.tools import SearchTool

    def reply(action, cid, text=""):
        return Completion([text], 10, 5, 0.0, tool_calls=(tool_call_for(action, cid),))

    client = ScriptedClient([Completion(["no call here"], 10, 5, 0.0),
                             reply(Action("search", "Paris"), "c1", "Search first."),
                             reply(Action("finish", "Seine"), "c2")])
    agent = ReActAgent(client, SearchTool({"Paris": ["Paris lies on the Seine."]}),
                       config=AgentConfig(max_steps=4, native_tools=True))
    result = asyncio.run(agent.run("What river?"))
    assert result.answer == "Seine" and result.metrics.parse_errors == 1
    assert all(c.tools and c.tools[0]["type"] == "function" for c in client.calls)
    last = client.calls[-1].messages
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert last[4]["tool_calls"][0]["id"] == "c1" and last[5]["tool_call_id"] == "c1"
    assert "Seine" in last[5]["content"] and last[4]["content"] == "Search first."
