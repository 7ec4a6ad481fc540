"""AgentCollab: PROGRESS parsing and the large/small controller, alone and inside the agent loop."""

import asyncio
import random
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from agentinfer_jax.agents.clients import ScriptedClient
from agentinfer_jax.agents.collab import CollabController, parse_progress, strip_progress
from agentinfer_jax.agents.loop import AgentConfig, AgentFeatures, ReActAgent
from agentinfer_jax.agents.tools import SearchTool


def block(value, reason="the last search found the birth date we needed"):
    return f"===PROGRESS===\n<reason>{reason}</reason>\n<value>{value}</value>\n===END_PROGRESS==="


def step(value, action="Search[Demon Dice]", n=1):
    progress = "" if value is None else block(value) + "\n"
    return f"Thought {n}: thinking.\n{progress}Action {n}: {action}"


def test_parse_progress_reads_values_and_defaults():
    rng = random.Random(0)
    for _ in range(200):
        value = rng.choice([True, False])
        word = rng.choice([str(value).upper(), str(value).lower(), str(value)])
        reason = " ".join(rng.choice(["search", "found", "no", "date", "stuck"]) for _ in range(rng.randint(3, 12)))
        text = rng.choice(["Thought: x\n", ""]) + block(word, reason).replace("\n", rng.choice(["\n", " ", "\n\n"]))
        sig = parse_progress(text, default=not value)
        assert sig.parsed and sig.value == value and sig.reason == reason
    for default in (True, False):
        assert parse_progress("Thought: no block here", default) == parse_progress("", default)
        sig = parse_progress("===PROGRESS===<value>MAYBE</value>===END_PROGRESS===", default)
        assert not sig.parsed and sig.value == default
    # an unterminated block still counts
    assert parse_progress("===PROGRESS===\n<value>FALSE").value is False


def test_strip_progress_leaves_the_step():
    text = step("TRUE", "Lookup[born]", 3)
    assert strip_progress(text) == "Thought 3: thinking.\nAction 3: Lookup[born]"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=string.printable + "=<>/", max_size=300), st.booleans())
def test_progress_fuzz_never_raises(text, default):
    sig = parse_progress(text, default)
    assert isinstance(sig.value, bool) and (sig.parsed or sig.value == default)
    strip_progress(text)


def reference_roles(signals, k_l, b_l):
    """The controller's rules written out directly: role of each step given each step's signal."""
    roles, left = [], 0
    for i, sig in enumerate(signals):
        role = "large" if i < k_l or left > 0 else "small"
        roles.append(role)
        if i < k_l:
            continue
        if left > 0:
            left = 0 if sig else left - 1
        elif not sig and b_l > 0:
            left = b_l
    return roles


def test_controller_matches_reference_on_random_signals():
    rng = random.Random(1)
    for _ in range(300):
        k_l, b_l = rng.randint(0, 3), rng.randint(0, 3)
        signals = [rng.random() < 0.6 for _ in range(rng.randint(1, 15))]
        ctl = CollabController(k_l, b_l)
        roles = []
        for sig in signals:
            role = ctl.role_for_next_step()
            roles.append(role)
            ctl.observe(role, step("TRUE" if sig else "FALSE"), 10, 5)
        assert roles == reference_roles(signals, k_l, b_l)
        assert ctl.metrics.steps["large"] == roles.count("large")
        assert ctl.metrics.tokens["large"] == 15 * roles.count("large")


def test_escalation_budget_and_deescalation():
    ctl = CollabController(warmup_large_steps=1, escalation_steps=2)
    trace = []
    for sig in ["TRUE", "FALSE", "FALSE", "FALSE", "FALSE", "TRUE", "TRUE"]:
        role = ctl.role_for_next_step()
        trace.append(role)
        ctl.observe(role, step(sig))
    # warm-up large; small says FALSE -> large x2 (both FALSE: budget exhausted) -> small FALSE -> large TRUE -> small
    assert trace == ["large", "small", "large", "large", "small", "large", "small"]
    m = ctl.metrics
    assert (m.escalations, m.budget_exhaustions, m.de_escalations) == (2, 1, 1)
    capped = CollabController(0, 5, max_large_steps=1)
    roles = []
    for _ in range(5):
        roles.append(capped.role_for_next_step())
        capped.observe(roles[-1], step("FALSE"))
    assert roles == ["small", "large", "small", "small", "small"] and capped.metrics.escalations_denied == 3


def test_missing_progress_uses_default_and_is_counted():
    for default, expected_second in ((True, "small"), (False, "large")):
        ctl = CollabController(0, 1, default_progress=default)
        ctl.observe(ctl.role_for_next_step(), step(None))
        assert ctl.role_for_next_step() == expected_second and ctl.metrics.parse_failures == 1


def test_agent_routes_steps_by_progress():
    corpus = {"Demon Dice": ["Demon Dice is a dice game by Lester Smith."], "Lester Smith": ["Lester Smith is a designer."]}
    client = ScriptedClient(
        {
            "large": [step("TRUE", "Search[Demon Dice]", 1), step("TRUE", "Search[Lester Smith]", 3)],
            "small": [step("FALSE", "Lookup[dice]", 2), step(None, "Finish[Lester Smith]", 4)],
        }
    )
    agent = ReActAgent(client, SearchTool(corpus), config=AgentConfig(max_steps=6), features=AgentFeatures(collab=True))
    result = asyncio.run(agent.run("Who made Demon Dice?"))
    assert [c.role for c in client.calls] == ["large", "small", "large", "small"]
    assert result.answer == "Lester Smith"
    collab = result.metrics.collab
    assert collab["escalations"] == 1 and collab["de_escalations"] == 1 and collab["parse_failures"] == 1
    assert "===PROGRESS===" in client.calls[0].messages[0]["content"]  # the instruction asks for the block
    assert all("===PROGRESS===" not in m["content"] for m in result.messages if m["role"] == "assistant")
    assert result.metrics.prompt_tokens["small"] > 0 and result.metrics.prompt_tokens["large"] > 0


def test_progress_block_without_end_marker_keeps_the_action():
    """A block missing its END marker used to run to the end of the reply, swallowing the Action
    line after it: the step became "Invalid action". It now stops after its value (or where the
    Action line begins); its value still counts."""
    for tail in ("<value>FALSE</value>\n", "<value>FALSE\n", ""):
        text = f"Thought 2: stuck.\n===PROGRESS===\n<reason>no new facts</reason>\n{tail}Action 2: Lookup[dice]"
        assert strip_progress(text) == "Thought 2: stuck.\nAction 2: Lookup[dice]"
        assert parse_progress(text).value is (False if tail else True)
    # the next block's own END marker does not close an earlier unterminated one
    two = "===PROGRESS===\n<value>FALSE</value>\nAction: Search[A]\n===PROGRESS===\n<value>TRUE</value>\n===END_PROGRESS==="
    assert strip_progress(two) == "Action: Search[A]" and parse_progress(two).value is False

    corpus = {"Demon Dice": ["Demon Dice is a dice game by Lester Smith."]}
    unterminated = "Thought 2: stuck.\n===PROGRESS===\n<reason>no new facts yet</reason>\n<value>FALSE</value>\nAction 2: Lookup[dice]"
    client = ScriptedClient({"large": [step("TRUE", "Search[Demon Dice]", 1), step("TRUE", "Finish[Lester Smith]", 3)],
                             "small": [unterminated]})
    agent = ReActAgent(client, SearchTool(corpus), config=AgentConfig(max_steps=4), features=AgentFeatures(collab=True))
    result = asyncio.run(agent.run("Who made Demon Dice?"))
    assert result.steps[1].observation == "(Result 1 / 1) Demon Dice is a dice game by Lester Smith."
    assert result.metrics.parse_errors == 0 and result.metrics.collab["escalations"] == 1
    assert [c.role for c in client.calls] == ["large", "small", "large"] and result.answer == "Lester Smith"
