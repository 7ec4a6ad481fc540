/* Compiled hot paths of SAMDrafter (agentinfer_jax/speculation/sam_drafter.py).
 *
 * - `walk(...)`: the part of `propose` after the cursors are found. It scores every cursor's first
 *   token, then extends candidates best first along each automaton's most frequent
 *   continuations, abandoning a candidate once it cannot beat the best draft.
 * - `score(...)`: `_score_last_proposal` (calibrator updates from the verified tokens).
 * - `feed(...)`: `Matcher.feed_many`.
 * - `extend_many(...)`: `SuffixAutomaton.extend_many`, the online construction on the automaton's
 *   own lists.
 * - `build_frozen(...)`: `SuffixAutomaton.frozen_of`.
 *
 * They read and write the same Python objects as the Python code (the automata's lists, the
 * calibrator's complex-valued tables) and compute exactly what it computes: the same float
 * operations in the same order (built with -ffp-contract=off, so no fused multiply-adds change a
 * rounding). The Python version stays the reference; tests compare the two on random inputs and
 * on replays.
 *
 * Why compiled: a drafting step sits on every verify step's critical path, and in Python it is
 * mostly interpreter overhead and cache misses on boxed ints; here it is a few reads per token.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_STACK_HEADS 16
/* Evidence classes (sam_drafter.NUM_CLASSES): source, + AGREED when another cursor's top
   continuation starts with the same token; calibrator keys are key * NUM_CLASSES + class. */
#define NUM_SOURCES 3
#define AGREED NUM_SOURCES
#define NUM_CLASSES (2 * NUM_SOURCES)

static PyObject *str_top_table; /* interned "top_table" */

typedef struct {
    double q;          /* first token's probability */
    long src;          /* evidence class: source (0 own, 1 memory, 2 global), + 3 if agreed */
    PyObject *tops;    /* the automaton's top_table list (new reference) */
    long long st;      /* state after the first token */
    long long length;  /* match length + 1 */
    long long tok;     /* first token */
    long long cell;    /* first token's calibrator cell */
    long long n, total; /* the first token's count and its context's total */
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
"match length) tuples; returns the draft, every candidate's (evidence class, tokens, cells) for scoring,\n"
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

    /* Pass 1: every cursor's top continuation (heads[k].tops holds a reference from here on). */
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
        if (src < 0 || src >= NUM_SOURCES) {
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
        long long tok, child, n, total;
        int r = read_top(tops, st, &tok, &child, &n, &total);
        if (r <= 0) {
            Py_DECREF(tops);
            if (r < 0) goto done;
            continue;
        }
        Head h = {0.0, src, tops, child, length + 1, tok, -1, n, total};  /* q, cell: pass 2 */
        heads[num_heads++] = h;
    }
    /* Agreement: a first token that another cursor's top continuation also starts with. */
    for (Py_ssize_t i = 0; i < num_heads; i++)
        for (Py_ssize_t j = 0; j < num_heads; j++)
            if (j != i && heads[j].tok == heads[i].tok) { heads[i].src += AGREED; break; }
    /* Pass 2: first-token probabilities. */
    for (Py_ssize_t i = 0; i < num_heads; i++) {
        Head *h = &heads[i];
        double q, acc, trials;
        int r;
        if (cell_index(h->src, h->length - 1, h->n, h->total, &h->cell) < 0
            || cell_prob(cells, h->cell, w, h->n, h->total, &q) < 0)
            goto done;
        if (first_last != Py_None) {
            r = lookup(first_last, u(h->tok) * NUM_CLASSES + (unsigned)h->src, &acc, &trials);
            if (r < 0) goto done;
            if (r) q = (acc + w * q) / (trials + w);
        }
        if (use_ctx) {
            r = lookup(context, (ctx_base | u(h->tok)) * NUM_CLASSES + (unsigned)h->src, &acc, &trials);
            if (r < 0) goto done;
            if (r) q = (acc + wc * q) / (trials + wc);
        }
        h->q = q;
    }
    /* Stable insertion sort by probability, highest first: Python sorts (-q, i, ...). */
    for (Py_ssize_t i = 1; i < num_heads; i++) {
        Head h = heads[i];
        Py_ssize_t j = i;
        while (j > 0 && -heads[j - 1].q > -h.q) {
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
                r = lookup(pair, (u(prev + 1) << 21 | u(tok)) * NUM_CLASSES + (unsigned)h->src, &acc, &trials);
                if (r < 0) goto done;
                if (r) q = (acc + w * q) / (trials + w);
                r = lookup(context, ((u(prev2 + 1) << 21 | u(prev + 1)) << 21 | u(tok)) * NUM_CLASSES + (unsigned)h->src,
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
        if (src < 0 || src >= NUM_CLASSES) {
            PyErr_SetString(PyExc_ValueError, "candidate evidence class must be in 0..5");
            goto error;
        }
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
            PyObject *key = key_object(u(tok) * NUM_CLASSES + (unsigned)src);
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
                if (j && update_flat_key(pair, (u(prev + 1) << 21 | u(tok)) * NUM_CLASSES + (unsigned)src, ok, max_keys) < 0)
                    goto error;
                if (update_flat_key(context, ((u(prev2 + 1) << 21 | u(prev + 1)) << 21 | u(tok)) * NUM_CLASSES + (unsigned)src,
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

/* ---- online construction (SuffixAutomaton.extend_many) -------------------------------------- */

/* Integer list items, read and written in place. */
static inline int get_ll(PyObject *list, long long i, long long *out) {
    if (i < 0 || i >= PyList_GET_SIZE(list)) {
        PyErr_SetString(PyExc_IndexError, "automaton state out of range");
        return -1;
    }
    *out = PyLong_AsLongLong(PyList_GET_ITEM(list, i));
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static inline int set_ll(PyObject *list, long long i, long long v) {
    PyObject *o = PyLong_FromLongLong(v);
    return o == NULL ? -1 : PyList_SetItem(list, (Py_ssize_t)i, o);  /* steals o */
}

static inline int append_ll(PyObject *list, long long v) {
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL) return -1;
    int rc = PyList_Append(list, o);
    Py_DECREF(o);
    return rc;
}

/* top[i] = (tok, child, n, total); child, n and total are existing objects or (NULL) numbers. */
static int set_top(PyObject *top, long long i, PyObject *tok, PyObject *child, long long child_v,
                   PyObject *n, long long n_v, PyObject *total, long long total_v) {
    PyObject *c = child ? (Py_INCREF(child), child) : PyLong_FromLongLong(child_v);
    PyObject *m = n ? (Py_INCREF(n), n) : PyLong_FromLongLong(n_v);
    PyObject *t = total ? (Py_INCREF(total), total) : PyLong_FromLongLong(total_v);
    PyObject *tup = c && m && t ? PyTuple_Pack(4, tok, c, m, t) : NULL;
    Py_XDECREF(c);
    Py_XDECREF(m);
    Py_XDECREF(t);
    return tup == NULL ? -1 : PyList_SetItem(top, (Py_ssize_t)i, tup);
}

/* top[i], checked to be None or a 4-tuple (NULL on error). */
static inline PyObject *top_at(PyObject *top, long long i) {
    PyObject *t = PyList_GET_ITEM(top, i);
    if (t != Py_None && (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4)) {
        PyErr_SetString(PyExc_TypeError, "top_table entries must be 4-tuples or None");
        return NULL;
    }
    return t;
}

/* dict[token] as a state id: 1 found, 0 absent, -1 error. */
static inline int edge_of(PyObject *nxt, long long state, PyObject *token, long long *target) {
    if (state < 0 || state >= PyList_GET_SIZE(nxt)) {
        PyErr_SetString(PyExc_IndexError, "automaton state out of range");
        return -1;
    }
    PyObject *d = PyList_GET_ITEM(nxt, state);
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "automaton next entries must be dicts");
        return -1;
    }
    PyObject *v = PyDict_GetItemWithError(d, token);
    if (v == NULL) return PyErr_Occurred() ? -1 : 0;
    *target = PyLong_AsLongLong(v);
    return *target == -1 && PyErr_Occurred() ? -1 : 1;
}

static inline int set_edge(PyObject *nxt, long long state, PyObject *token, long long target) {
    PyObject *o = PyLong_FromLongLong(target);
    if (o == NULL) return -1;
    int rc = PyDict_SetItem(PyList_GET_ITEM(nxt, state), token, o);
    Py_DECREF(o);
    return rc;
}

enum { F_TOKENS, F_NEXT, F_LINK, F_LENGTH, F_FIRST_END, F_LAST_END, F_COUNT, F_TOP, F_OUT_TOTAL, NUM_FIELDS };
static const char *field_names[NUM_FIELDS] = {"tokens", "next", "link", "length", "first_end", "last_end",
                                              "count", "top_table", "_out_total"};
static PyObject *field_strs[NUM_FIELDS]; /* interned field_names */

/* _new_state plus _set_top_of_new: appends one state (like >= 0: a clone of `like`). */
static int new_state(PyObject **f, int track, long long length, long long link, long long first_end,
                     long long last_end, long long count, PyObject *nxt_dict, long long like) {
    if (PyList_Append(f[F_NEXT], nxt_dict) < 0 || append_ll(f[F_LINK], link) < 0
        || append_ll(f[F_LENGTH], length) < 0 || append_ll(f[F_FIRST_END], first_end) < 0
        || append_ll(f[F_LAST_END], last_end) < 0 || append_ll(f[F_COUNT], count) < 0)
        return -1;
    if (!track) return 0;
    if (like < 0) return PyList_Append(f[F_TOP], Py_None) < 0 || append_ll(f[F_OUT_TOTAL], 0) < 0 ? -1 : 0;
    return PyList_Append(f[F_TOP], PyList_GET_ITEM(f[F_TOP], like)) < 0
           || PyList_Append(f[F_OUT_TOTAL], PyList_GET_ITEM(f[F_OUT_TOTAL], like)) < 0 ? -1 : 0;
}

/* One SuffixAutomaton.extend; returns the new `last` and sets *match_end, or -1 on error. */
static long long extend_one(PyObject **f, int track, long long depth_cap, long long refresh_cap,
                            long long last, PyObject *token, long long token_v, long long *match_end) {
    PyObject *nxt = f[F_NEXT], *link = f[F_LINK], *lengths = f[F_LENGTH], *top = f[F_TOP];
    PyObject *out_total = f[F_OUT_TOTAL], *counts = f[F_COUNT], *last_ends = f[F_LAST_END];
    long long pos = PyList_GET_SIZE(f[F_TOKENS]), v, len_last;
    if (PyList_Append(f[F_TOKENS], token) < 0 || get_ll(lengths, last, &len_last) < 0) return -1;
    long long cur = PyList_GET_SIZE(lengths);
    PyObject *empty = PyDict_New();
    if (empty == NULL) return -1;
    int rc = new_state(f, track, len_last + 1, 0, pos, pos, 1, empty, -1);
    Py_DECREF(empty);
    if (rc < 0) return -1;
    long long p = last, q = -1;
    while (p != -1) {
        if ((rc = edge_of(nxt, p, token, &q)) != 0) break;
        if (set_edge(nxt, p, token, cur) < 0) return -1;
        if (track) {  /* a new continuation seen once */
            long long total;
            if (get_ll(out_total, p, &total) < 0 || set_ll(out_total, p, total + 1) < 0) return -1;
            PyObject *t = top_at(top, p);
            if (t == NULL) return -1;
            if (t != Py_None) {
                if (set_top(top, p, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), 0,
                            PyTuple_GET_ITEM(t, 2), 0, NULL, total + 1) < 0) return -1;
            } else if (token_v >= 0 && set_top(top, p, token, NULL, cur, NULL, 1, NULL, total + 1) < 0) {
                return -1;
            }
        }
        if (get_ll(link, p, &p) < 0) return -1;
    }
    if (rc < 0) return -1;
    long long first_parent = p;
    if (p != -1) {
        long long len_p, len_q;
        if (get_ll(lengths, p, &len_p) < 0 || get_ll(lengths, q, &len_q) < 0) return -1;
        if (len_p + 1 == len_q) {
            if (set_ll(link, cur, q) < 0) return -1;
        } else {
            long long link_q, first_q, last_q, count_q;
            if (get_ll(link, q, &link_q) < 0 || get_ll(f[F_FIRST_END], q, &first_q) < 0
                || get_ll(last_ends, q, &last_q) < 0 || get_ll(counts, q, &count_q) < 0) return -1;
            PyObject *copy = PyDict_Copy(PyList_GET_ITEM(nxt, q));
            if (copy == NULL) return -1;
            long long clone = PyList_GET_SIZE(lengths);
            rc = new_state(f, track, len_p + 1, link_q, first_q, last_q, count_q, copy, q);
            Py_DECREF(copy);
            if (rc < 0) return -1;
            while (p != -1) {
                long long target;
                if ((rc = edge_of(nxt, p, token, &target)) < 0) return -1;
                if (rc == 0 || target != q) break;
                if (set_edge(nxt, p, token, clone) < 0) return -1;
                if (track) {  /* same count, new child state */
                    PyObject *t = top_at(top, p);
            if (t == NULL) return -1;
                    if (t != Py_None) {
                        long long child = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
                        if (child == -1 && PyErr_Occurred()) return -1;
                        if (child == q && set_top(top, p, PyTuple_GET_ITEM(t, 0), NULL, clone,
                                                  PyTuple_GET_ITEM(t, 2), 0, PyTuple_GET_ITEM(t, 3), 0) < 0)
                            return -1;
                    }
                }
                if (get_ll(link, p, &p) < 0) return -1;
            }
            if (set_ll(link, q, clone) < 0 || set_ll(link, cur, clone) < 0) return -1;
        }
    }
    long long match = cur;
    if (get_ll(link, cur, &match) < 0) return -1;
    *match_end = -1;
    if (match != 0 && get_ll(last_ends, match, match_end) < 0) return -1;
    /* _credit_occurrence */
    long long state = match, depth = depth_cap >= 0 ? depth_cap : PyList_GET_SIZE(lengths), shortest = 0;
    while (state > 0 && depth > 0) {
        if (get_ll(counts, state, &v) < 0 || set_ll(counts, state, v + 1) < 0
            || set_ll(last_ends, state, pos) < 0 || get_ll(lengths, state, &shortest) < 0
            || get_ll(link, state, &state) < 0) return -1;
        depth--;
    }
    if (!track || first_parent == -1 || !shortest) return cur;
    /* _refresh_parents */
    long long budget = refresh_cap >= 0 ? refresh_cap : PyList_GET_SIZE(lengths);
    state = first_parent;
    while (state != -1 && budget > 0) {
        long long child, len_child, total, n;
        if (state < 0 || state >= PyList_GET_SIZE(nxt)) {
            PyErr_SetString(PyExc_IndexError, "automaton state out of range");
            return -1;
        }
        if ((rc = edge_of(nxt, state, token, &child)) <= 0) {
            if (rc == 0) PyErr_SetObject(PyExc_KeyError, token);
            return -1;
        }
        if (get_ll(lengths, child, &len_child) < 0) return -1;
        if (len_child < shortest) break;
        if (get_ll(out_total, state, &total) < 0 || set_ll(out_total, state, total + 1) < 0
            || get_ll(counts, child, &n) < 0) return -1;
        PyObject *t = top_at(top, state);
        if (t == NULL) return -1;
        int replace = t == Py_None;
        if (!replace) {
            long long t_child = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
            long long t_n = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
            if (PyErr_Occurred()) return -1;
            replace = t_child == child || n > t_n;
        }
        if (token_v >= 0 && replace) {
            if (set_top(top, state, token, NULL, child, NULL, n, NULL, total + 1) < 0) return -1;
        } else if (t != Py_None) {  /* same top, larger total (sentinels count there too) */
            if (set_top(top, state, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), 0,
                        PyTuple_GET_ITEM(t, 2), 0, NULL, total + 1) < 0) return -1;
        }
        if (get_ll(link, state, &state) < 0) return -1;
        budget--;
    }
    return cur;
}

static PyObject *str_last, *str_match_end, *str_track_top, *str_count_depth, *str_refresh_cap;

PyDoc_STRVAR(extend_many_doc,
"extend_many(automaton, tokens)\n\nSuffixAutomaton.extend over a list of ints (not frozen; the caller\n"
"checks). Every token is checked to be an int first, so bad input leaves the automaton unchanged.");

static PyObject *extend_many(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "extend_many(automaton, tokens: list)");
        return NULL;
    }
    PyObject *sam = args[0], *tokens = args[1], *f[NUM_FIELDS] = {NULL}, *result = NULL;
    PyObject *o = NULL;
    Py_ssize_t n = PyList_GET_SIZE(tokens);
    long long *vals = PyMem_Malloc(sizeof(long long) * (n + 1));
    if (vals == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(tokens, i);
        if (!PyLong_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "tokens must be ints");
            goto done;
        }
        vals[i] = PyLong_AsLongLong(t);
        if (vals[i] == -1 && PyErr_Occurred()) goto done;
    }
    for (int i = 0; i < NUM_FIELDS; i++) {
        f[i] = PyObject_GetAttr(sam, field_strs[i]);
        if (f[i] == NULL) goto done;
        if (!PyList_Check(f[i])) {
            PyErr_Format(PyExc_TypeError, "automaton field %s must be a list", field_names[i]);
            goto done;
        }
    }
    long long last, depth_cap = -1, refresh_cap = -1;
    int track;
    if ((o = PyObject_GetAttr(sam, str_track_top)) == NULL || (track = PyObject_IsTrue(o)) < 0) goto done;
    Py_CLEAR(o);
    if ((o = PyObject_GetAttr(sam, str_count_depth)) == NULL) goto done;
    if (o != Py_None && (depth_cap = PyLong_AsLongLong(o)) == -1 && PyErr_Occurred()) goto done;
    Py_CLEAR(o);
    if ((o = PyObject_GetAttr(sam, str_refresh_cap)) == NULL) goto done;
    if (o != Py_None && (refresh_cap = PyLong_AsLongLong(o)) == -1 && PyErr_Occurred()) goto done;
    Py_CLEAR(o);
    if ((o = PyObject_GetAttr(sam, str_last)) == NULL) goto done;
    if ((last = PyLong_AsLongLong(o)) == -1 && PyErr_Occurred()) goto done;
    Py_CLEAR(o);
    Py_ssize_t num_states = PyList_GET_SIZE(f[F_LENGTH]);
    for (int i = F_NEXT; i < F_TOP; i++) {
        if (PyList_GET_SIZE(f[i]) != num_states) {
            PyErr_SetString(PyExc_ValueError, "automaton arrays differ in length");
            goto done;
        }
    }
    if (track && (PyList_GET_SIZE(f[F_TOP]) != num_states || PyList_GET_SIZE(f[F_OUT_TOTAL]) != num_states)) {
        PyErr_SetString(PyExc_ValueError, "automaton top tables differ in length from its states");
        goto done;
    }
    long long match_end = -1, next_last;
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        next_last = extend_one(f, track, depth_cap, refresh_cap, last, PyList_GET_ITEM(tokens, i), vals[i],
                               &match_end);
        if (next_last < 0) break;
        last = next_last;
    }
    if (i > 0) {  /* also after an error mid-way (only out of memory or a corrupt automaton) */
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        PyObject *a = PyLong_FromLongLong(last), *b = PyLong_FromLongLong(match_end);
        int rc = a && b && PyObject_SetAttr(sam, str_last, a) == 0 ? PyObject_SetAttr(sam, str_match_end, b) : -1;
        Py_XDECREF(a);
        Py_XDECREF(b);
        if (exc_type != NULL) {
            PyErr_Restore(exc_type, exc_value, exc_tb);
            goto done;
        }
        if (rc < 0) goto done;
    }
    if (i < n) goto done;
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(o);
    for (int i = 0; i < NUM_FIELDS; i++) Py_XDECREF(f[i]);
    PyMem_Free(vals);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, walk_doc},
    {"score", (PyCFunction)(void (*)(void))score, METH_FASTCALL, score_doc},
    {"feed", (PyCFunction)(void (*)(void))feed, METH_FASTCALL, feed_doc},
    {"build_frozen", build_frozen, METH_O, build_frozen_doc},
    {"extend_many", (PyCFunction)(void (*)(void))extend_many, METH_FASTCALL, extend_many_doc},
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
    for (int i = 0; i < NUM_FIELDS; i++)
        if ((field_strs[i] = PyUnicode_InternFromString(field_names[i])) == NULL) return NULL;
    str_last = PyUnicode_InternFromString("last");
    str_match_end = PyUnicode_InternFromString("match_end");
    str_track_top = PyUnicode_InternFromString("track_top");
    str_count_depth = PyUnicode_InternFromString("count_depth");
    str_refresh_cap = PyUnicode_InternFromString("_refresh_cap");
    if (!str_top_table || !str_sam || !str_state || !str_length || !str_next || !str_link || !str_last
        || !str_match_end || !str_track_top || !str_count_depth || !str_refresh_cap) return NULL;
    return PyModule_Create(&module_def);
}
