/* Compiled hot paths of SAMDrafter (agentinfer_jax/speculation/sam_drafter.py).
 *
 * `score(...)` is `_score_last_proposal` (calibrator updates from the verified tokens) and
 * `feed(...)` is `Matcher.feed_many`. `walk(...)` is the part of `propose` after the cursors are found: score every cursor's first
 * token, then extend candidates best first along each automaton's most frequent continuations,
 * abandoning a candidate once it cannot beat the best draft. It reads the same Python objects as
 * the Python code (the automata's `top_table` lists, the calibrator's complex-valued tables) and
 * returns exactly what the Python code computes: the same float operations in the same order
 * (built with -ffp-contract=off, so no fused multiply-adds change a rounding). The Python version
 * stays the reference; tests compare the two on random inputs and on replays.
 *
 * Why compiled: a drafting step sits on every verify step's critical path, and in Python it is
 * mostly interpreter overhead and cache misses on boxed ints; here it is a few reads per token.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_STACK_HEADS 16

static PyObject *str_top_table; /* interned "top_table" */

typedef struct {
    double q;          /* first token's probability */
    long src;          /* source id (0 own, 1 memory, 2 global) */
    PyObject *tops;    /* the automaton's top_table list (new reference) */
    long long st;      /* state after the first token */
    long long length;  /* match length + 1 */
    long long tok;     /* first token */
    long long cell;    /* first token's calibrator cell */
} Head;

static inline long long bit_length(unsigned long long x) {
    return x ? 64 - __builtin_clzll(x) : 0;
}

/* AcceptanceCalibrator.cell, with the Python tables' behaviour (IndexError where _PART has no
 * entry: a share above its total). */
static int cell_index(long src, long long length, long long n, long long total, long long *out) {
    if (length < 0 || total < 0 || n < 0 || (total < 128 && n > total)) {
        PyErr_SetString(PyExc_IndexError, "top continuation with count outside its total");
        return -1;
    }
    long long lb = bit_length((unsigned long long)length), tb = bit_length((unsigned long long)total);
    long long share = n == total ? 4 : 4 * n / total;
    *out = (long long)src * 320 + 40 * (lb < 7 ? lb : 7) + 5 * (tb < 7 ? tb : 7) + share;
    return 0;
}

/* top_table[st] as (token, child, n, total): 1, None: 0, error: -1. */
static int read_top(PyObject *tops, long long st, long long *tok, long long *child, long long *n,
                    long long *total) {
    if (st < 0 || st >= PyList_GET_SIZE(tops)) {
        PyErr_SetString(PyExc_IndexError, "automaton state out of range");
        return -1;
    }
    PyObject *t = PyList_GET_ITEM(tops, st);
    if (t == Py_None) return 0;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
        PyErr_SetString(PyExc_TypeError, "top_table entries must be 4-tuples or None");
        return -1;
    }
    *tok = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 0));
    *child = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
    *n = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
    *total = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
    if ((*tok == -1 || *child == -1 || *n == -1 || *total == -1) && PyErr_Occurred()) return -1;
    return 1;
}

/* accepted + trials * 1j of a table entry. */
static inline void stats_of(PyObject *v, double *acc, double *trials) {
    if (PyComplex_CheckExact(v)) {
        Py_complex c = ((PyComplexObject *)v)->cval;
        *acc = c.real;
        *trials = c.imag;
    } else {
        *acc = PyComplex_RealAsDouble(v);
        *trials = PyComplex_ImagAsDouble(v);
    }
}

/* A Python int from a non-negative 128-bit key (keys pack up to three token ids). */
static PyObject *key_object(unsigned __int128 key) {
    if (key >> 64 == 0) return PyLong_FromUnsignedLongLong((unsigned long long)key);
    PyObject *hi = PyLong_FromUnsignedLongLong((unsigned long long)(key >> 64));
    PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)key);
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *shifted = hi && sixty_four ? PyNumber_Lshift(hi, sixty_four) : NULL;
    PyObject *out = shifted && lo ? PyNumber_Or(shifted, lo) : NULL;
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(sixty_four);
    Py_XDECREF(shifted);
    return out;
}

/* dict.get(key) as (accepted, trials): 1 found, 0 absent, -1 error. */
static int lookup(PyObject *dict, unsigned __int128 key, double *acc, double *trials) {
    PyObject *k = key_object(key);
    if (k == NULL) return -1;
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL) return PyErr_Occurred() ? -1 : 0;
    stats_of(v, acc, trials);
    if (PyErr_Occurred()) return -1;
    return 1;
}

/* The cell's estimate: (accepted + w * n / (total + 1)) / (trials + w), as in Python. */
static int cell_prob(PyObject *cells, long long c, double w, long long n, long long total, double *q) {
    if (c >= PyList_GET_SIZE(cells)) {
        PyErr_SetString(PyExc_IndexError, "calibrator cell out of range");
        return -1;
    }
    double acc, trials;
    stats_of(PyList_GET_ITEM(cells, c), &acc, &trials);
    if (PyErr_Occurred()) return -1;
    *q = (acc + w * (double)n / (double)(total + 1)) / (trials + w);
    return 0;
}

/* Appends a C integer to a list. */
static int append_int(PyObject *list, long long v) {
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL) return -1;
    int rc = PyList_Append(list, o);
    Py_DECREF(o);
    return rc;
}

static unsigned __int128 u(long long v) { return (unsigned __int128)(unsigned long long)v; }

PyDoc_STRVAR(walk_doc,
"walk(cursors, limit, cells, prior_weight, first_last, pair, context, context_weight, token_context,\n"
"     context_positions, last, last2, min_prob) -> (draft, candidates, expected)\n\n"
"SAMDrafter.propose's candidate search (see sam_drafter.py): cursors are (source, automaton, state,\n"
"match length) tuples; returns the draft, every candidate's (source, tokens, cells) for scoring,\n"
"and the draft's expected accepted tokens.");

static PyObject *walk(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "walk() takes 13 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *cursors = args[0], *cells = args[2], *first_last = args[4], *pair = args[5],
             *context = args[6];
    if (!PyList_Check(cursors) || !PyList_Check(cells) || !PyDict_Check(pair) || !PyDict_Check(context)
        || (first_last != Py_None && !PyDict_Check(first_last))) {
        PyErr_SetString(PyExc_TypeError, "walk(): cursors and cells must be lists, the tables dicts");
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[1]);
    double w = PyFloat_AsDouble(args[3]), wc = PyFloat_AsDouble(args[7]);
    int use_ctx = PyObject_IsTrue(args[8]);
    long long ctx_stop = PyLong_AsLongLong(args[9]), last = PyLong_AsLongLong(args[10]);
    long long last2 = PyLong_AsLongLong(args[11]);
    double min_prob = PyFloat_AsDouble(args[12]);
    if (PyErr_Occurred()) return NULL;

    Py_ssize_t num = PyList_GET_SIZE(cursors), num_heads = 0;
    Head stack_heads[MAX_STACK_HEADS];
    Head *heads = num <= MAX_STACK_HEADS ? stack_heads : PyMem_Malloc(num * sizeof(Head));
    if (heads == NULL) return PyErr_NoMemory();
    PyObject *best = NULL, *candidates = NULL, *toks = NULL, *cell_list = NULL, *result = NULL;
    /* context_key's prefix for first tokens: ((last2 + 1) << 21 | (last + 1)) << 21 */
    unsigned __int128 ctx_base = (u(last2 + 1) << 21 | u(last + 1)) << 21;

    for (Py_ssize_t i = 0; i < num; i++) {
        PyObject *cur = PyList_GET_ITEM(cursors, i);
        if (!PyTuple_Check(cur) || PyTuple_GET_SIZE(cur) != 4) {
            PyErr_SetString(PyExc_TypeError, "cursors must be (source, automaton, state, length)");
            goto done;
        }
        long src = PyLong_AsLong(PyTuple_GET_ITEM(cur, 0));
        long long st = PyLong_AsLongLong(PyTuple_GET_ITEM(cur, 2));
        long long length = PyLong_AsLongLong(PyTuple_GET_ITEM(cur, 3));
        if (PyErr_Occurred()) goto done;
        if (src < 0 || src > 2) {
            PyErr_SetString(PyExc_ValueError, "source must be 0, 1 or 2");
            goto done;
        }
        PyObject *tops = PyObject_GetAttr(PyTuple_GET_ITEM(cur, 1), str_top_table);
        if (tops == NULL) goto done;
        if (!PyList_Check(tops)) {
            Py_DECREF(tops);
            PyErr_SetString(PyExc_TypeError, "top_table must be a list");
            goto done;
        }
        long long tok, child, n, total, c;
        int r = read_top(tops, st, &tok, &child, &n, &total);
        if (r <= 0) {
            Py_DECREF(tops);
            if (r < 0) goto done;
            continue;
        }
        double q, acc, trials;
        if (cell_index(src, length, n, total, &c) < 0 || cell_prob(cells, c, w, n, total, &q) < 0) {
            Py_DECREF(tops);
            goto done;
        }
        if (first_last != Py_None) {
            r = lookup(first_last, u(tok) * 3 + (unsigned)src, &acc, &trials);
            if (r < 0) { Py_DECREF(tops); goto done; }
            if (r) q = (acc + w * q) / (trials + w);
        }
        if (use_ctx) {
            r = lookup(context, (ctx_base | u(tok)) * 3 + (unsigned)src, &acc, &trials);
            if (r < 0) { Py_DECREF(tops); goto done; }
            if (r) q = (acc + wc * q) / (trials + wc);
        }
        Head h = {q, src, tops, child, length + 1, tok, c};
        /* Stable insertion by probability, highest first: Python sorts (-q, i, ...). */
        Py_ssize_t j = num_heads++;
        while (j > 0 && -heads[j - 1].q > -q) {
            heads[j] = heads[j - 1];
            j--;
        }
        heads[j] = h;
    }

    best = PyList_New(0);
    candidates = PyList_New(0);
    if (best == NULL || candidates == NULL) goto done;
    double best_score = 0.0;
    for (Py_ssize_t i = 0; i < num_heads; i++) {
        Head *h = &heads[i];
        double p = h->q;
        toks = PyList_New(0);
        cell_list = PyList_New(0);
        if (toks == NULL || cell_list == NULL || append_int(toks, h->tok) < 0
            || append_int(cell_list, h->cell) < 0)
            goto done;
        PyObject *cand = Py_BuildValue("(lOO)", h->src, toks, cell_list);
        if (cand == NULL || PyList_Append(candidates, cand) < 0) {
            Py_XDECREF(cand);
            goto done;
        }
        Py_DECREF(cand);
        if (p < min_prob || p * (double)limit <= best_score) {
            Py_CLEAR(toks);
            Py_CLEAR(cell_list);
            continue; /* scored from its first token only */
        }
        double score = p;
        Py_ssize_t keep = 1;
        long long st = h->st, length = h->length, prev2 = last, prev = h->tok;
        long long offset = length - 1, stop = limit + offset;
        long long ctx_end = use_ctx ? ctx_stop + offset : 0;
        while (length < stop && score + p * (double)(stop - length) > best_score) {
            long long tok, n, total, c;
            int r = read_top(h->tops, st, &tok, &st, &n, &total);
            if (r < 0) goto done;
            if (r == 0) break;
            double q, acc, trials;
            if (cell_index(h->src, length, n, total, &c) < 0 || cell_prob(cells, c, w, n, total, &q) < 0)
                goto done;
            if (length < ctx_end) {
                r = lookup(pair, (u(prev + 1) << 21 | u(tok)) * 3 + (unsigned)h->src, &acc, &trials);
                if (r < 0) goto done;
                if (r) q = (acc + w * q) / (trials + w);
                r = lookup(context, ((u(prev2 + 1) << 21 | u(prev + 1)) << 21 | u(tok)) * 3 + (unsigned)h->src,
                           &acc, &trials);
                if (r < 0) goto done;
                if (r) q = (acc + wc * q) / (trials + wc);
                prev2 = prev;
                prev = tok;
            }
            p *= q;
            length += 1;
            if (append_int(toks, tok) < 0 || append_int(cell_list, c) < 0) goto done;
            if (p < min_prob) break;
            score += p;
            keep += 1;
        }
        if (score > best_score) {
            best_score = score;
            PyObject *slice = PyList_GetSlice(toks, 0, keep);
            if (slice == NULL) goto done;
            Py_SETREF(best, slice);
        }
        Py_CLEAR(toks);
        Py_CLEAR(cell_list);
    }
    result = Py_BuildValue("(OOd)", best, candidates, best_score);

done:
    for (Py_ssize_t i = 0; i < num_heads; i++) Py_DECREF(heads[i].tops);
    if (heads != stack_heads) PyMem_Free(heads);
    Py_XDECREF(toks);
    Py_XDECREF(cell_list);
    Py_XDECREF(best);
    Py_XDECREF(candidates);
    return result;
}

/* table[key] = old + (ok + 1j) with old = table.get(key, 0j); a missing key is only added while
 * the table holds fewer than max_keys keys (AcceptanceCalibrator._update_flat). */
static int update_flat(PyObject *table, PyObject *key, int ok, Py_ssize_t max_keys) {
    PyObject *old = PyDict_GetItemWithError(table, key);
    double acc = 0.0, trials = 0.0;
    if (old == NULL) {
        if (PyErr_Occurred()) return -1;
        if (PyDict_GET_SIZE(table) >= max_keys) return 0;
    } else {
        stats_of(old, &acc, &trials);
        if (PyErr_Occurred()) return -1;
    }
    PyObject *v = PyComplex_FromDoubles(acc + ok, trials + 1.0);
    if (v == NULL) return -1;
    int rc = PyDict_SetItem(table, key, v);
    Py_DECREF(v);
    return rc;
}

static int update_flat_key(PyObject *table, unsigned __int128 key, int ok, Py_ssize_t max_keys) {
    PyObject *k = key_object(key);
    if (k == NULL) return -1;
    int rc = update_flat(table, k, ok, max_keys);
    Py_DECREF(k);
    return rc;
}

PyDoc_STRVAR(score_doc,
"score(candidates, verified, cells, first, pair, context, last, last2, context_positions, max_keys,\n"
"      first_size) -> first_size\n\n"
"SAMDrafter._score_last_proposal: updates the calibrator's tables in place from the verified\n"
"tokens; returns the first-token table's new key count.");

static PyObject *score(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "score() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *candidates = args[0], *verified = args[1], *cells = args[2], *first = args[3],
             *pair = args[4], *context = args[5];
    if (!PyList_Check(candidates) || !PyList_Check(verified) || !PyList_Check(cells) || !PyDict_Check(first)
        || !PyDict_Check(pair) || !PyDict_Check(context)) {
        PyErr_SetString(PyExc_TypeError, "score(): candidates, verified and cells must be lists, the tables dicts");
        return NULL;
    }
    long long last = PyLong_AsLongLong(args[6]), last2 = PyLong_AsLongLong(args[7]);
    Py_ssize_t ctx_n = PyLong_AsSsize_t(args[8]), max_keys = PyLong_AsSsize_t(args[9]);
    Py_ssize_t first_size = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t num_verified = PyList_GET_SIZE(verified);
    PyObject *last_obj = PyLong_FromLongLong(last);
    if (last_obj == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(candidates); i++) {
        PyObject *cand = PyList_GET_ITEM(candidates, i);
        if (!PyTuple_Check(cand) || PyTuple_GET_SIZE(cand) != 3 || !PyList_Check(PyTuple_GET_ITEM(cand, 1))
            || !PyList_Check(PyTuple_GET_ITEM(cand, 2))) {
            PyErr_SetString(PyExc_TypeError, "candidates must be (source, tokens, cells) with lists");
            goto error;
        }
        long src = PyLong_AsLong(PyTuple_GET_ITEM(cand, 0));
        if (src == -1 && PyErr_Occurred()) goto error;
        PyObject *path = PyTuple_GET_ITEM(cand, 1), *path_cells = PyTuple_GET_ITEM(cand, 2);
        Py_ssize_t n = PyList_GET_SIZE(path);
        if (PyList_GET_SIZE(path_cells) < n) n = PyList_GET_SIZE(path_cells);
        if (num_verified < n) n = num_verified;
        if (PyList_GET_SIZE(path) > 0 && num_verified > 0) {  /* update_first */
            long long tok = PyLong_AsLongLong(PyList_GET_ITEM(path, 0));
            int ok = PyObject_RichCompareBool(PyList_GET_ITEM(path, 0), PyList_GET_ITEM(verified, 0), Py_EQ);
            if ((tok == -1 && PyErr_Occurred()) || ok < 0) goto error;
            PyObject *inner = PyDict_GetItemWithError(first, last_obj);
            if (inner == NULL && PyErr_Occurred()) goto error;
            PyObject *key = key_object(u(tok) * 3 + (unsigned)src);
            if (key == NULL) goto error;
            PyObject *old = inner != NULL ? PyDict_GetItemWithError(inner, key) : NULL;
            if (old == NULL && PyErr_Occurred()) { Py_DECREF(key); goto error; }
            int rc = 0;
            double acc = 0.0, trials = 0.0;
            if (old != NULL) {
                stats_of(old, &acc, &trials);
            } else if (first_size >= max_keys) {
                rc = 1;  /* bounded: a full table keeps what it has learned */
            } else {
                if (inner == NULL) {
                    inner = PyDict_New();
                    if (inner == NULL || PyDict_SetItem(first, last_obj, inner) < 0) {
                        Py_XDECREF(inner);
                        Py_DECREF(key);
                        goto error;
                    }
                    Py_DECREF(inner);  /* first holds it */
                }
                first_size++;
            }
            if (rc == 0) {
                PyObject *v = PyErr_Occurred() ? NULL : PyComplex_FromDoubles(acc + ok, trials + 1.0);
                rc = v == NULL ? -1 : PyDict_SetItem(inner, key, v);
                Py_XDECREF(v);
            }
            Py_DECREF(key);
            if (rc < 0) goto error;
        }
        long long prev2 = last2, prev = last;
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *tok_obj = PyList_GET_ITEM(path, j);
            long long c = PyLong_AsLongLong(PyList_GET_ITEM(path_cells, j));
            long long tok = PyLong_AsLongLong(tok_obj);
            int ok = PyObject_RichCompareBool(tok_obj, PyList_GET_ITEM(verified, j), Py_EQ);
            if (((c == -1 || tok == -1) && PyErr_Occurred()) || ok < 0) goto error;
            if (c < 0 || c >= PyList_GET_SIZE(cells)) {
                PyErr_SetString(PyExc_IndexError, "calibrator cell out of range");
                goto error;
            }
            double acc, trials;
            stats_of(PyList_GET_ITEM(cells, c), &acc, &trials);
            PyObject *v = PyErr_Occurred() ? NULL : PyComplex_FromDoubles(acc + ok, trials + 1.0);
            if (v == NULL) goto error;
            PyList_SetItem(cells, c, v);  /* steals v */
            if (j < ctx_n) {
                if (j && update_flat_key(pair, (u(prev + 1) << 21 | u(tok)) * 3 + (unsigned)src, ok, max_keys) < 0)
                    goto error;
                if (update_flat_key(context, ((u(prev2 + 1) << 21 | u(prev + 1)) << 21 | u(tok)) * 3 + (unsigned)src,
                                    ok, max_keys) < 0)
                    goto error;
            }
            if (!ok) break;
            prev2 = prev;
            prev = tok;
        }
    }
    Py_DECREF(last_obj);
    return PyLong_FromSsize_t(first_size);
error:
    Py_DECREF(last_obj);
    return NULL;
}

static PyObject *str_sam, *str_state, *str_length, *str_next, *str_link;

PyDoc_STRVAR(feed_doc,
"feed(matcher, tokens)\n\nMatcher.feed_many: advances the matcher's (state, length) over tokens.");

static PyObject *feed(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "feed(matcher, tokens: list)");
        return NULL;
    }
    PyObject *matcher = args[0], *tokens = args[1];
    PyObject *sam = NULL, *nxt = NULL, *link = NULL, *lengths = NULL, *result = NULL;
    sam = PyObject_GetAttr(matcher, str_sam);
    if (sam == NULL) goto done;
    nxt = PyObject_GetAttr(sam, str_next);
    link = nxt ? PyObject_GetAttr(sam, str_link) : NULL;
    lengths = link ? PyObject_GetAttr(sam, str_length) : NULL;
    if (lengths == NULL) goto done;
    if (!PyList_Check(nxt) || !PyList_Check(link) || !PyList_Check(lengths)) {
        PyErr_SetString(PyExc_TypeError, "automaton next/link/length must be lists");
        goto done;
    }
    PyObject *st_obj = PyObject_GetAttr(matcher, str_state);
    if (st_obj == NULL) goto done;
    long long state = PyLong_AsLongLong(st_obj);
    Py_DECREF(st_obj);
    PyObject *len_obj = PyObject_GetAttr(matcher, str_length);
    if (len_obj == NULL) goto done;
    long long length = PyLong_AsLongLong(len_obj);
    Py_DECREF(len_obj);
    if (PyErr_Occurred()) goto done;
    Py_ssize_t num_states = PyList_GET_SIZE(nxt);
    if (PyList_GET_SIZE(link) != num_states || PyList_GET_SIZE(lengths) != num_states) {
        PyErr_SetString(PyExc_ValueError, "automaton arrays differ in length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tokens); i++) {
        PyObject *token = PyList_GET_ITEM(tokens, i), *child = NULL;
        for (;;) {  /* advance(): the longest suffix of (match + token) in the automaton's text */
            if (state < 0 || state >= num_states || !PyDict_Check(PyList_GET_ITEM(nxt, state))) {
                PyErr_SetString(PyExc_IndexError, "matcher state out of range");
                goto done;
            }
            child = PyDict_GetItemWithError(PyList_GET_ITEM(nxt, state), token);
            if (child == NULL && PyErr_Occurred()) goto done;
            if (child != NULL || state == 0) break;
            state = PyLong_AsLongLong(PyList_GET_ITEM(link, state));
            if (state < 0 || state >= num_states) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "suffix link out of range");
                goto done;
            }
            length = PyLong_AsLongLong(PyList_GET_ITEM(lengths, state));
            if (length == -1 && PyErr_Occurred()) goto done;
        }
        if (child == NULL) {
            state = 0;
            length = 0;
        } else {
            state = PyLong_AsLongLong(child);
            length += 1;
            if (state == -1 && PyErr_Occurred()) goto done;
        }
    }
    PyObject *s = PyLong_FromLongLong(state), *l = PyLong_FromLongLong(length);
    if (s != NULL && l != NULL && PyObject_SetAttr(matcher, str_state, s) == 0
        && PyObject_SetAttr(matcher, str_length, l) == 0) {
        result = Py_None;
        Py_INCREF(result);
    }
    Py_XDECREF(s);
    Py_XDECREF(l);
done:
    Py_XDECREF(sam);
    Py_XDECREF(nxt);
    Py_XDECREF(link);
    Py_XDECREF(lengths);
    return result;
}

/* ---- frozen automaton construction (SuffixAutomaton.frozen_of) ------------------------------ */

/* Transitions during construction: an open-addressing map (state, token) -> edge and, per state,
 * its edges in insertion order (a Python dict's iteration order, which the top scan's ties and
 * the finished dicts must reproduce). */
typedef struct {
    long long *tok;        /* per edge */
    long long *target;     /* per edge */
    long long *next_edge;  /* per edge: the state's next edge, -1 at its end */
    long long *head, *tail; /* per state: first and last edge, -1 if none */
    long long num_edges, max_edges;
    long long *slot_edge;  /* map: edge index or -1 */
    long long *slot_state;
    unsigned long long mask;
} Edges;

static inline unsigned long long mix(long long state, long long token) {
    unsigned long long h = (unsigned long long)state * 0x9E3779B97F4A7C15ULL ^ (unsigned long long)token;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 29);
}

static long long edge_find(const Edges *e, long long state, long long token) {
    unsigned long long i = mix(state, token) & e->mask;
    for (;;) {
        long long k = e->slot_edge[i];
        if (k < 0) return -1;
        if (e->slot_state[i] == state && e->tok[k] == token) return k;
        i = (i + 1) & e->mask;
    }
}

static int edge_add(Edges *e, long long state, long long token, long long target) {
    if (e->num_edges >= e->max_edges) {
        PyErr_SetString(PyExc_RuntimeError, "suffix automaton edge bound exceeded");
        return -1;
    }
    long long k = e->num_edges++;
    e->tok[k] = token;
    e->target[k] = target;
    e->next_edge[k] = -1;
    if (e->tail[state] < 0) e->head[state] = k; else e->next_edge[e->tail[state]] = k;
    e->tail[state] = k;
    unsigned long long i = mix(state, token) & e->mask;
    while (e->slot_edge[i] >= 0) i = (i + 1) & e->mask;
    e->slot_edge[i] = k;
    e->slot_state[i] = state;
    return 0;
}

static PyObject *list_of(const long long *v, long long n) {
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (out == NULL) return NULL;
    for (long long i = 0; i < n; i++) {
        PyObject *o = PyLong_FromLongLong(v[i]);
        if (o == NULL) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, o);
    }
    return out;
}

PyDoc_STRVAR(build_frozen_doc,
"build_frozen(tokens) -> (tokens, next, link, length, first_end, last_end, count, top_table, last,\n"
"                         match_end)\n\n"
"The fields of SuffixAutomaton(tokens, count_depth=1, track_top=False).freeze(), built in C.");

static PyObject *build_frozen(PyObject *module, PyObject *arg) {
    (void)module;
    PyObject *seq = PySequence_Fast(arg, "build_frozen() needs a sequence of ints");
    if (seq == NULL) return NULL;
    long long n = PySequence_Fast_GET_SIZE(seq);
    long long max_states = 2 * n + 2, max_edges = 3 * n + 8;
    unsigned long long cap = 16;
    while (cap < 2ULL * (unsigned long long)max_edges) cap <<= 1;
    long long *toks = PyMem_Malloc(sizeof(long long) * (n + 1));
    long long *link = PyMem_Malloc(sizeof(long long) * max_states);
    long long *len = PyMem_Malloc(sizeof(long long) * max_states);
    long long *first_end = PyMem_Malloc(sizeof(long long) * max_states);
    long long *online_last = PyMem_Malloc(sizeof(long long) * max_states);
    long long *count = PyMem_Malloc(sizeof(long long) * max_states);
    long long *last_end = PyMem_Malloc(sizeof(long long) * max_states);
    long long *bucket = PyMem_Malloc(sizeof(long long) * (n + 2));
    long long *order = PyMem_Malloc(sizeof(long long) * max_states);
    Edges e = {PyMem_Malloc(sizeof(long long) * max_edges), PyMem_Malloc(sizeof(long long) * max_edges),
               PyMem_Malloc(sizeof(long long) * max_edges), PyMem_Malloc(sizeof(long long) * max_states),
               PyMem_Malloc(sizeof(long long) * max_states), 0, max_edges,
               PyMem_Malloc(sizeof(long long) * cap), PyMem_Malloc(sizeof(long long) * cap), cap - 1};
    PyObject *result = NULL, *py_next = NULL, *py_top = NULL, *py_tokens = NULL;
    PyObject *py_link = NULL, *py_len = NULL, *py_first = NULL, *py_last = NULL, *py_count = NULL;
    if (!toks || !link || !len || !first_end || !online_last || !count || !last_end || !bucket || !order
        || !e.tok || !e.target || !e.next_edge || !e.head || !e.tail || !e.slot_edge || !e.slot_state) {
        PyErr_NoMemory();
        goto done;
    }
    for (unsigned long long i = 0; i < cap; i++) e.slot_edge[i] = -1;
    for (long long i = 0; i < n; i++) {
        toks[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (toks[i] == -1 && PyErr_Occurred()) goto done;
    }
    /* state 0 = root */
    long long num_states = 1, last = 0, match_end = -1;
    link[0] = -1; len[0] = 0; first_end[0] = -1; online_last[0] = -1; e.head[0] = e.tail[0] = -1;
    for (long long pos = 0; pos < n; pos++) {  /* SuffixAutomaton.extend */
        long long token = toks[pos], cur = num_states++;
        len[cur] = len[last] + 1; link[cur] = 0; first_end[cur] = online_last[cur] = pos;
        e.head[cur] = e.tail[cur] = -1;
        long long p = last, k = -1;
        while (p != -1 && (k = edge_find(&e, p, token)) < 0) {
            if (edge_add(&e, p, token, cur) < 0) goto done;
            p = link[p];
        }
        if (p != -1) {
            long long q = e.target[k];
            if (len[p] + 1 == len[q]) {
                link[cur] = q;
            } else {
                long long clone = num_states++;
                len[clone] = len[p] + 1; link[clone] = link[q];
                first_end[clone] = first_end[q]; online_last[clone] = online_last[q];
                e.head[clone] = e.tail[clone] = -1;
                for (long long j = e.head[q]; j >= 0; j = e.next_edge[j])
                    if (edge_add(&e, clone, e.tok[j], e.target[j]) < 0) goto done;
                while (p != -1) {
                    k = edge_find(&e, p, token);
                    if (k < 0 || e.target[k] != q) break;
                    e.target[k] = clone;
                    p = link[p];
                }
                link[q] = clone;
                link[cur] = clone;
            }
        }
        last = cur;
        long long match = link[cur];  /* the self-match and its count_depth = 1 credit */
        match_end = match != 0 ? online_last[match] : -1;
        if (match > 0) online_last[match] = pos;
    }
    /* freeze(): exact counts and last ends up the suffix-link tree, longest states first */
    for (long long s = 0; s < num_states; s++) {
        count[s] = s > 0 && len[s] == first_end[s] + 1;
        last_end[s] = first_end[s];
    }
    for (long long i = 0; i <= n + 1; i++) bucket[i] = 0;
    for (long long s = 1; s < num_states; s++) bucket[len[s]]++;
    for (long long i = 1; i <= n + 1; i++) bucket[i] += bucket[i - 1];
    for (long long s = num_states - 1; s >= 1; s--) order[--bucket[len[s]]] = s;
    for (long long i = num_states - 2; i >= 0; i--) {
        long long s = order[i], parent = link[s];
        if (parent > 0) {
            count[parent] += count[s];
            if (last_end[s] > last_end[parent]) last_end[parent] = last_end[s];
        }
    }
    count[0] = n + 1;
    py_next = PyList_New((Py_ssize_t)num_states);
    py_top = PyList_New((Py_ssize_t)num_states);
    if (py_next == NULL || py_top == NULL) goto done;
    for (long long s = 0; s < num_states; s++) {
        PyObject *d = PyDict_New();
        if (d == NULL) goto done;
        PyList_SET_ITEM(py_next, s, d);
        long long best_tok = -1, best_child = -1, best = 0, total = 0;
        for (long long j = e.head[s]; j >= 0; j = e.next_edge[j]) {
            PyObject *kt = PyLong_FromLongLong(e.tok[j]), *vt = PyLong_FromLongLong(e.target[j]);
            int rc = kt && vt ? PyDict_SetItem(d, kt, vt) : -1;
            Py_XDECREF(kt);
            Py_XDECREF(vt);
            if (rc < 0) goto done;
            long long c = count[e.target[j]];  /* _scan_top */
            total += c;
            if (e.tok[j] >= 0 && c > best) { best_tok = e.tok[j]; best_child = e.target[j]; best = c; }
        }
        PyObject *t = best_child >= 0 ? Py_BuildValue("(LLLL)", best_tok, best_child, best, total) : Py_None;
        if (t == NULL) goto done;
        if (t == Py_None) Py_INCREF(t);
        PyList_SET_ITEM(py_top, s, t);
    }
    py_tokens = list_of(toks, n);
    py_link = list_of(link, num_states);
    py_len = list_of(len, num_states);
    py_first = list_of(first_end, num_states);
    py_last = list_of(last_end, num_states);
    py_count = list_of(count, num_states);
    if (py_tokens && py_link && py_len && py_first && py_last && py_count)
        result = Py_BuildValue("(OOOOOOOOLL)", py_tokens, py_next, py_link, py_len, py_first, py_last,
                               py_count, py_top, last, match_end);
done:
    Py_XDECREF(py_next); Py_XDECREF(py_top); Py_XDECREF(py_tokens); Py_XDECREF(py_link);
    Py_XDECREF(py_len); Py_XDECREF(py_first); Py_XDECREF(py_last); Py_XDECREF(py_count);
    PyMem_Free(toks); PyMem_Free(link); PyMem_Free(len); PyMem_Free(first_end); PyMem_Free(online_last);
    PyMem_Free(count); PyMem_Free(last_end); PyMem_Free(bucket); PyMem_Free(order);
    PyMem_Free(e.tok); PyMem_Free(e.target); PyMem_Free(e.next_edge); PyMem_Free(e.head);
    PyMem_Free(e.tail); PyMem_Free(e.slot_edge); PyMem_Free(e.slot_state);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, walk_doc},
    {"score", (PyCFunction)(void (*)(void))score, METH_FASTCALL, score_doc},
    {"feed", (PyCFunction)(void (*)(void))feed, METH_FASTCALL, feed_doc},
    {"build_frozen", build_frozen, METH_O, build_frozen_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_sam_native",
    "Compiled hot paths of SAMDrafter (the Python code is the reference).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sam_native(void) {
    str_top_table = PyUnicode_InternFromString("top_table");
    str_sam = PyUnicode_InternFromString("sam");
    str_state = PyUnicode_InternFromString("state");
    str_length = PyUnicode_InternFromString("length");
    str_next = PyUnicode_InternFromString("next");
    str_link = PyUnicode_InternFromString("link");
    if (!str_top_table || !str_sam || !str_state || !str_length || !str_next || !str_link) return NULL;
    return PyModule_Create(&module_def);
}
