"""Forces a live server's replies (tests): the scheduler's trace-replay path, `Request.forced_output`."""

from __future__ import annotations

import contextlib

from agentinfer_jax.serving.builder import ServerConfig, build_stack
from agentinfer_jax.serving.server import BackgroundServer


class ForcedReplies:
    """Makes the server's loop emit chosen texts: `script[i]` is the i-th request's reply."""

    def __init__(self, stack):
        self.stack, self.script, self.prompts, self.requests = stack, [], [], []
        self._submit = stack.loop.submit
        stack.loop.submit = self._forced_submit

    def _forced_submit(self, req, callback=None):
        if self.script:
            tok = self.stack.tokenizer
            req.forced_output = tok.encode(self.script.pop(0), add_bos=False) + [tok.eos_token_ids[0]]
        self.prompts.append(list(req.prompt_tokens))
        self.requests.append(req)
        return self._submit(req, callback)

    def restore(self):
        self.stack.loop.submit = self._submit


@contextlib.contextmanager
def tiny_server(**config):
    """A BackgroundServer of `--config tiny` on 127.0.0.1 with `ServerConfig` overrides, its first
    step compiled, and `.forced` (ForcedReplies) attached; stopped on exit."""
    stack = build_stack(ServerConfig(config="tiny", **config))
    stack.engine.warmup()
    srv = BackgroundServer(stack).start()
    srv.forced = ForcedReplies(stack)
    try:
        yield srv
    finally:
        srv.forced.restore()
        srv.stop()
