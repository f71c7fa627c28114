/* tosi_tools._tarheader: the common tar header, parsed without the interpreter.
 *
 * A layer of 100,000 small files is 100,000 headers; parsed in Python each
 * costs several microseconds of slicing, stripping and int() calls, the
 * biggest part of such a layer's applying that is not a system call. Almost
 * every header in real layers is a plain one: ustar or GNU, octal numbers, a
 * name without a PAX record. This parses exactly those and answers None for
 * anything else (PAX, long names, sparse files, base-256 numbers, odd
 * spacing, a bad checksum, the end of the archive), which tarstream's Python
 * parser then reads as it always did. So the two cannot disagree: what this
 * returns is what the Python parser returns for the same block.
 *
 * parse(buf, pos) reads the 512 bytes at buf[pos:] (None if fewer) and
 * returns (name, type, mode, uid, gid, size, mtime, linkname, devmajor,
 * devminor, data_size) as tarstream.Entry holds them.
 *
 * files(buf, pos, prefix, max_files, max_bytes, max_size, room_bytes,
 * room_inodes, dir_fd, canonical, as_root, chown_all, euid, egid, umask,
 * (batch, tasks, queued, made)) goes on from an applier that has just queued
 * a small file for the file writer (layer._Applier.apply_run): once the
 * Python code per file costs more than the system calls, the files that
 * follow it in the same directory are taken here, each as the applier would
 * take it. It takes entries while each is a plain header of a regular file
 * of at most max_size bytes without setuid or setgid, all of whose data is in
 * buf, named `prefix` (the raw bytes before the queued file's last slash)
 * plus one plain component (no slash, not "." or "..", no ".wh." whiteout),
 * so that its parent is the directory dir_fd / canonical the applier
 * resolved; at most max_files of them, stopping once their data reaches
 * max_bytes, and while what they charge the free-space guard (an inode, and
 * the data in whole 4 KiB blocks) fits room_inodes and room_bytes. For each it
 * appends the file writer's task (dir_fd, name, data, mode, flags, uid, gid,
 * mtime_ns; flags: 1 fchown, 2 fchmod, as layer._Applier.file_fixes decides
 * them) to `batch`, the applier's redo task (canonical, name, fields as
 * parse gives them, data, entry name) to `tasks`, (canonical, name) to
 * `queued` and canonical + (name,) to `made` unless it is None. Anything else
 * stops it, for the applier's Python code to handle. Returns (new pos,
 * files, data bytes, bytes charged).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#define BLOCK 512
/* tarstream.MAX_TIME: seconds whose nanoseconds fit in 64 bits */
#define MAX_TIME (9223372036854775807LL / 1000000000LL)

/* A plain octal field: spaces and NULs around octal digits, nothing else. */
static int octal(const unsigned char *field, int len, long long *out)
{
    int start = 0, end = len;
    while (start < end && (field[start] == ' ' || field[start] == 0))
        start++;
    while (end > start && (field[end - 1] == ' ' || field[end - 1] == 0))
        end--;
    if (start == end)
        return 0;
    long long value = 0;
    for (int i = start; i < end; i++) {
        unsigned char c = field[i];
        if (c < '0' || c > '7')
            return 0;
        value = value * 8 + (c - '0');
    }
    *out = value;
    return 1;
}

static int checksum_ok(const unsigned char *block)
{
    long long stored;
    if (!octal(block + 148, 8, &stored))
        return 0;
    long long unsigned_sum = 8 * ' ';
    long long signed_sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++) {
        if (i >= 148 && i < 156)
            continue;
        unsigned_sum += block[i];
        signed_sum += (signed char)block[i];
    }
    return stored == unsigned_sum || stored == signed_sum;
}

static size_t text_len(const unsigned char *field, size_t len)
{
    const unsigned char *nul = memchr(field, 0, len);
    return nul ? (size_t)(nul - field) : len;
}

/* What parse_block reads from a plain header. */
typedef struct {
    char type;
    long long mode, uid, gid, size, mtime, devmajor, devminor, data_size;
    char name[155 + 1 + 100];
    size_t name_len;
    const unsigned char *link;
    size_t link_len;
} header_t;

/* 1 and *h filled when the block at b is a plain header, else 0. */
static int parse_block(const unsigned char *b, header_t *h)
{
    char kind = (char)b[156];
    switch (kind) {
    case '0': case '\0': case '7':
        h->type = '0';
        break;
    case '1': case '2': case '3': case '4': case '5': case '6':
        h->type = kind;
        break;
    default:
        return 0;  /* PAX, long names, sparse, labels, unknown types */
    }
    if (!checksum_ok(b))
        return 0;
    h->devmajor = h->devminor = 0;
    if (!octal(b + 100, 8, &h->mode) || !octal(b + 108, 8, &h->uid) || !octal(b + 116, 8, &h->gid)
        || !octal(b + 124, 12, &h->size) || !octal(b + 136, 12, &h->mtime) || h->mtime > MAX_TIME)
        return 0;
    if ((h->type == '3' || h->type == '4')
        && (!octal(b + 329, 8, &h->devmajor) || !octal(b + 337, 8, &h->devminor)))
        return 0;
    h->mode &= 07777;

    /* The name: the POSIX prefix, a slash, the name field (as tarstream._entry joins them). */
    h->name_len = 0;
    if (memcmp(b + 257, "ustar\0", 6) == 0 && b[345] != 0) {
        size_t n = text_len(b + 345, 155);
        memcpy(h->name, b + 345, n);
        h->name[n] = '/';
        h->name_len = n + 1;
    }
    size_t n = text_len(b, 100);
    memcpy(h->name + h->name_len, b, n);
    h->name_len += n;

    h->data_size = h->size;
    if (h->type != '0')
        h->data_size = 0;  /* only files carry data */
    else if (kind == '\0' && h->name_len > 0 && h->name[h->name_len - 1] == '/') {
        h->type = '5';     /* pre-POSIX archives mark directories so */
        h->data_size = 0;
    }
    if (h->type == '5') {
        size_t stripped = h->name_len;
        while (stripped > 0 && h->name[stripped - 1] == '/')
            stripped--;
        if (stripped > 0)
            h->name_len = stripped;
    }
    h->link = b + 157;
    h->link_len = text_len(b + 157, 100);
    return 1;
}

/* The tuple tarstream.Entry is made from (see the module's doc). */
static PyObject *fields_of(const header_t *h)
{
    PyObject *py_name = PyUnicode_DecodeUTF8(h->name, (Py_ssize_t)h->name_len, "surrogateescape");
    if (!py_name)
        return NULL;
    PyObject *py_link = PyUnicode_DecodeUTF8((const char *)h->link, (Py_ssize_t)h->link_len,
                                             "surrogateescape");
    if (!py_link) {
        Py_DECREF(py_name);
        return NULL;
    }
    return Py_BuildValue("(NCLLLLLNLLL)", py_name, (int)(unsigned char)h->type, h->mode, h->uid, h->gid,
                         h->size, h->mtime, py_link, h->devmajor, h->devminor, h->data_size);
}

static PyObject *parse(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "y*n", &view, &pos))
        return NULL;
    PyObject *result;
    header_t h;
    if (pos < 0 || view.len - pos < BLOCK || !parse_block((const unsigned char *)view.buf + pos, &h))
        result = Py_NewRef(Py_None);
    else
        result = fields_of(&h);
    PyBuffer_Release(&view);
    return result;
}

/* Whether `base` (len n) is one plain name component an applier makes as it is:
 * not empty, ".", "..", a whiteout (".wh." prefix), and without a slash. */
static int plain_component(const char *base, size_t n)
{
    if (n == 0 || memchr(base, '/', n))
        return 0;
    if (base[0] == '.' && (n == 1 || (n == 2 && base[1] == '.')))
        return 0;
    if (n >= 4 && memcmp(base, ".wh.", 4) == 0)
        return 0;
    return 1;
}

/* Append to `tuple` a new tuple of its items and `item`. */
static PyObject *extended(PyObject *tuple, PyObject *item)
{
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    PyObject *out = PyTuple_New(n + 1);
    if (!out)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(out, i, Py_NewRef(PyTuple_GET_ITEM(tuple, i)));
    PyTuple_SET_ITEM(out, n, Py_NewRef(item));
    return out;
}

static PyObject *files(PyObject *self, PyObject *args)
{
    Py_buffer view, prefix;
    Py_ssize_t pos, max_files, max_bytes, max_size, room_bytes, room_inodes;
    int dir_fd, as_root, chown_all;
    unsigned int euid, egid, umask;
    PyObject *canonical, *batch, *tasks, *queued, *made;
    if (!PyArg_ParseTuple(args, "y*ny*nnnnniO!ppIII(O!O!O!O)", &view, &pos, &prefix, &max_files, &max_bytes,
                          &max_size, &room_bytes, &room_inodes, &dir_fd, &PyTuple_Type, &canonical,
                          &as_root, &chown_all, &euid, &egid, &umask,
                          &PyList_Type, &batch, &PyList_Type, &tasks, &PySet_Type, &queued, &made))
        return NULL;
    PyObject *result = NULL;
    if (made != Py_None && !PySet_Check(made)) {
        PyErr_SetString(PyExc_TypeError, "files: `made` must be a set or None");
        goto done;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    const char *pre = (const char *)prefix.buf;
    size_t pre_len = (size_t)prefix.len;
    Py_ssize_t count = 0, data_bytes = 0, charged = 0;
    header_t h;
    while (count < max_files && data_bytes < max_bytes && pos >= 0 && view.len - pos >= BLOCK) {
        if (!parse_block(buf + pos, &h) || h.type != '0' || h.data_size > max_size || (h.mode & 06000))
            break;
        Py_ssize_t padded = (Py_ssize_t)((h.data_size + BLOCK - 1) / BLOCK * BLOCK);
        if (view.len - pos - BLOCK < padded)
            break;  /* the data is not all here: the Python path reads on */
        if (h.name_len <= pre_len || memcmp(h.name, pre, pre_len) != 0)
            break;
        const char *base = h.name + pre_len;
        size_t base_len = h.name_len - pre_len;
        if (!plain_component(base, base_len))
            break;
        Py_ssize_t blocks = (Py_ssize_t)((h.data_size + 4095) / 4096 * 4096);
        if (room_inodes < count + 1 || room_bytes < charged + blocks)
            break;

        unsigned int flags = 0;
        if (as_root && (chown_all || h.uid != (long long)euid || h.gid != (long long)egid))
            flags |= 1;
        if ((h.mode & umask) || (h.mode & 07000))
            flags |= 2;
        PyObject *base_bytes = NULL, *base_str = NULL, *data = NULL, *fields = NULL, *key = NULL;
        PyObject *task = NULL, *redo = NULL, *path = NULL;
        int ok = 0;
        if (!(base_bytes = PyBytes_FromStringAndSize(base, (Py_ssize_t)base_len))
            || !(base_str = PyUnicode_DecodeUTF8(base, (Py_ssize_t)base_len, "surrogateescape"))
            || !(data = PyBytes_FromStringAndSize((const char *)buf + pos + BLOCK, (Py_ssize_t)h.data_size))
            || !(fields = fields_of(&h))
            || !(task = Py_BuildValue("(iOOIIIIL)", dir_fd, base_bytes, data, (unsigned int)h.mode, flags,
                                      (unsigned int)h.uid, (unsigned int)h.gid, h.mtime * 1000000000LL))
            || !(redo = PyTuple_Pack(5, canonical, base_str, fields, data, PyTuple_GET_ITEM(fields, 0)))
            || !(key = PyTuple_Pack(2, canonical, base_str))
            || PySet_Add(queued, key) < 0
            || (made != Py_None && (!(path = extended(canonical, base_str)) || PySet_Add(made, path) < 0))
            || PyList_Append(batch, task) < 0
            || PyList_Append(tasks, redo) < 0)
            ok = 0;
        else
            ok = 1;
        Py_XDECREF(base_bytes);
        Py_XDECREF(base_str);
        Py_XDECREF(data);
        Py_XDECREF(fields);
        Py_XDECREF(key);
        Py_XDECREF(task);
        Py_XDECREF(redo);
        Py_XDECREF(path);
        if (!ok)
            goto done;  /* (a failed append after the set's leaves only a harmless extra key) */
        pos += BLOCK + padded;
        count++;
        data_bytes += (Py_ssize_t)h.data_size;
        charged += blocks;
    }
    result = Py_BuildValue("(nnnn)", pos, count, data_bytes, charged);
done:
    PyBuffer_Release(&view);
    PyBuffer_Release(&prefix);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(buf, pos): the plain tar header at buf[pos:pos+512] as a tuple, or None"},
    {"files", files, METH_VARARGS,
     "files(buf, pos, prefix, ...): queue the run of small plain files at buf[pos:] (see the module's doc)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tarheader", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarheader(void)
{
    return PyModule_Create(&module);
}
