/* The planner's hot loops in C: the same results as their numpy definitions in
 * fabricd/planner/balance.py, bit for bit (tests/unit/test_planner_native.py compares them on
 * random and adversarial inputs), in a fraction of the time at DP sizes in the thousands.
 *
 * Optional: fabricd/planner/native.py imports this module when it was built (pip builds it with
 * the package where a C compiler is found) and FABRICD_NATIVE is not "0"; without it the numpy
 * definitions run. Every function takes C-contiguous buffers of exact item sizes (the Python
 * wrappers make them so), checks their lengths, and releases the GIL while it works.
 *
 * Plans are a pure function of the job spec, the log and the step on every daemon, with this
 * module or without: so nothing here may round differently from numpy. Sums are taken in the
 * order numpy takes them (one addition per item, in item order); comparisons break ties by the
 * lower index, as numpy's stable sorts and first-occurrence argmin/argmax do; no -ffast-math.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------ buffers */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

/* A C-contiguous, flat buffer of ``itemsize``-byte items of a kind: 'i' signed integers, 'u'
 * unsigned, 'f' floating point (numpy arrays of the dtypes the Python wrappers pass). */
static int get_buf(PyObject *obj, Buf *b, Py_ssize_t itemsize, char kind, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && !PY_LITTLE_ENDIAN)) {
        f++;
    }
    const char *codes = kind == 'i' ? "bhilq" : kind == 'u' ? "BHILQ" : "efd";
    int ok = f[0] != '\0' && f[1] == '\0' && strchr(codes, f[0]) != NULL;
    if (!ok || b->view.itemsize != itemsize || b->view.ndim > 1) {
        PyErr_Format(PyExc_TypeError, "%s: expected a flat array of %zd-byte %s, got format '%s', itemsize %zd, "
                     "ndim %d", name, itemsize,
                     kind == 'i' ? "signed integers" : kind == 'u' ? "unsigned integers" : "floats",
                     b->view.format ? b->view.format : "B", b->view.itemsize, b->view.ndim);
        return -1;
    }
    return 0;
}

static void release(Buf *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* release(&a), release(&b), ...: the buffers a wrapper held, whatever happened */
static void release_all(int count, ...) {
    va_list bufs;
    va_start(bufs, count);
    for (int i = 0; i < count; i++) {
        release(va_arg(bufs, Buf *));
    }
    va_end(bufs);
}

/* A loop's return code as the wrapper's result: None, or MemoryError when it could not allocate. */
static PyObject *none_or_nomem(int rc) {
    if (rc < 0) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

#define LEN(b) ((b).view.len / (b).view.itemsize)

static int check_len(Buf *b, Py_ssize_t n, const char *name) {
    if (LEN(*b) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items, got %zd", name, n, LEN(*b));
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------ stable order */

/* The digits of an LSD radix sort of keys up to ``top``: as few passes as ``most``-bit digits
 * need, each digit as narrow as that allows (fewer buckets stay in cache). */
static void radix_digits(uint64_t top, int most, int *passes, int *bits) {
    int width = 1;
    while (width < 64 && (top >> width) != 0) {
        width++;
    }
    *passes = (width + most - 1) / most;
    *bits = (width + *passes - 1) / *passes;
}

/* out = prior[stable argsort of key[prior]] (prior: the identity when NULL): one key of
 * stable_order. Keys are non-negative (checked by the caller). LSD radix, 8- or 16-bit digits. */
static int radix_refine(const int64_t *key, const int64_t *prior, int64_t *out, Py_ssize_t n) {
    if (n == 0) {
        return 0;
    }
    uint64_t top = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((uint64_t)key[i] > top) {
            top = (uint64_t)key[i];
        }
    }
    /* 8-bit digits for small inputs, where 65536 buckets would cost more than n */
    int passes, bits;
    radix_digits(top, n > (1 << 16) ? 16 : 8, &passes, &bits);
    size_t buckets = (size_t)1 << bits;
    uint64_t mask = buckets - 1;
    int64_t *tmp = malloc(sizeof(int64_t) * (size_t)n);
    Py_ssize_t *count = malloc(sizeof(Py_ssize_t) * buckets);
    if (tmp == NULL || count == NULL) {
        free(tmp);
        free(count);
        return -1;
    }
    int64_t *src = out, *dst = tmp;
    if (prior) {
        memcpy(src, prior, sizeof(int64_t) * (size_t)n);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            src[i] = i;
        }
    }
    for (int p = 0, shift = 0; p < passes; p++, shift += bits) {
        memset(count, 0, sizeof(Py_ssize_t) * buckets);
        for (Py_ssize_t i = 0; i < n; i++) {
            count[((uint64_t)key[src[i]] >> shift) & mask]++;
        }
        Py_ssize_t sum = 0;
        for (size_t d = 0; d < buckets; d++) {
            Py_ssize_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t j = src[i];
            dst[count[((uint64_t)key[j] >> shift) & mask]++] = j;
        }
        int64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != out) {
        memcpy(out, src, sizeof(int64_t) * (size_t)n);
    }
    free(tmp);
    free(count);
    return 0;
}

static PyObject *py_stable_refine(PyObject *self, PyObject *args) {
    PyObject *k_obj, *p_obj, *o_obj;
    if (!PyArg_ParseTuple(args, "OOO", &k_obj, &p_obj, &o_obj)) {
        return NULL;
    }
    Buf k = {0}, p = {0}, o = {0};
    PyObject *ret = NULL;
    if (get_buf(k_obj, &k, 8, 'i', 0, "key") < 0 || get_buf(o_obj, &o, 8, 'i', 1, "out") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(k);
    if (check_len(&o, n, "out") < 0) {
        goto done;
    }
    if (p_obj != Py_None && (get_buf(p_obj, &p, 8, 'i', 0, "prior") < 0 || check_len(&p, n, "prior") < 0)) {
        goto done;
    }
    const int64_t *key = k.view.buf;
    const int64_t *prior = p.held ? p.view.buf : NULL;
    if (prior) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (prior[i] < 0 || prior[i] >= n) {
                PyErr_SetString(PyExc_ValueError, "prior: not a permutation of the keys' indices");
                goto done;
            }
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = radix_refine(key, prior, o.view.buf, n);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(rc);
done:
    release_all(3, &k, &p, &o);
    return ret;
}

/* -------------------------------------------------------------------------------- LPT rounds */

typedef struct {
    double load;
    int32_t bin;
} Slot;

static inline int slot_less(const Slot *x, const Slot *y) {
    return x->load < y->load || (x->load == y->load && x->bin < y->bin);
}

/* MERGE_SORT(name, T, less): ``static void name(T *a, T *tmp, Py_ssize_t n)`` sorts a[0:n] by
 * ``less``, a strict total order (so any correct sort gives the same result): a merge sort that
 * skips merging halves already in order, so a nearly sorted input costs about n comparisons;
 * insertion sort below 17 items. ``tmp``: scratch of n / 2 items. */
#define MERGE_SORT(name, T, less)                                           \
    static void name(T *a, T *tmp, Py_ssize_t n) {                          \
        if (n < 2) {                                                        \
            return;                                                         \
        }                                                                   \
        if (n <= 16) {                                                      \
            for (Py_ssize_t i = 1; i < n; i++) {                            \
                T v = a[i];                                                 \
                Py_ssize_t j = i;                                           \
                while (j > 0 && less(&v, &a[j - 1])) {                      \
                    a[j] = a[j - 1];                                        \
                    j--;                                                    \
                }                                                           \
                a[j] = v;                                                   \
            }                                                               \
            return;                                                         \
        }                                                                   \
        Py_ssize_t mid = n / 2;                                             \
        name(a, tmp, mid);                                                  \
        name(a + mid, tmp, n - mid);                                        \
        if (!less(&a[mid], &a[mid - 1])) {                                  \
            return;                                                         \
        }                                                                   \
        memcpy(tmp, a, sizeof(T) * (size_t)mid);                            \
        Py_ssize_t i = 0, j = mid, o = 0;                                   \
        while (i < mid && j < n) {                                          \
            a[o++] = less(&a[j], &tmp[i]) ? a[j++] : tmp[i++];              \
        }                                                                   \
        while (i < mid) {                                                   \
            a[o++] = tmp[i++];                                              \
        }                                                                   \
    }

/* the bins by (load, bin) */
MERGE_SORT(sort_slots, Slot, slot_less)

/* balance.py's _lpt_rounds: bins[order[i]], the bin of the i-th largest item (``order``: the
 * items by descending cost). The bins are kept in (load, bin) order, as the stable argsort of the loads
 * gives them each chunk: only the chunk's bins change load, so they are re-sorted and merged
 * with the rest instead of sorting all k. */
static int lpt_rounds(const double *costs, const int64_t *order, Py_ssize_t n, Py_ssize_t k, int32_t *bins) {
    Slot *cur = malloc(sizeof(Slot) * (size_t)k);
    Slot *nxt = malloc(sizeof(Slot) * (size_t)k);
    double *x = malloc(sizeof(double) * (size_t)k);  /* the chunk's item costs */
    if (cur == NULL || nxt == NULL || x == NULL) {
        free(cur);
        free(nxt);
        free(x);
        return -1;
    }
    for (Py_ssize_t b = 0; b < k; b++) {
        cur[b].load = 0.0;
        cur[b].bin = (int32_t)b;
    }
    Py_ssize_t pos = 0, chunks = 0;
    Py_ssize_t cap = 4 * ((n + k - 1) / k) + 64;
    while (pos < n) {
        Py_ssize_t m = n - pos < k ? n - pos : k;
        const int64_t *item = order + pos;
        for (Py_ssize_t i = 0; i < m; i++) {
            x[i] = costs[item[i]];
        }
        Py_ssize_t cut = m;
        if (chunks < cap && m > 1) {
            double reach = cur[0].load + x[0];
            for (Py_ssize_t i = 1; i < m; i++) {
                if (cur[i].load > reach) {
                    cut = i;
                    break;
                }
                double r = cur[i].load + x[i];
                if (r < reach) {
                    reach = r;
                }
            }
        }
        for (Py_ssize_t i = 0; i < cut; i++) {
            bins[item[i]] = cur[i].bin;
            cur[i].load = cur[i].load + x[i];
        }
        /* the first cut slots changed: sort them (their new loads are mostly in order already:
         * the bins were in order and differ less than the items), merge with the sorted rest */
        sort_slots(cur, nxt, cut);
        Py_ssize_t a = 0, b = cut, o = 0;
        while (a < cut && b < k) {
            nxt[o++] = slot_less(&cur[b], &cur[a]) ? cur[b++] : cur[a++];
        }
        while (a < cut) nxt[o++] = cur[a++];
        while (b < k) nxt[o++] = cur[b++];
        Slot *t = cur;
        cur = nxt;
        nxt = t;
        pos += cut;
        chunks++;
    }
    free(cur);
    free(nxt);
    free(x);
    return 0;
}

static PyObject *py_lpt_rounds(PyObject *self, PyObject *args) {
    PyObject *c_obj, *o_obj, *b_obj;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OOnO", &c_obj, &o_obj, &k, &b_obj)) {
        return NULL;
    }
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "k must be >= 1");
        return NULL;
    }
    Buf c = {0}, o = {0}, b = {0};
    PyObject *ret = NULL;
    if (get_buf(c_obj, &c, 8, 'f', 0, "costs") < 0 || get_buf(o_obj, &o, 8, 'i', 0, "order") < 0 ||
        get_buf(b_obj, &b, 4, 'i', 1, "bins") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(c);
    if (check_len(&o, n, "order") < 0 || check_len(&b, n, "bins") < 0) {
        goto done;
    }
    const int64_t *ov = o.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ov[i] < 0 || ov[i] >= n) {
            PyErr_SetString(PyExc_ValueError, "order: an index is out of range");
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lpt_rounds(c.view.buf, ov, n, k, b.view.buf);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(rc);
done:
    release_all(3, &c, &o, &b);
    return ret;
}

/* ---------------------------------------------------------------------------- micro-batches */

/* A packed group's item as the packing reads it. */
typedef struct {
    int64_t t;  /* tokens */
    double c;   /* cost */
    int64_t i;  /* index among all items */
} Rec;

/* First-fit-decreasing order: tokens descending, then index (a total order). */
static inline int ffd_less(const Rec *x, const Rec *y) {
    return x->t > y->t || (x->t == y->t && x->i < y->i);
}

/* A group's items into first-fit-decreasing order; a group whose cost order is its token order
 * (cost rising with length, as the cost models make it when images weigh nothing) costs about
 * one comparison an item. */
MERGE_SORT(sort_ffd, Rec, ffd_less)

/* One group's two packings, its items ``by_cost`` in descending cost order (ties by index):
 * first fit decreasing by tokens (over ``ffd``, scratch for the same items in that order), then
 * LPT by cost over the same number of bins within the budget, kept unless some item found no
 * room (then first fit's bins). Writes each item's bin to micro[item index]; returns the bins
 * used. bin/tfill/cfill: scratch of m slots. */
static Py_ssize_t pack_one(const Rec *by_cost, Rec *ffd, Rec *tmp, Py_ssize_t m, int64_t cap, int32_t *bin,
                           int64_t *tfill, double *cfill, int32_t *micro) {
    memcpy(ffd, by_cost, sizeof(Rec) * (size_t)m);
    sort_ffd(ffd, tmp, m);
    Py_ssize_t open = 0;
    for (Py_ssize_t p = 0; p < m; p++) {
        int64_t need = cap - ffd[p].t;
        Py_ssize_t b = 0;
        while (b < open && tfill[b] > need) b++;
        if (b == open) {
            tfill[open++] = 0;
        }
        tfill[b] += ffd[p].t;
        bin[p] = (int32_t)b;
    }
    Py_ssize_t used = open > 0 ? open : 1;
    /* spread cost: the least-loaded bin by cost with room for the item, else bin 0 (numpy
     * keeps full bins out with a penalty of 1e300 that swamps every cost sum, or with inf
     * where it could not: either way the same choice as inf here) */
    for (Py_ssize_t b = 0; b < used; b++) {
        tfill[b] = 0;
        cfill[b] = 0.0;
    }
    for (Py_ssize_t q = 0; q < m; q++) {
        int64_t need = cap - by_cost[q].t;
        Py_ssize_t best = 0;
        double best_v = 0.0;
        for (Py_ssize_t b = 0; b < used; b++) {
            double v = tfill[b] > need ? INFINITY : cfill[b];
            if (b == 0 || v < best_v) {
                best = b;
                best_v = v;
            }
        }
        tfill[best] += by_cost[q].t;
        cfill[best] += by_cost[q].c;
        micro[by_cost[q].i] = (int32_t)best;
    }
    if (tfill[0] > cap) { /* some item found no room: first fit's bins stand */
        for (Py_ssize_t p = 0; p < m; p++) {
            micro[ffd[p].i] = bin[p];
        }
    }
    return used;
}

/* pack_micro_batches_grouped after its checks: each item's micro-batch and each group's number
 * of them. The numpy version packs all groups in lockstep; per group the result is the same,
 * computed here one group at a time: one pass over ``by_cost`` lays every packed group's items
 * out contiguously in its cost order (records carry their tokens and cost, so the packing reads
 * memory in order), and each group sorts its own copy into first-fit-decreasing order. */
static int pack_grouped(const int64_t *g, const int64_t *t, const double *c, const int64_t *by_cost, Py_ssize_t n,
                        Py_ssize_t G, int64_t cap, int32_t *micro, int32_t *num) {
    int rc = -1;
    int64_t *tsum = calloc((size_t)G, sizeof(int64_t));
    Py_ssize_t *cnt = calloc((size_t)G + 1, sizeof(Py_ssize_t));
    Py_ssize_t *start = malloc(sizeof(Py_ssize_t) * ((size_t)G + 1));
    Py_ssize_t *fill = malloc(sizeof(Py_ssize_t) * ((size_t)G + 1));
    Rec *recs = NULL, *ffd = NULL, *tmp = NULL;
    int32_t *bins = NULL;
    int64_t *tfill = NULL;
    double *cfill = NULL;
    if (tsum == NULL || cnt == NULL || start == NULL || fill == NULL) goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        tsum[g[i]] += t[i];
        cnt[g[i]]++;
        micro[i] = 0;
    }
    Py_ssize_t m = 0, most = 0;
    for (Py_ssize_t k = 0; k < G; k++) {
        num[k] = cnt[k] > 0;
        start[k] = fill[k] = m;
        if (tsum[k] > cap) {
            m += cnt[k];
            if (cnt[k] > most) most = cnt[k];
        }
    }
    if (m == 0) { /* every group fits in one micro-batch */
        rc = 0;
        goto out;
    }
    recs = malloc(sizeof(Rec) * (size_t)m);
    ffd = malloc(sizeof(Rec) * (size_t)most);
    tmp = malloc(sizeof(Rec) * (size_t)most);
    bins = malloc(sizeof(int32_t) * (size_t)most);
    tfill = malloc(sizeof(int64_t) * (size_t)most);
    cfill = malloc(sizeof(double) * (size_t)most);
    if (!recs || !ffd || !tmp || !bins || !tfill || !cfill) goto out;
    /* the packed groups' items, each group's in the caller's cost order */
    for (Py_ssize_t q = 0; q < n; q++) {
        int64_t i = by_cost[q];
        if (q + 16 < n) { /* the reads are random: ask for a later item's while this one is placed */
            int64_t ahead = by_cost[q + 16];
            __builtin_prefetch(&g[ahead]);
            __builtin_prefetch(&t[ahead]);
            __builtin_prefetch(&c[ahead]);
        }
        int64_t k = g[i];
        if (tsum[k] > cap) {
            Rec *r = &recs[fill[k]++];
            r->t = t[i];
            r->c = c[i];
            r->i = i;
        }
    }
    for (Py_ssize_t k = 0; k < G; k++) {
        if (tsum[k] > cap) {
            num[k] = (int32_t)pack_one(recs + start[k], ffd, tmp, cnt[k], cap, bins, tfill, cfill, micro);
        }
    }
    rc = 0;
out:
    free(tsum); free(cnt); free(start); free(fill); free(recs); free(ffd); free(tmp); free(bins); free(tfill);
    free(cfill);
    return rc;
}

static PyObject *py_pack_grouped(PyObject *self, PyObject *args) {
    PyObject *g_obj, *t_obj, *c_obj, *b_obj, *m_obj, *n_obj;
    Py_ssize_t G;
    long long cap;
    if (!PyArg_ParseTuple(args, "OOOOnLOO", &g_obj, &t_obj, &c_obj, &b_obj, &G, &cap, &m_obj, &n_obj)) {
        return NULL;
    }
    Buf g = {0}, t = {0}, c = {0}, b = {0}, mi = {0}, nu = {0};
    PyObject *ret = NULL;
    if (get_buf(g_obj, &g, 8, 'i', 0, "group") < 0 || get_buf(t_obj, &t, 8, 'i', 0, "tokens") < 0 ||
        get_buf(c_obj, &c, 8, 'f', 0, "costs") < 0 || get_buf(b_obj, &b, 8, 'i', 0, "by_cost") < 0 ||
        get_buf(m_obj, &mi, 4, 'i', 1, "micro") < 0 || get_buf(n_obj, &nu, 4, 'i', 1, "num") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(g);
    if (check_len(&t, n, "tokens") < 0 || check_len(&c, n, "costs") < 0 || check_len(&b, n, "by_cost") < 0 ||
        check_len(&mi, n, "micro") < 0 || check_len(&nu, G, "num") < 0) {
        goto done;
    }
    if (n >= INT32_MAX || G >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pack_grouped: too many items or groups");
        goto done;
    }
    const int64_t *gv = g.view.buf, *tv = t.view.buf, *bv = b.view.buf;
    /* the caller checked these; a wrong value here would write out of bounds, so again */
    char *seen = calloc((size_t)n + 1, 1);
    if (seen == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const char *bad = NULL;
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        if (gv[i] < 0 || gv[i] >= G) bad = "group ids must lie in [0, G)";
        else if (tv[i] < 0 || tv[i] > cap) bad = "tokens must lie in [0, capacity]";
        else if (bv[i] < 0 || bv[i] >= n || seen[bv[i]]++) bad = "by_cost must be a permutation of the items";
    }
    free(seen);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pack_grouped(gv, tv, c.view.buf, bv, n, G, (int64_t)cap, mi.view.buf, nu.view.buf);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(rc);
done:
    release_all(6, &g, &t, &c, &b, &mi, &nu);
    return ret;
}

/* ------------------------------------------------------------------------- rows by rank, micro */

/* The plan's final row order: a stable counting sort of the rows by (rank, micro), i.e.
 * stable_order(rank * M + micro), and the sorted rank and micro columns, written run by run
 * instead of gathered. ``counts``: scratch of G * M slots. */
static void group_order(const int32_t *rank, const int32_t *micro, Py_ssize_t n, Py_ssize_t M, Py_ssize_t *counts,
                        Py_ssize_t buckets, int64_t *order, int32_t *rank_out, int32_t *micro_out) {
    memset(counts, 0, sizeof(Py_ssize_t) * (size_t)buckets);
    for (Py_ssize_t i = 0; i < n; i++) {
        counts[(Py_ssize_t)rank[i] * M + micro[i]]++;
    }
    Py_ssize_t sum = 0;
    for (Py_ssize_t b = 0; b < buckets; b++) {
        Py_ssize_t c = counts[b];
        int32_t r = (int32_t)(b / M), m = (int32_t)(b % M);
        for (Py_ssize_t j = sum; j < sum + c; j++) {
            rank_out[j] = r;
            micro_out[j] = m;
        }
        counts[b] = sum;
        sum += c;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        order[counts[(Py_ssize_t)rank[i] * M + micro[i]]++] = i;
    }
}

static PyObject *py_group_order(PyObject *self, PyObject *args) {
    PyObject *r_obj, *m_obj, *o_obj, *ro_obj, *mo_obj;
    Py_ssize_t G, M;
    if (!PyArg_ParseTuple(args, "OOnnOOO", &r_obj, &m_obj, &G, &M, &o_obj, &ro_obj, &mo_obj)) {
        return NULL;
    }
    if (G < 1 || M < 1 || G > (Py_ssize_t)1 << 31 || M > (Py_ssize_t)1 << 31 || G > ((Py_ssize_t)1 << 40) / M) {
        PyErr_SetString(PyExc_ValueError, "group_order: G and M must be >= 1 and G * M at most 2**40");
        return NULL;
    }
    Buf r = {0}, m = {0}, o = {0}, ro = {0}, mo = {0};
    PyObject *ret = NULL;
    Py_ssize_t *counts = NULL;
    if (get_buf(r_obj, &r, 4, 'i', 0, "rank") < 0 || get_buf(m_obj, &m, 4, 'i', 0, "micro") < 0 ||
        get_buf(o_obj, &o, 8, 'i', 1, "order") < 0 || get_buf(ro_obj, &ro, 4, 'i', 1, "rank_out") < 0 ||
        get_buf(mo_obj, &mo, 4, 'i', 1, "micro_out") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(r);
    if (check_len(&m, n, "micro") < 0 || check_len(&o, n, "order") < 0 || check_len(&ro, n, "rank_out") < 0 ||
        check_len(&mo, n, "micro_out") < 0) {
        goto done;
    }
    const int32_t *rv = r.view.buf, *mv = m.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (rv[i] < 0 || rv[i] >= G || mv[i] < 0 || mv[i] >= M) {
            PyErr_SetString(PyExc_ValueError, "group_order: ranks must lie in [0, G) and micro-batches in [0, M)");
            goto done;
        }
    }
    counts = malloc(sizeof(Py_ssize_t) * (size_t)(G * M));
    if (counts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    group_order(rv, mv, n, M, counts, G * M, o.view.buf, ro.view.buf, mo.view.buf);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(0);
done:
    free(counts);
    release_all(5, &r, &m, &o, &ro, &mo);
    return ret;
}

/* ------------------------------------------------------------------------------- Feistel */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

#define ROUNDS 6
/* indices a Feistel pass with one set of keys carries at once (more measured no faster) */
#define LANES 4

/* sequence.py's feistel_permute after its keys are made: x[i] through the network of
 * ``bits`` bits keyed by keys[r * stride + i * per_item] (r = round), again while >= n (cycle
 * walking). The same integer operations as the numpy rounds, so the same values. */
static inline uint64_t feistel_round(uint64_t v, uint64_t key, int a, int b, uint64_t mask_a, uint64_t mask_b) {
    uint64_t right = v & mask_b;
    return (right << a) | ((v >> b) ^ (mix64(right ^ key) & mask_a));
}

static inline uint64_t feistel_once(uint64_t v, const uint64_t *k, Py_ssize_t stride, int a, int b,
                                    uint64_t mask_a, uint64_t mask_b) {
    for (int r = 0; r < ROUNDS; r++) {
        v = feistel_round(v, k[r * stride], a, b, mask_a, mask_b);
    }
    return v;
}

/* feistel_once on LANES values with one set of keys, round by round: LANES chains of
 * multiplications side by side, which the CPU overlaps. */
static inline void feistel_lanes(uint64_t *v, const uint64_t *k, int a, int b, uint64_t mask_a, uint64_t mask_b) {
    uint64_t w[LANES];
    memcpy(w, v, sizeof(w));
    for (int r = 0; r < ROUNDS; r++) {
        for (int j = 0; j < LANES; j++) {
            w[j] = feistel_round(w[j], k[r], a, b, mask_a, mask_b);
        }
    }
    memcpy(v, w, sizeof(w));
}

/* Cycle walking, like the numpy version, in rounds over the indices still outside [0, n): each
 * round's passes are independent (the CPU overlaps them; with one set of keys, LANES at a time),
 * where walking one index at a time would wait on its chain of multiplications. */
static int feistel(uint64_t *x, Py_ssize_t m, const uint64_t *keys, int per_item, int bits, uint64_t n) {
    int a = bits / 2, b = bits - a;
    uint64_t mask_a = (UINT64_C(1) << a) - 1, mask_b = (UINT64_C(1) << b) - 1;
    Py_ssize_t stride = per_item ? m : 1;
    uint64_t k1[ROUNDS];
    memcpy(k1, keys, sizeof(k1));
    Py_ssize_t *out = malloc(sizeof(Py_ssize_t) * (size_t)(m > 0 ? m : 1));
    if (out == NULL) {
        return -1;
    }
    Py_ssize_t left = 0, i = 0;
    if (!per_item) {
        for (; i + LANES <= m; i += LANES) {
            feistel_lanes(x + i, k1, a, b, mask_a, mask_b);
            for (int j = 0; j < LANES; j++) {
                out[left] = i + j;
                left += x[i + j] >= n;
            }
        }
    }
    for (; i < m; i++) {
        uint64_t v = per_item ? feistel_once(x[i], keys + i, stride, a, b, mask_a, mask_b)
                              : feistel_once(x[i], k1, 1, a, b, mask_a, mask_b);
        x[i] = v;
        out[left] = i;
        left += v >= n;
    }
    while (left > 0) {
        Py_ssize_t still = 0, q = 0;
        if (!per_item) {
            for (; q + LANES <= left; q += LANES) {
                Py_ssize_t at[LANES];
                uint64_t v[LANES];
                for (int j = 0; j < LANES; j++) {
                    at[j] = out[q + j];
                    v[j] = x[at[j]];
                }
                feistel_lanes(v, k1, a, b, mask_a, mask_b);
                for (int j = 0; j < LANES; j++) {
                    x[at[j]] = v[j];
                    out[still] = at[j];
                    still += v[j] >= n;
                }
            }
        }
        for (; q < left; q++) {
            Py_ssize_t i = out[q];
            uint64_t v = per_item ? feistel_once(x[i], keys + i, stride, a, b, mask_a, mask_b)
                                  : feistel_once(x[i], k1, 1, a, b, mask_a, mask_b);
            x[i] = v;
            out[still] = i;
            still += v >= n;
        }
        left = still;
    }
    free(out);
    return 0;
}

static PyObject *py_feistel(PyObject *self, PyObject *args) {
    PyObject *x_obj, *k_obj;
    int bits;
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "OOiK", &x_obj, &k_obj, &bits, &n)) {
        return NULL;
    }
    if (bits < 2 || bits > 62 || n < 1 || n > (UINT64_C(1) << bits)) {
        PyErr_SetString(PyExc_ValueError, "feistel: need 2 <= bits <= 62 and 1 <= n <= 2**bits");
        return NULL;
    }
    Buf x = {0}, k = {0};
    PyObject *ret = NULL;
    if (get_buf(x_obj, &x, 8, 'u', 1, "x") < 0 || get_buf(k_obj, &k, 8, 'u', 0, "keys") < 0) {
        goto done;
    }
    Py_ssize_t m = LEN(x);
    int per_item;
    if (LEN(k) == ROUNDS) {
        per_item = 0;
    } else if (LEN(k) == (Py_ssize_t)ROUNDS * m) {
        per_item = 1;
    } else {
        PyErr_Format(PyExc_ValueError, "feistel: keys must hold %d or %d x %zd values", ROUNDS, ROUNDS, m);
        goto done;
    }
    const uint64_t *xv = x.view.buf;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (xv[i] >= (UINT64_C(1) << bits)) {
            PyErr_SetString(PyExc_ValueError, "feistel: an index is outside [0, 2**bits)");
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = feistel(x.view.buf, m, k.view.buf, per_item, bits, (uint64_t)n);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(rc);
done:
    release_all(2, &x, &k);
    return ret;
}

/* ------------------------------------------------------------------------------- compose */

/* compose.py's window loops, over a window's units (~10^7 at DP 4096) in one pass each. Its sums
 * run in a fixed order, per slice of ``chunk`` units and then across slices: so do these. Step
 * numbers are one byte (every window a spec may ask for; the caller falls back to numpy above). */

/* _seq_sum: the strictly sequential sum. */
static double seq_sum(const double *x, Py_ssize_t n) {
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += x[i];
    }
    return total;
}

/* _step_sums with weights: per slice each step's sum in unit order from 0.0, added to the total
 * in slice order. ``part``: scratch of W. A run of units of one step (a window's units mostly
 * come in such runs) is summed in a register: the same additions in the same order, without
 * waiting on a store and a load of its step's sum for every unit. */
static void step_sums(const uint8_t *where, const double *w, Py_ssize_t n, Py_ssize_t W, Py_ssize_t chunk,
                      double *out, double *part) {
    for (Py_ssize_t s = 0; s < W; s++) {
        out[s] = 0.0;
    }
    for (Py_ssize_t lo = 0; lo < n; lo += chunk) {
        Py_ssize_t hi = lo + chunk < n ? lo + chunk : n;
        for (Py_ssize_t s = 0; s < W; s++) {
            part[s] = 0.0;
        }
        for (Py_ssize_t i = lo; i < hi;) {
            uint8_t step = where[i];
            double sum = part[step];
            do {
                sum += w[i++];
            } while (i < hi && where[i] == step);
            part[step] = sum;
        }
        for (Py_ssize_t s = 0; s < W; s++) {
            out[s] += part[s];
        }
    }
}

/* Each step's largest value (``out`` holds the starting values: max is exact, in any order). */
static void step_max(const uint8_t *where, const double *c, Py_ssize_t n, double *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (c[i] > out[where[i]]) {
            out[where[i]] = c[i];
        }
    }
}

/* _assign's filling (rule 4): every unit not grouped takes the step of its size's midpoint among
 * the steps' room (``bounds``: the running sums of the room, rising); grouped units count 0 and
 * get no step here (the caller sets theirs). count[s] += the units given step s. */
static void assign_fill(const int32_t *z, const uint8_t *grouped, Py_ssize_t n, const double *bounds, Py_ssize_t W,
                        double scale, uint8_t *out, int64_t *count) {
    int64_t csum = 0;
    Py_ssize_t j = 0;
    Py_ssize_t step = 0;
    int64_t placed = 0;  /* units given ``step`` since it was last added to count[] (steps only rise) */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (grouped[i]) {
            continue;
        }
        int64_t rz = z[i];
        csum += rz;
        double mid = ((double)csum - 0.5 * (double)rz) * scale;
        while (j < W && bounds[j] <= mid) {  /* mid never falls: a walk, not a search */
            j++;
        }
        Py_ssize_t now = j < W - 1 ? j : W - 1;
        if (now != step) {
            count[step] += placed;
            placed = 0;
            step = now;
        }
        out[i] = (uint8_t)now;
        placed++;
    }
    count[step] += placed;
}

static int check_steps(const uint8_t *where, Py_ssize_t n, Py_ssize_t W) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (where[i] >= W) {
            PyErr_SetString(PyExc_ValueError, "a step number is outside the window");
            return -1;
        }
    }
    return 0;
}

static PyObject *py_seq_sum(PyObject *self, PyObject *args) {
    PyObject *x_obj;
    if (!PyArg_ParseTuple(args, "O", &x_obj)) {
        return NULL;
    }
    Buf x = {0};
    if (get_buf(x_obj, &x, 8, 'f', 0, "x") < 0) {
        release(&x);
        return NULL;
    }
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = seq_sum(x.view.buf, LEN(x));
    Py_END_ALLOW_THREADS
    release(&x);
    return PyFloat_FromDouble(total);
}

static PyObject *py_step_sums(PyObject *self, PyObject *args) {
    PyObject *s_obj, *w_obj, *o_obj;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "OOnO", &s_obj, &w_obj, &chunk, &o_obj)) {
        return NULL;
    }
    Buf st = {0}, w = {0}, o = {0};
    PyObject *ret = NULL;
    double *part = NULL;
    if (get_buf(s_obj, &st, 1, 'u', 0, "where") < 0 || get_buf(w_obj, &w, 8, 'f', 0, "weights") < 0 ||
        get_buf(o_obj, &o, 8, 'f', 1, "out") < 0 || check_len(&w, LEN(st), "weights") < 0) {
        goto done;
    }
    Py_ssize_t W = LEN(o);
    if (chunk < 1 || W < 1 || check_steps(st.view.buf, LEN(st), W) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "step_sums: chunk and steps must be >= 1");
        goto done;
    }
    part = malloc(sizeof(double) * (size_t)W);
    if (part == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    step_sums(st.view.buf, w.view.buf, LEN(st), W, chunk, o.view.buf, part);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(0);
done:
    free(part);
    release_all(3, &st, &w, &o);
    return ret;
}

static PyObject *py_step_max(PyObject *self, PyObject *args) {
    PyObject *s_obj, *c_obj, *o_obj;
    if (!PyArg_ParseTuple(args, "OOO", &s_obj, &c_obj, &o_obj)) {
        return NULL;
    }
    Buf st = {0}, c = {0}, o = {0};
    PyObject *ret = NULL;
    if (get_buf(s_obj, &st, 1, 'u', 0, "where") < 0 || get_buf(c_obj, &c, 8, 'f', 0, "values") < 0 ||
        get_buf(o_obj, &o, 8, 'f', 1, "out") < 0 || check_len(&c, LEN(st), "values") < 0 ||
        check_steps(st.view.buf, LEN(st), LEN(o)) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    step_max(st.view.buf, c.view.buf, LEN(st), o.view.buf);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(0);
done:
    release_all(3, &st, &c, &o);
    return ret;
}

static PyObject *py_assign_fill(PyObject *self, PyObject *args) {
    PyObject *z_obj, *g_obj, *b_obj, *o_obj, *n_obj;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOdOO", &z_obj, &g_obj, &b_obj, &scale, &o_obj, &n_obj)) {
        return NULL;
    }
    Buf z = {0}, g = {0}, b = {0}, o = {0}, cn = {0};
    PyObject *ret = NULL;
    if (get_buf(z_obj, &z, 4, 'i', 0, "sizes") < 0 || get_buf(g_obj, &g, 1, 'u', 0, "grouped") < 0 ||
        get_buf(b_obj, &b, 8, 'f', 0, "bounds") < 0 || get_buf(o_obj, &o, 1, 'u', 1, "out") < 0 ||
        get_buf(n_obj, &cn, 8, 'i', 1, "count") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(z), W = LEN(b);
    if (check_len(&g, n, "grouped") < 0 || check_len(&o, n, "out") < 0 || check_len(&cn, W, "count") < 0) {
        goto done;
    }
    if (W < 1 || W > 256) {
        PyErr_SetString(PyExc_ValueError, "assign_fill: 1 to 256 steps");
        goto done;
    }
    const int32_t *zv = z.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (zv[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "assign_fill: sizes must be >= 0");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    assign_fill(zv, g.view.buf, n, b.view.buf, W, scale, o.view.buf, cn.view.buf);
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(0);
done:
    release_all(5, &z, &g, &b, &o, &cn);
    return ret;
}

/* split_by_step: values (8-byte items) of each step's units, in unit order, steps one after
 * the other (a stable counting sort); ``counts``: the units of each step. */
static PyObject *py_split_by_step(PyObject *self, PyObject *args) {
    PyObject *s_obj, *v_obj, *o_obj, *n_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &s_obj, &v_obj, &o_obj, &n_obj)) {
        return NULL;
    }
    Buf st = {0}, v = {0}, o = {0}, cn = {0};
    PyObject *ret = NULL;
    Py_ssize_t *at = NULL;
    if (get_buf(s_obj, &st, 1, 'u', 0, "where") < 0 || get_buf(v_obj, &v, 8, 'i', 0, "values") < 0 ||
        get_buf(o_obj, &o, 8, 'i', 1, "out") < 0 || get_buf(n_obj, &cn, 8, 'i', 1, "counts") < 0) {
        goto done;
    }
    Py_ssize_t n = LEN(st), W = LEN(cn);
    if (check_len(&v, n, "values") < 0 || check_len(&o, n, "out") < 0 || W < 1 ||
        check_steps(st.view.buf, n, W) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "split_by_step: steps must be >= 1");
        goto done;
    }
    at = malloc(sizeof(Py_ssize_t) * (size_t)W);
    if (at == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *sv = st.view.buf;
    const int64_t *vv = v.view.buf;
    int64_t *ov = o.view.buf, *counts = cn.view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < W; s++) counts[s] = 0;
    for (Py_ssize_t i = 0; i < n; i++) counts[sv[i]]++;
    Py_ssize_t sum = 0;
    for (Py_ssize_t s = 0; s < W; s++) {
        at[s] = sum;
        sum += counts[s];
    }
    for (Py_ssize_t i = 0; i < n; i++) ov[at[sv[i]]++] = vv[i];
    Py_END_ALLOW_THREADS
    ret = none_or_nomem(0);
done:
    free(at);
    release_all(4, &st, &v, &o, &cn);
    return ret;
}

/* ---------------------------------------------------------------------------------- module */

static PyMethodDef methods[] = {
    {"stable_refine", py_stable_refine, METH_VARARGS,
     "stable_refine(key int64[n], prior int64[n] | None, out int64[n]): out = prior[stable argsort of key[prior]]"},
    {"lpt_rounds", py_lpt_rounds, METH_VARARGS,
     "lpt_rounds(costs float64[n], order int64[n], k, bins int32[n]): balance.py's _lpt_rounds (order: by descending cost)"},
    {"pack_grouped", py_pack_grouped, METH_VARARGS,
     "pack_grouped(group int64[n], tokens int64[n], costs float64[n], by_cost int64[n], G, cap, micro int32[n], "
     "num int32[G]): balance.py's pack_micro_batches_grouped after its checks"},
    {"group_order", py_group_order, METH_VARARGS,
     "group_order(rank int32[n], micro int32[n], G, M, order int64[n], rank_out int32[n], micro_out int32[n]): "
     "balance.py's rows_by_rank_and_micro"},
    {"feistel", py_feistel, METH_VARARGS,
     "feistel(x uint64[m], keys uint64[6] | uint64[6, m], bits, n): sequence.py's Feistel bijection, in place"},
    {"seq_sum", py_seq_sum, METH_VARARGS, "seq_sum(x float64[n]) -> float: compose.py's _seq_sum"},
    {"step_sums", py_step_sums, METH_VARARGS,
     "step_sums(where uint8[n], weights float64[n], chunk, out float64[W]): compose.py's _step_sums with weights"},
    {"step_max", py_step_max, METH_VARARGS,
     "step_max(where uint8[n], values float64[n], out float64[W]): out[s] = max(out[s], values of step s)"},
    {"assign_fill", py_assign_fill, METH_VARARGS,
     "assign_fill(sizes int32[n], grouped uint8[n], bounds float64[W], scale, out uint8[n], count int64[W]): "
     "compose.py's _assign filling"},
    {"split_by_step", py_split_by_step, METH_VARARGS,
     "split_by_step(where uint8[n], values 8-byte[n], out[n], counts int64[W]): a stable counting sort by step"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The planner's hot loops in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    return PyModule_Create(&module);
}
