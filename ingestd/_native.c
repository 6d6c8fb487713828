/* ingestd's hot path in C: each-mode task envelopes, and Celery's argsrepr for a task
 * whose one argument is a JSON record, from the record's bytes, without building the
 * Python objects; and each record's headers. ingestd runs without this module
 * (ingestd/codec.py and ingestd/rdkafka.py have the same in Python); tests/test_codec.py
 * proves both give what send_task writes.
 *
 * argsrepr(raw, maxsize) returns the JSON string literal (quotes included) of
 * saferepr([json.loads(raw)], maxsize), or None when it does not know the answer
 * for certain. It answers only where repr() and saferepr() provably agree (see
 * ingestd.codec.argsrepr): the record is a JSON object; every string is
 * printable ASCII without a backslash or a quote of either kind; no container
 * sits below the record's children; no object repeats a key; and the text is
 * shorter than maxsize. Everything else is left to the Python path.
 *
 * Numbers print as Python prints what json.loads makes of them: an integer's
 * digits (-0 is 0), and a float through PyOS_double_to_string(x, 'r', 0,
 * Py_DTSF_ADD_DOT_0), which is float.__repr__ itself, unless its text is already
 * what that prints (canonical()).
 *
 * encode_each(...): see its docstring below.
 *
 * record_headers(msg): a consumed record's headers, read safely; see its comment below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_KEYS 64   /* an object with more keys is left to Python */
#define MAX_NUMBER 64 /* a float's text longer than this is left to Python */
/* An int of more digits is left to Python: str(int) raises past the interpreter's
 * limit (sys.set_int_max_str_digits), which is 4300 by default and never below 640. */
#define MAX_INT_DIGITS 640

typedef struct {
    const char *p, *end;
    char *out;
    Py_ssize_t n, cap; /* cap: the longest text that may still be answered */
} State;

static int emit(State *s, const char *text, Py_ssize_t len) {
    if (s->n + len > s->cap) return -1;
    memcpy(s->out + s->n, text, (size_t)len);
    s->n += len;
    return 0;
}

static void skip_ws(State *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
        s->p++;
}

static int value(State *s, int depth);

/* A string with no escapes, printable ASCII only, and no quote of either kind:
 * its repr is its text between single quotes. */
static int string(State *s, const char **start, Py_ssize_t *len) {
    const char *p = ++s->p;
    while (p < s->end && *p != '"') {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20 || c >= 0x7f || c == '\\' || c == '\'') return -1;
        p++;
    }
    if (p >= s->end) return -1;
    *start = s->p;
    *len = p - s->p;
    s->p = p + 1;
    if (emit(s, "'", 1) || emit(s, *start, *len) || emit(s, "'", 1)) return -1;
    return 0;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Whether a float's JSON text is already what repr() prints for it, seen from its
 * digits alone (parsing and printing a double costs more than the rest of a record):
 * plain notation within repr's fixed range (1e-4 <= |x| < 1e16), no leading zero
 * beyond "0.", a fraction without trailing zeros other than a lone ".0", and at most
 * 15 significant digits. A decimal of at most DBL_DIG (15) significant digits comes
 * back from its double unchanged, and no shorter decimal maps to the same double
 * (15-digit decimals lie further apart than a double's rounding), so it is the
 * shortest round trip that repr() prints. */
static int canonical(const char *t, Py_ssize_t len) {
    const char *end = t + len, *dot, *first = NULL, *last = NULL;
    if (*t == '-') t++;
    dot = memchr(t, '.', (size_t)(end - t));
    if (dot == NULL || memchr(dot, 'e', (size_t)(end - dot)) || memchr(dot, 'E', (size_t)(end - dot)))
        return 0;
    if (dot - t > 16) return 0;                               /* |x| >= 1e16 */
    if (end - dot > 2 && end[-1] == '0') return 0;           /* a trailing zero */
    for (const char *c = t; c < end; c++) {
        if (*c == '.' || *c == '0') continue;
        if (first == NULL) first = c;
        last = c;
    }
    if (first == NULL) return 1;                              /* 0.0 and -0.0 */
    if (*t == '0' && first - dot > 4) return 0;               /* |x| < 1e-4 */
    Py_ssize_t digits = last - first + 1 - (first < dot && dot < last);
    return digits <= 15;
}

static int number(State *s) {
    const char *start = s->p, *p = s->p;
    int is_float = 0;
    if (p < s->end && *p == '-') p++;
    if (p >= s->end || !is_digit(*p)) return -1;
    if (*p == '0') {
        p++;
    } else {
        while (p < s->end && is_digit(*p)) p++;
    }
    if (p < s->end && *p == '.') {
        is_float = 1;
        p++;
        if (p >= s->end || !is_digit(*p)) return -1;
        while (p < s->end && is_digit(*p)) p++;
    }
    if (p < s->end && (*p == 'e' || *p == 'E')) {
        is_float = 1;
        p++;
        if (p < s->end && (*p == '+' || *p == '-')) p++;
        if (p >= s->end || !is_digit(*p)) return -1;
        while (p < s->end && is_digit(*p)) p++;
    }
    s->p = p;
    Py_ssize_t len = p - start;
    if (!is_float) {
        if (len == 2 && start[0] == '-' && start[1] == '0') return emit(s, "0", 1);
        if (len > MAX_INT_DIGITS) return -1;
        return emit(s, start, len);
    }
    if (canonical(start, len)) return emit(s, start, len);
    if (len >= MAX_NUMBER) return -1;
    char text[MAX_NUMBER];
    memcpy(text, start, (size_t)len);
    text[len] = '\0';
    double x = PyOS_string_to_double(text, NULL, NULL);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    char *r = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (r == NULL) {
        PyErr_Clear();
        return -1;
    }
    int rc = emit(s, r, (Py_ssize_t)strlen(r));
    PyMem_Free(r);
    return rc;
}

static int literal(State *s, const char *json, const char *python) {
    Py_ssize_t len = (Py_ssize_t)strlen(json);
    if (s->end - s->p < len || memcmp(s->p, json, (size_t)len) != 0) return -1;
    s->p += len;
    return emit(s, python, (Py_ssize_t)strlen(python));
}

/* A container's opening bracket: 1 when it closes at once (empty), 0 when items
 * follow, -1 where the Python path must answer. */
static int open_container(State *s, const char *open, char close) {
    s->p++;
    if (emit(s, open, 1)) return -1;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return emit(s, s->p - 1, 1) ? -1 : 1;
    }
    return 0;
}

/* After an item: 1 when a comma says another follows, 0 when the container closes,
 * -1 where the Python path must answer. */
static int after_item(State *s, char close) {
    skip_ws(s);
    if (s->p < s->end && *s->p == ',') {
        s->p++;
        return emit(s, ", ", 2) ? -1 : 1;
    }
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return emit(s, s->p - 1, 1) ? -1 : 0;
    }
    return -1;
}

static int object(State *s, int depth) {
    const char *keys[MAX_KEYS];
    Py_ssize_t lens[MAX_KEYS];
    int count = 0, more = open_container(s, "{", '}');
    if (more != 0) return more < 0 ? -1 : 0;
    do {
        skip_ws(s);
        if (s->p >= s->end || *s->p != '"' || count == MAX_KEYS) return -1;
        if (string(s, &keys[count], &lens[count])) return -1;
        for (int i = 0; i < count; i++) /* a repeated key: dict order differs from text */
            if (lens[i] == lens[count] && memcmp(keys[i], keys[count], (size_t)lens[i]) == 0)
                return -1;
        count++;
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':') return -1;
        s->p++;
        if (emit(s, ": ", 2) || value(s, depth + 1)) return -1;
    } while ((more = after_item(s, '}')) == 1);
    return more;
}

static int array(State *s, int depth) {
    int more = open_container(s, "[", ']');
    if (more != 0) return more < 0 ? -1 : 0;
    do {
        if (value(s, depth + 1)) return -1;
    } while ((more = after_item(s, ']')) == 1);
    return more;
}

/* depth: the record is 1. saferepr shows three levels of [record]: containers may
 * sit in the record, not in them. */
static int value(State *s, int depth) {
    skip_ws(s);
    if (s->p >= s->end) return -1;
    switch (*s->p) {
    case '{':
        return depth > 2 ? -1 : object(s, depth);
    case '[':
        return depth > 2 ? -1 : array(s, depth);
    case '"': {
        const char *start;
        Py_ssize_t len;
        return string(s, &start, &len);
    }
    case 't':
        return literal(s, "true", "True");
    case 'f':
        return literal(s, "false", "False");
    case 'n':
        return literal(s, "null", "None");
    default:
        return number(s);
    }
}

/* Writes the JSON string of the argsrepr into out (cap >= maxsize + 1 bytes); its
 * length, or -1 where the Python path must answer. */
static Py_ssize_t argsrepr_into(const char *raw, Py_ssize_t size, Py_ssize_t maxsize, char *out) {
    /* The text "[...]" must be shorter than maxsize; around it go the JSON quotes. */
    Py_ssize_t cap = maxsize + 1;
    if (cap < 4) return -1;
    State s = {raw, raw + size, out, 0, cap};
    skip_ws(&s);
    if (s.p < s.end && *s.p == '{' && emit(&s, "\"[", 2) == 0 && value(&s, 1) == 0) {
        skip_ws(&s);
        if (s.p == s.end && emit(&s, "]\"", 2) == 0) return s.n;
    }
    return -1;
}

#define STACK_BUFFER 4096

static PyObject *argsrepr(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "argsrepr(raw: bytes, maxsize: int)");
        return NULL;
    }
    Py_ssize_t maxsize = PyLong_AsSsize_t(args[1]);
    if (maxsize == -1 && PyErr_Occurred()) return NULL;
    char stack_buffer[STACK_BUFFER];
    char *out = maxsize < STACK_BUFFER ? stack_buffer : PyMem_Malloc((size_t)maxsize + 1);
    if (out == NULL) return PyErr_NoMemory();
    Py_ssize_t n = argsrepr_into(PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                                 maxsize, out);
    PyObject *result = n < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize(out, n);
    if (out != stack_buffer) PyMem_Free(out);
    return result;
}

/* --- envelopes ----------------------------------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding, as binascii.b2a_base64(newline=False). */
static char *base64(const unsigned char *in, Py_ssize_t n, char *out) {
    Py_ssize_t i = 0;
    for (; i + 2 < n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        *out++ = B64[v >> 18];
        *out++ = B64[(v >> 12) & 63];
        *out++ = B64[(v >> 6) & 63];
        *out++ = B64[v & 63];
    }
    if (i < n) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0);
        *out++ = B64[v >> 18];
        *out++ = B64[(v >> 12) & 63];
        *out++ = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        *out++ = '=';
    }
    return out;
}

enum { SLOT_BODY, SLOT_ID, SLOT_ARGSREPR, SLOT_TAG, SLOT_IDS, SLOTS };

/* The output of encode_each: a list of envelopes, or one LPUSH command in RESP (as
 * ingestd.dispatch.pack_lpush writes it), built in a bytes object that grows. */
typedef struct {
    PyObject *list, *packed;
    Py_ssize_t used;
} Out;

/* Room for `extra` more bytes at the end of the packed command. */
static char *reserve(Out *o, Py_ssize_t extra) {
    Py_ssize_t size = PyBytes_GET_SIZE(o->packed);
    if (o->used + extra > size) {
        Py_ssize_t want = size * 2 > o->used + extra ? size * 2 : o->used + extra;
        if (_PyBytes_Resize(&o->packed, want) < 0) return NULL;
    }
    return PyBytes_AS_STRING(o->packed) + o->used;
}

static int put(Out *o, const char *text, Py_ssize_t len) {
    char *w = reserve(o, len);
    if (w == NULL) return -1;
    memcpy(w, text, (size_t)len);
    o->used += len;
    return 0;
}

static PyObject *encode_each(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyTuple_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyBytes_Check(args[2]) || !PyBytes_Check(args[3]) || !PyList_Check(args[5]) ||
        !PyList_Check(args[6]) || (args[8] != Py_None && !PyBytes_Check(args[8])) ||
        !PyCallable_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "encode_each(fragments: tuple[bytes, ...], "
                        "slots: bytes, head: bytes, tail: bytes, maxsize: int, tasks: list, "
                        "tags: list[bytes], fallback, key: bytes | None)");
        return NULL;
    }
    PyObject *fragments = args[0], *slots = args[1], *fallback = args[7], *key = args[8];
    const char *head = PyBytes_AS_STRING(args[2]), *tail = PyBytes_AS_STRING(args[3]);
    Py_ssize_t head_n = PyBytes_GET_SIZE(args[2]), tail_n = PyBytes_GET_SIZE(args[3]);
    Py_ssize_t maxsize = PyLong_AsSsize_t(args[4]);
    if (maxsize == -1 && PyErr_Occurred()) return NULL;
    if (maxsize < 0 || maxsize > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "encode_each: maxsize out of range");
        return NULL;
    }
    Py_ssize_t nslots = PyBytes_GET_SIZE(slots), n = PyList_GET_SIZE(args[5]);
    const unsigned char *slot = (const unsigned char *)PyBytes_AS_STRING(slots);
    if (PyTuple_GET_SIZE(fragments) != nslots + 1 || PyList_GET_SIZE(args[6]) != n) {
        PyErr_SetString(PyExc_ValueError, "encode_each: fragments, slots and tags disagree");
        return NULL;
    }
    Py_ssize_t constant = 0;
    for (Py_ssize_t k = 0; k <= nslots; k++) {
        PyObject *f = PyTuple_GET_ITEM(fragments, k);
        if (!PyBytes_Check(f) || (k < nslots && slot[k] >= SLOTS)) {
            PyErr_SetString(PyExc_TypeError, "encode_each: bad fragment or slot");
            return NULL;
        }
        constant += PyBytes_GET_SIZE(f);
    }
    /* Tuples of the tasks and tags: the fallback runs Python code, which must not be able
     * to change or free what this loop holds. */
    PyObject *tasks = PyList_AsTuple(args[5]), *tags = PyList_AsTuple(args[6]);
    char *repr = PyMem_Malloc((size_t)maxsize + 1);
    Py_ssize_t body_cap = 0;
    char *body = NULL;
    char number[64];
    Out o = {NULL, NULL, 0};
    PyObject *result = NULL;
    if (tasks == NULL || tags == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* a task with extra headers (Task.trace): not this template's; the caller builds */
        PyObject *task = PyTuple_GET_ITEM(tasks, i);
        if (PyTuple_Check(task) && PyTuple_GET_SIZE(task) > 6 &&
            PyTuple_GET_ITEM(task, 6) != Py_None) {
            result = Py_None;
            Py_INCREF(result);
            goto fail;
        }
    }
    if (repr == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (key == Py_None) {
        /* appended as built: no list with empty slots while the fallback runs */
        if ((o.list = PyList_New(0)) == NULL) goto fail;
    } else {
        Py_ssize_t key_n = PyBytes_GET_SIZE(key);
        /* a first guess; the command grows as it is written */
        Py_ssize_t guess = constant + 1024 < (PY_SSIZE_T_MAX - key_n - 64) / (n + 1)
                           ? n * (constant + 1024) + key_n + 64 : key_n + 64;
        if ((o.packed = PyBytes_FromStringAndSize(NULL, guess)) == NULL) goto fail;
        int len = snprintf(number, sizeof number, "*%zd\r\n$5\r\nLPUSH\r\n$%zd\r\n", n + 2, key_n);
        if (len < 0 || len >= (int)sizeof number || put(&o, number, len) ||
            put(&o, PyBytes_AS_STRING(key), key_n) || put(&o, "\r\n", 2))
            goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* a Task: (task_id, topic, [raw], [obj], ...) */
        PyObject *task = PyTuple_GET_ITEM(tasks, i), *tag = PyTuple_GET_ITEM(tags, i);
        PyObject *raws = PyTuple_Check(task) && PyTuple_GET_SIZE(task) >= 3
                         ? PyTuple_GET_ITEM(task, 2) : NULL;
        if (raws == NULL || !PyList_Check(raws) || PyList_GET_SIZE(raws) != 1 ||
            !PyBytes_Check(PyList_GET_ITEM(raws, 0)) || !PyBytes_Check(tag)) {
            PyErr_SetString(PyExc_TypeError, "encode_each: not an each-mode task");
            goto fail;
        }
        Py_ssize_t id_n;
        const char *id = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(task, 0), &id_n);
        if (id == NULL) goto fail;
        PyObject *raw_obj = PyList_GET_ITEM(raws, 0);
        const char *raw = PyBytes_AS_STRING(raw_obj);
        Py_ssize_t raw_n = PyBytes_GET_SIZE(raw_obj);
        /* the body, spliced, then its base64 */
        Py_ssize_t plain_n = head_n + raw_n + tail_n;
        if (plain_n > body_cap) {
            PyMem_Free(body);
            body_cap = plain_n * 2;
            body = PyMem_Malloc((size_t)body_cap);
            if (body == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
        }
        memcpy(body, head, (size_t)head_n);
        memcpy(body + head_n, raw, (size_t)raw_n);
        memcpy(body + head_n + raw_n, tail, (size_t)tail_n);
        Py_ssize_t b64_n = (plain_n + 2) / 3 * 4;
        /* the argsrepr, here or from the Python path */
        PyObject *slow = NULL;
        const char *ar = repr;
        Py_ssize_t ar_n = argsrepr_into(raw, raw_n, maxsize, repr);
        if (ar_n < 0) {
            slow = PyObject_CallOneArg(fallback, task);
            if (slow == NULL) goto fail;
            if (!PyBytes_Check(slow)) {
                Py_DECREF(slow);
                PyErr_SetString(PyExc_TypeError, "encode_each: fallback must return bytes");
                goto fail;
            }
            ar = PyBytes_AS_STRING(slow);
            ar_n = PyBytes_GET_SIZE(slow);
        }
        Py_ssize_t total = constant;
        for (Py_ssize_t k = 0; k < nslots; k++) {
            switch (slot[k]) {
            case SLOT_BODY: total += b64_n; break;
            case SLOT_ID: total += id_n; break;
            case SLOT_ARGSREPR: total += ar_n; break;
            case SLOT_TAG: total += PyBytes_GET_SIZE(tag); break;
            default: total += 2; break; /* ids: [] */
            }
        }
        PyObject *envelope = NULL;
        char *w;
        if (o.list != NULL) {
            envelope = PyBytes_FromStringAndSize(NULL, total);
            w = envelope == NULL ? NULL : PyBytes_AS_STRING(envelope);
        } else {
            int len = snprintf(number, sizeof number, "$%zd\r\n", total);
            w = len < 0 || len >= (int)sizeof number || put(&o, number, len)
                ? NULL : reserve(&o, total + 2);
        }
        if (w == NULL) {
            Py_XDECREF(slow);
            goto fail;
        }
        char *start = w;
        for (Py_ssize_t k = 0; k <= nslots; k++) {
            PyObject *f = PyTuple_GET_ITEM(fragments, k);
            memcpy(w, PyBytes_AS_STRING(f), (size_t)PyBytes_GET_SIZE(f));
            w += PyBytes_GET_SIZE(f);
            if (k == nslots) break;
            switch (slot[k]) {
            case SLOT_BODY: w = base64((const unsigned char *)body, plain_n, w); break;
            case SLOT_ID: memcpy(w, id, (size_t)id_n); w += id_n; break;
            case SLOT_ARGSREPR: memcpy(w, ar, (size_t)ar_n); w += ar_n; break;
            case SLOT_TAG:
                memcpy(w, PyBytes_AS_STRING(tag), (size_t)PyBytes_GET_SIZE(tag));
                w += PyBytes_GET_SIZE(tag);
                break;
            default: memcpy(w, "[]", 2); w += 2; break;
            }
        }
        Py_XDECREF(slow);
        if (o.list != NULL) {
            int rc = PyList_Append(o.list, envelope);
            Py_DECREF(envelope);
            if (rc < 0) goto fail;
        } else {
            memcpy(w, "\r\n", 2);
            o.used += w + 2 - start;
        }
    }
    result = o.list;
    if (result == NULL && _PyBytes_Resize(&o.packed, o.used) == 0) result = o.packed;
    o.list = o.packed = NULL; /* the result, or freed by _PyBytes_Resize */
fail:
    PyMem_Free(repr);
    PyMem_Free(body);
    Py_XDECREF(tasks);
    Py_XDECREF(tags);
    Py_XDECREF(o.list);
    Py_XDECREF(o.packed);
    return result;
}

/* A consumed record's headers, read from the list librdkafka made, which a
 * confluent_kafka.Message keeps until its first headers() call: that call decodes every
 * name as UTF-8 and, on one that is not, leaves a damaged list that crashes the next
 * call. A name is a str where it is UTF-8, else bytes. ingestd/rdkafka.py checks where
 * the Message struct keeps the two lists and passes rd_kafka_header_get_all from the
 * librdkafka confluent-kafka loaded (configure_headers). */
typedef int (*header_get_all_t)(const void *hdrs, size_t idx, const char **name,
                                const void **value, size_t *size);
static PyObject *message_type;
static Py_ssize_t headers_at, c_headers_at;
static header_get_all_t header_get_all;

static PyObject *configure_headers(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "configure_headers(type, headers_at, c_headers_at, "
                        "get_all)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]), c_at = PyLong_AsSsize_t(args[2]);
    void *fn = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return NULL;
    Py_XSETREF(message_type, Py_NewRef(args[0]));
    headers_at = at;
    c_headers_at = c_at;
    header_get_all = (header_get_all_t)fn;
    Py_RETURN_NONE;
}

static PyObject *record_headers(PyObject *self, PyObject *msg) {
    if (header_get_all == NULL || (PyObject *)Py_TYPE(msg) != message_type) {
        PyErr_SetString(PyExc_TypeError, "record_headers: not a configured Message");
        return NULL;
    }
    const void *c_headers = *(const void **)((const char *)msg + c_headers_at);
    if (c_headers == NULL) { /* none, or a list made in Python */
        PyObject *made = *(PyObject **)((char *)msg + headers_at);
        return Py_NewRef(made != NULL ? made : Py_None);
    }
    PyObject *list = PyList_New(0);
    const char *name;
    const void *value;
    size_t size;
    for (size_t i = 0; list != NULL && header_get_all(c_headers, i, &name, &value, &size) == 0;
         i++) {
        Py_ssize_t len = (Py_ssize_t)strlen(name);
        PyObject *key = PyUnicode_DecodeUTF8(name, len, NULL);
        if (key == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            key = PyBytes_FromStringAndSize(name, len);
        }
        PyObject *val = value == NULL ? Py_NewRef(Py_None)
                                      : PyBytes_FromStringAndSize(value, (Py_ssize_t)size);
        PyObject *pair = key != NULL && val != NULL ? PyTuple_Pack(2, key, val) : NULL;
        Py_XDECREF(key);
        Py_XDECREF(val);
        if (pair == NULL || PyList_Append(list, pair) < 0) Py_CLEAR(list);
        Py_XDECREF(pair);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"configure_headers", (PyCFunction)(void (*)(void))configure_headers, METH_FASTCALL,
     "configure_headers(Message, headers_at, c_headers_at, get_all): where a Message keeps\n"
     "its converted headers and librdkafka's, and rd_kafka_header_get_all's address."},
    {"record_headers", (PyCFunction)record_headers, METH_O,
     "record_headers(msg): a consumed record's headers as [(name, value)], a name str where\n"
     "it is UTF-8, else bytes; None without headers. Never calls msg.headers()."},
    {"argsrepr", (PyCFunction)(void (*)(void))argsrepr, METH_FASTCALL,
     "argsrepr(raw, maxsize): the JSON string of saferepr([json.loads(raw)], maxsize), "
     "or None where the Python path must answer."},
    {"encode_each", (PyCFunction)(void (*)(void))encode_each, METH_FASTCALL,
     "encode_each(fragments, slots, head, tail, maxsize, tasks, tags, fallback, key): the\n"
     "kombu Redis envelope of each each-mode task (task_id, topic, [raw], [obj], ids): the\n"
     "fragments joined with, at each slot (0 body, 1 id, 2 argsrepr, 3 tag, 4 ids), the\n"
     "base64 of head + raw + tail, the task id, the argsrepr's JSON string (from\n"
     "fallback(task) where argsrepr() returns None), the delivery tag, and []. A list of\n"
     "them; or, given a key, the command LPUSH key *envelopes in RESP. None where a task\n"
     "carries trace context headers (a 7th field that is not None): not the template's."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ingestd._native", "ingestd's hot path in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
