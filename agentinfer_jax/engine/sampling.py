"""Token sampling and draft verification, on device, batched over rows.

Randomness is a pure function of (request seed, position): a request that is preempted and
recomputed, or run alone instead of in a batch, draws the same tokens.

Verification with a deterministic draft (prompt lookup, suffix automaton: the draft puts all its
mass on one token d) uses the standard speculative-sampling rule with q = one-hot(d): accept d with
probability p(d); on rejection sample from the residual max(0, p - q), i.e. p with d removed and
renormalised. The output distribution is exactly p's. Greedy rows accept d iff d == argmax p.

A batch whose rows are all greedy (the common serving case) takes a fast path under lax.cond:
argmax only, no vocabulary sort, no PRNG; it gives the same tokens as the full path.

Optional per-row adjustments (`StepExtras`, present only when some row of the step needs them, so
plain steps keep their compiled shapes): an additive logit bias (logit_bias and the OpenAI
presence/frequency penalties, computed on the host per row) and a grammar's allowed-token bitmask,
both applied to the verification rows before greedy or sampled verification. Drafts that break the
grammar are cut on the host, and row j's mask is the grammar's state after drafts 0..j-1, so
greedy verification under a mask emits exactly what masked decoding without drafts would.
Logprobs are the raw model's (log_softmax of the unadjusted logits, no temperature), computed for
every verification row and gathered at the emitted tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30
TOP_LOGPROBS = 20  # top logprobs computed per row when any row wants them (cut per request on host)


class SamplingArrays:
    """Per-row sampling parameters as device arrays (a pytree)."""

    def __init__(self, temperature, top_k, top_p, seed):
        self.temperature = temperature  # f32 [N]; 0 = greedy
        self.top_k = top_k  # i32 [N]; 0 = off
        self.top_p = top_p  # f32 [N]; 1 = off
        self.seed = seed  # u32 [N]

    def tree_flatten(self):
        return (self.temperature, self.top_k, self.top_p, self.seed), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


jax.tree_util.register_pytree_node(SamplingArrays, SamplingArrays.tree_flatten, SamplingArrays.tree_unflatten)


def greedy_tokens(logits):
    """argmax over the last axis (the first index of the maximum), int32. A max-reduce, a compare
    and a min-reduce: on CPU XLA's argmax (a variadic reduce) is not vectorized and costs ~4x as
    much over a 4096-token vocabulary, a sizeable share of a small model's step."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a row of NaNs matches nothing: token v - 1, never out of range


def _row_keys(seed, position, salt):
    """One PRNG key per row from (seed, position, salt)."""
    def one(s, p):
        k = jax.random.key(s)
        return jax.random.fold_in(jax.random.fold_in(k, p), salt)
    return jax.vmap(one)(seed, position)


def filtered_log_probs(logits, temperature, top_k, top_p):
    """Log-probabilities after temperature, top-k and top-p; logits f32 [N, V]. Without any top-k
    or top-p cut in the batch the vocabulary sort is skipped (lax.cond)."""
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    x = logits / t
    return jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1.0), lambda: _cut_log_probs(x, top_k, top_p),
                        lambda: jax.nn.log_softmax(x, axis=-1))


def _cut_log_probs(x, top_k, top_p):
    v = x.shape[-1]
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    # top-k: keep values >= the k-th largest.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x >= kth, x, _NEG)
    # top-p over what survived top-k: keep the smallest prefix of the sorted probs with mass >= p.
    sorted_x = jnp.where(jnp.arange(v)[None, :] < k[:, None], sorted_x, _NEG)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p = 1 keeps all (a rounded mass_before can reach 1.0): such a row gets exactly the
    # uncut path's values, so a batch's other rows never change its draws.
    keep_sorted = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= cutoff, x, _NEG)
    return jax.nn.log_softmax(x, axis=-1)


def sample(logits, params: SamplingArrays, positions):
    """One token per row: argmax for greedy rows, else a draw from the filtered distribution.
    All-greedy batches skip the filters (a vocabulary sort per row) and the PRNG."""
    def full():
        logp = filtered_log_probs(logits, params.temperature, params.top_k, params.top_p)
        keys = _row_keys(params.seed, positions, 0)
        drawn = jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp)
        return jnp.where(params.temperature > 0, drawn, greedy_tokens(logits)).astype(jnp.int32)

    return jax.lax.cond(jnp.all(params.temperature <= 0),
                        lambda: greedy_tokens(logits), full)


def verify(logits, drafts, num_drafts, params: SamplingArrays, positions):
    """Speculative verification for S sequences with up to K drafts each.

    logits [S, K+1, V]: the target's logits after the newest token and after each draft; drafts
    [S, K] (padding beyond num_drafts[s] is ignored); positions [S]: position of the first predicted
    token. Returns (tokens [S, K+1], num_new [S]): tokens[s, :num_new[s]] are the accepted drafts
    followed by one token from the target (the correction or the bonus token).
    """
    s, kp1, v = logits.shape
    rows = jnp.arange(s * kp1, dtype=jnp.int32).reshape(s, kp1)
    return verify_rows(logits.reshape(s * kp1, v), rows, drafts, num_drafts, params, positions)


def adjust_logits(logits, mask=None, bias_ids=None, bias_vals=None):
    """logits [S, K+1, V] plus the additive bias (bias_ids/bias_vals [S, K+1, P]), then every token
    whose bit in mask [S, K+1, ceil(V/32)] (int32 words) is 0 set to -1e30."""
    logits = logits.astype(jnp.float32)
    if bias_ids is not None:
        s, kp1, _ = bias_ids.shape
        logits = logits.at[jnp.arange(s)[:, None, None], jnp.arange(kp1)[None, :, None], bias_ids].add(bias_vals)
    if mask is not None:
        vocab = jnp.arange(logits.shape[-1])
        bits = (mask[..., vocab // 32] >> (vocab % 32)) & 1
        logits = jnp.where(bits != 0, logits, _NEG)
    return logits


def emitted_logprobs(logits, tokens):
    """Raw logprobs of tokens [S, K+1] under logits [S, K+1, V] and the TOP_LOGPROBS best per row:
    (chosen [S, K+1] f32, top_ids [S, K+1, TOP] i32, top_logprobs [S, K+1, TOP] f32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    top_vals, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_vals


def verify_rows(logits, rows, drafts, num_drafts, params: SamplingArrays, positions, mask=None, bias_ids=None,
                bias_vals=None):
    """`verify` on logits [N, V] of which rows [S, K+1] are the verification rows.

    When every row is greedy only the argmax of the N rows is computed (no gather of [S, K+1, V]
    logits, no vocabulary sort, no PRNG); otherwise `verify_full` runs on the gathered rows. With a
    mask or a bias the rows are gathered and adjusted first (`adjust_logits`).
    """
    if mask is not None or bias_ids is not None:
        adjusted = adjust_logits(logits[rows], mask, bias_ids, bias_vals)
        return jax.lax.cond(jnp.all(params.temperature <= 0),
                            lambda: verify_greedy(greedy_tokens(adjusted), drafts,
                                                  num_drafts),
                            lambda: verify_full(adjusted, drafts, num_drafts, params, positions))
    return jax.lax.cond(jnp.all(params.temperature <= 0),
                        lambda: verify_greedy(greedy_tokens(logits)[rows], drafts,
                                              num_drafts),
                        lambda: verify_full(logits[rows], drafts, num_drafts, params, positions))


def _draft_matrix(drafts):
    return jnp.pad(drafts, ((0, 0), (0, 1)))  # [S, K+1]; the last column is never a draft


def _emit(d, num_acc, extra):
    """tokens [S, K+1]: the accepted drafts, then `extra` at index num_acc, then zeros."""
    idx = jnp.arange(d.shape[1])[None, :]
    tokens = jnp.where(idx < num_acc[:, None], d, jnp.where(idx == num_acc[:, None], extra[:, None], 0))
    return tokens.astype(jnp.int32), (num_acc + 1).astype(jnp.int32)


def _num_accepted(ok, num_drafts):
    """Length of the leading run of accepted drafts (ok [S, K+1], drafts only below num_drafts)."""
    s, kp1 = ok.shape
    ok = ok & (jnp.arange(kp1)[None, :] < num_drafts[:, None])
    num_acc = jnp.argmin(jnp.concatenate([ok, jnp.zeros((s, 1), bool)], axis=1), axis=1)
    return jnp.minimum(num_acc, kp1 - 1)


def verify_greedy(target, drafts, num_drafts):
    """Greedy verification from the target's argmax tokens [S, K+1]: the longest agreeing prefix
    of the drafts plus the target's token after it."""
    d = _draft_matrix(drafts)
    num_acc = _num_accepted(d == target, num_drafts)
    return _emit(d, num_acc, jnp.take_along_axis(target, num_acc[:, None], axis=1)[:, 0])


def verify_full(logits, drafts, num_drafts, params: SamplingArrays, positions):
    """`verify` for any mix of greedy and sampled rows (filters, PRNG, rejection sampling)."""
    s, kp1, v = logits.shape
    flat = logits.reshape(s * kp1, v)
    rep = lambda a: jnp.repeat(a, kp1)  # noqa: E731
    logp = filtered_log_probs(flat, rep(params.temperature), rep(params.top_k), rep(params.top_p))
    logp = logp.reshape(s, kp1, v)
    greedy = params.temperature <= 0
    argmax = greedy_tokens(logits)  # [S, K+1]
    pos = positions[:, None] + jnp.arange(kp1)[None, :]  # position each row predicts
    seeds = jnp.repeat(params.seed, kp1)
    u_keys = _row_keys(seeds, pos.reshape(-1), 1)
    u = jax.vmap(jax.random.uniform)(u_keys).reshape(s, kp1)
    d = _draft_matrix(drafts)
    p_d = jnp.exp(jnp.take_along_axis(logp, d[..., None], axis=-1)[..., 0])
    num_acc = _num_accepted(jnp.where(greedy[:, None], d == argmax, u < p_d), num_drafts)
    # The extra token at index num_acc: residual draw after a rejection, plain draw after all accepted.
    rejected = num_acc < num_drafts
    row_logp = jnp.take_along_axis(logp, num_acc[:, None, None], axis=1)[:, 0]  # [S, V]
    row_d = jnp.take_along_axis(d, num_acc[:, None], axis=1)[:, 0]
    residual = jnp.where(rejected[:, None] & (jnp.arange(v)[None, :] == row_d[:, None]), _NEG, row_logp)
    x_keys = _row_keys(params.seed, positions + num_acc, 2)
    drawn = jax.vmap(lambda kk, lp: jax.random.categorical(kk, lp))(x_keys, residual)
    row_argmax = jnp.take_along_axis(argmax, num_acc[:, None], axis=1)[:, 0]
    return _emit(d, num_acc, jnp.where(greedy, row_argmax, drawn))
