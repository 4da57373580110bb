/* dcache.lru._entry: the LRU's entry as one small object and one buffer.
 *
 * The pure-Python ``Entry`` (cache.py) is an object of six slots that holds
 * a ``bytes`` key, a ``bytes`` value and an int version: four objects and
 * about 320 bytes for a 16-byte key with a 100-byte value, where Redis takes
 * 208 in all. This ``Entry`` keeps the key and the value together in one
 * buffer it owns, and the version as a C integer: 80 bytes of
 * object (its GC header included) and one allocation of ``len(key) +
 * len(value)`` bytes (docs/DECISIONS.md, "Memory per key").
 *
 * The cache's dicts are keyed by the entries themselves: an entry hashes as
 * its key does (``hash(entry) == hash(entry.key)``) and compares equal to a
 * ``bytes`` equal to its key, so ``shard.get(key)`` finds it with the
 * ``bytes`` a request carries and no key object is kept per entry.
 *
 * Attributes, as the Python class's: ``key`` (read-only) and ``value`` are
 * ``bytes`` copied out of the buffer on each read (``value`` is copied in
 * when set); ``expires_at`` is an int object (the expiry heap's own, or the shared 0),
 * read and written as a slot is, ``version`` an unsigned 64-bit integer (the
 * protocol's range); ``_version`` reads and writes it as its offset
 * from ``VERSION_BIAS``, as the cache's loops do; ``prev`` and ``next`` are the list links (any object, owned
 * references). The links make reference cycles, so the type takes part in
 * the cyclic GC, as the Python class does.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* The hybrid-clock version of 2030-01-01 00:00 UTC (cache.VERSION_BIAS). */
#define VERSION_BIAS (1893456000000LL << 22)

typedef struct {
    PyObject_HEAD
    PyObject *prev;
    PyObject *next;
    char *data; /* the key's bytes, then the value's; NULL when both are empty */
    PyObject *expires_at; /* an int: the same object as the expiry heap's item, and 0 (shared) when none */
    unsigned long long version; /* the whole version: 0 .. 2**64-1, as the protocol allows */
    uint32_t klen;
    uint32_t vlen;
} EntryObject;

static PyTypeObject EntryType;

#define Entry_Check(op) Py_IS_TYPE((op), &EntryType)

/* Store ``n`` value bytes from ``src`` after the key; the buffer is resized to fit. */
static int
entry_store_value(EntryObject *self, const char *src, Py_ssize_t n)
{
    if ((size_t)n > UINT32_MAX - self->klen) {
        PyErr_SetString(PyExc_OverflowError, "an entry's key and value must be under 4 GiB together");
        return -1;
    }
    if ((uint32_t)n != self->vlen) {
        size_t total = (size_t)self->klen + (size_t)n;
        if (total == 0) {
            PyMem_Free(self->data);
            self->data = NULL;
        }
        else {
            char *data = PyMem_Realloc(self->data, total);
            if (data == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->data = data;
        }
        self->vlen = (uint32_t)n;
    }
    if (n) {
        memcpy(self->data + self->klen, src, (size_t)n);
    }
    return 0;
}

static PyObject *
Entry_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "value", "expires_at", "version", NULL};
    PyObject *key, *value;
    PyObject *expires_at = NULL;
    unsigned long long version = 0;
    PyObject *version_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SS|O!O!:Entry", kwlist, &key, &value, &PyLong_Type, &expires_at,
                                     &PyLong_Type, &version_obj)) {
        return NULL;
    }
    if (version_obj != NULL) {
        version = PyLong_AsUnsignedLongLong(version_obj);
        if (version == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t klen = PyBytes_GET_SIZE(key);
    if ((size_t)klen > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "an entry's key must be under 4 GiB");
        return NULL;
    }
    EntryObject *self = (EntryObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->prev = NULL;
    self->next = NULL;
    self->data = NULL;
    self->expires_at = expires_at ? Py_NewRef(expires_at) : PyLong_FromLong(0);
    if (self->expires_at == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->version = version;
    self->klen = (uint32_t)klen;
    self->vlen = 0;
    if (klen) {
        self->data = PyMem_Malloc((size_t)klen);
        if (self->data == NULL) {
            Py_DECREF(self);
            return PyErr_NoMemory();
        }
        memcpy(self->data, PyBytes_AS_STRING(key), (size_t)klen);
    }
    if (entry_store_value(self, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Entry_traverse(EntryObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->prev);
    Py_VISIT(self->next);
    Py_VISIT(self->expires_at);
    return 0;
}

static int
Entry_clear(EntryObject *self)
{
    Py_CLEAR(self->prev);
    Py_CLEAR(self->next);
    Py_CLEAR(self->expires_at);
    return 0;
}

static void
Entry_dealloc(EntryObject *self)
{
    PyObject_GC_UnTrack(self);
    /* A list's entries free one another through their links: the trashcan
       bounds the C stack that takes. */
    Py_TRASHCAN_BEGIN(self, Entry_dealloc)
    Entry_clear(self);
    PyMem_Free(self->data);
    self->data = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

static Py_hash_t
Entry_hash(EntryObject *self)
{
    return _Py_HashBytes(self->data, (Py_ssize_t)self->klen);
}

static PyObject *
Entry_richcompare(PyObject *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    EntryObject *e = (EntryObject *)self;
    const char *okey;
    Py_ssize_t olen;
    if (PyBytes_Check(other)) {
        okey = PyBytes_AS_STRING(other);
        olen = PyBytes_GET_SIZE(other);
    }
    else if (Entry_Check(other)) {
        okey = ((EntryObject *)other)->data;
        olen = (Py_ssize_t)((EntryObject *)other)->klen;
    }
    else {
        Py_RETURN_NOTIMPLEMENTED;
    }
    int equal = olen == (Py_ssize_t)e->klen && (olen == 0 || memcmp(e->data, okey, (size_t)olen) == 0);
    if (equal == (op == Py_EQ)) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* A setter's value: 0 if it is set (not deleted) and of ``type``; else -1 with the error Python gives. */
static int
check_set(PyObject *value, PyTypeObject *type, const char *what)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "an entry's %s cannot be deleted", what);
        return -1;
    }
    if (!PyObject_TypeCheck(value, type)) {
        PyErr_Format(PyExc_TypeError, "an entry's %s must be %s, not %.100s", what, type->tp_name, Py_TYPE(value)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *
Entry_get_key(EntryObject *self, void *closure)
{
    return PyBytes_FromStringAndSize(self->data, (Py_ssize_t)self->klen);
}

static PyObject *
Entry_get_value(EntryObject *self, void *closure)
{
    return PyBytes_FromStringAndSize(self->data ? self->data + self->klen : NULL, (Py_ssize_t)self->vlen);
}

static int
Entry_set_value(EntryObject *self, PyObject *value, void *closure)
{
    if (check_set(value, &PyBytes_Type, "value") < 0) {
        return -1;
    }
    return entry_store_value(self, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
}

static PyObject *
Entry_get_version(EntryObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->version);
}

static int
Entry_set_version(EntryObject *self, PyObject *value, void *closure)
{
    if (check_set(value, &PyLong_Type, "version") < 0) {
        return -1;
    }
    unsigned long long version = PyLong_AsUnsignedLongLong(value);
    if (version == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    self->version = version;
    return 0;
}

/* ``_version``: the version's offset from VERSION_BIAS, which the cache's
   loops read and write (the Python class stores that, a smaller int). */
static PyObject *
Entry_get_offset(EntryObject *self, void *closure)
{
    unsigned long long bias = (unsigned long long)VERSION_BIAS;
    if (self->version >= bias) {
        return PyLong_FromUnsignedLongLong(self->version - bias);
    }
    return PyLong_FromLongLong(-(long long)(bias - self->version));
}

static int
Entry_set_offset(EntryObject *self, PyObject *value, void *closure)
{
    if (check_set(value, &PyLong_Type, "version") < 0) {
        return -1;
    }
    unsigned long long bias = (unsigned long long)VERSION_BIAS;
    int overflow;
    long long offset = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (offset == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow == 0) {
        if (offset < -VERSION_BIAS) {
            goto out_of_range;
        }
        self->version = offset < 0 ? bias - (unsigned long long)(-offset) : bias + (unsigned long long)offset;
        return 0;
    }
    if (overflow > 0) {
        /* above 2**63 - 1: a version above 2**63 - 1 + VERSION_BIAS (the bias is under 2**63) */
        unsigned long long big = PyLong_AsUnsignedLongLong(value);
        if (big == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto out_of_range;
        }
        if (big > ~0ULL - bias) {
            goto out_of_range;
        }
        self->version = big + bias;
        return 0;
    }
out_of_range:
    PyErr_SetString(PyExc_OverflowError, "version out of range 0 .. 2**64-1");
    return -1;
}

static PyObject *
Entry_sizeof(EntryObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(Py_TYPE(self)->tp_basicsize + (size_t)self->klen + (size_t)self->vlen);
}

static PyObject *
Entry_repr(EntryObject *self)
{
    PyObject *key = Entry_get_key(self, NULL);
    if (key == NULL) {
        return NULL;
    }
    PyObject *r = PyUnicode_FromFormat("Entry(key=%R, value=<%u bytes>, expires_at=%R, version=%llu)", key,
                                       (unsigned)self->vlen, self->expires_at ? self->expires_at : Py_None,
                                       self->version);
    Py_DECREF(key);
    return r;
}

static PyMemberDef Entry_members[] = {
    {"prev", T_OBJECT_EX, offsetof(EntryObject, prev), 0, "The previous node of the LRU list."},
    {"next", T_OBJECT_EX, offsetof(EntryObject, next), 0, "The next node of the LRU list."},
    {"expires_at", T_OBJECT_EX, offsetof(EntryObject, expires_at), 0,
     "Absolute wall-clock milliseconds, or NO_EXPIRY (0)."},
    {NULL},
};

static PyGetSetDef Entry_getset[] = {
    {"key", (getter)Entry_get_key, NULL, "The key (bytes, a copy).", NULL},
    {"value", (getter)Entry_get_value, (setter)Entry_set_value, "The value (bytes, a copy).", NULL},
    {"version", (getter)Entry_get_version, (setter)Entry_set_version,
     "The write's version (0 if unversioned).", NULL},
    {"_version", (getter)Entry_get_offset, (setter)Entry_set_offset, "The version's offset from VERSION_BIAS.", NULL},
    {NULL},
};

static PyMethodDef Entry_methods[] = {
    {"__sizeof__", (PyCFunction)Entry_sizeof, METH_NOARGS,
     "The object's size and its key's and value's bytes (not their allocator rounding)."},
    {NULL},
};

PyDoc_STRVAR(Entry_doc,
             "Entry(key, value, expires_at=0, version=0)\n--\n\n"
             "One cached item and a node of the LRU list, its key and value in one buffer.\n\n"
             "Hashes as its key and compares equal to bytes equal to its key, so a dict\n"
             "keyed by entries is looked up with keys.");

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dcache.lru._entry.Entry",
    .tp_doc = Entry_doc,
    .tp_basicsize = sizeof(EntryObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Entry_new,
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_traverse = (traverseproc)Entry_traverse,
    .tp_clear = (inquiry)Entry_clear,
    .tp_hash = (hashfunc)Entry_hash,
    .tp_richcompare = Entry_richcompare,
    .tp_repr = (reprfunc)Entry_repr,
    .tp_members = Entry_members,
    .tp_getset = Entry_getset,
    .tp_methods = Entry_methods,
};

static struct PyModuleDef entry_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dcache.lru._entry",
    .m_doc = "The LRU's entry with its key and value in one buffer (see dcache/lru/cache.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__entry(void)
{
    if (PyType_Ready(&EntryType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&entry_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&EntryType);
    if (PyModule_AddObject(m, "Entry", (PyObject *)&EntryType) < 0) {
        Py_DECREF(&EntryType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "VERSION_BIAS", VERSION_BIAS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
