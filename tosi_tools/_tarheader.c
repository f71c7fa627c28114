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

static PyObject *parse(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "y*n", &view, &pos))
        return NULL;
    PyObject *result = NULL;
    if (pos < 0 || view.len - pos < BLOCK)
        goto plain_none;
    const unsigned char *b = (const unsigned char *)view.buf + pos;
    char kind = (char)b[156];
    char type;
    switch (kind) {
    case '0': case '\0': case '7':
        type = '0';
        break;
    case '1': case '2': case '3': case '4': case '5': case '6':
        type = kind;
        break;
    default:
        goto plain_none;  /* PAX, long names, sparse, labels, unknown types */
    }
    if (!checksum_ok(b))
        goto plain_none;
    long long mode, uid, gid, size, mtime, devmajor = 0, devminor = 0;
    if (!octal(b + 100, 8, &mode) || !octal(b + 108, 8, &uid) || !octal(b + 116, 8, &gid)
        || !octal(b + 124, 12, &size) || !octal(b + 136, 12, &mtime) || mtime > MAX_TIME)
        goto plain_none;
    if ((type == '3' || type == '4') && (!octal(b + 329, 8, &devmajor) || !octal(b + 337, 8, &devminor)))
        goto plain_none;

    /* The name: the POSIX prefix, a slash, the name field (as tarstream._entry joins them). */
    char name[155 + 1 + 100];
    size_t name_len = 0;
    if (memcmp(b + 257, "ustar\0", 6) == 0 && b[345] != 0) {
        size_t n = text_len(b + 345, 155);
        memcpy(name, b + 345, n);
        name[n] = '/';
        name_len = n + 1;
    }
    size_t n = text_len(b, 100);
    memcpy(name + name_len, b, n);
    name_len += n;

    long long data_size = size;
    if (type != '0')
        data_size = 0;  /* only files carry data */
    else if (kind == '\0' && name_len > 0 && name[name_len - 1] == '/') {
        type = '5';     /* pre-POSIX archives mark directories so */
        data_size = 0;
    }
    if (type == '5') {
        size_t stripped = name_len;
        while (stripped > 0 && name[stripped - 1] == '/')
            stripped--;
        if (stripped > 0)
            name_len = stripped;
    }

    PyObject *py_name = PyUnicode_DecodeUTF8(name, (Py_ssize_t)name_len, "surrogateescape");
    if (!py_name)
        goto done;
    PyObject *py_link = PyUnicode_DecodeUTF8((const char *)b + 157, (Py_ssize_t)text_len(b + 157, 100),
                                             "surrogateescape");
    if (!py_link) {
        Py_DECREF(py_name);
        goto done;
    }
    result = Py_BuildValue("(NCLLLLLNLLL)", py_name, (int)(unsigned char)type, mode & 07777, uid, gid,
                           size, mtime, py_link, devmajor, devminor, data_size);
    goto done;

plain_none:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(buf, pos): the plain tar header at buf[pos:pos+512] as a tuple, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tarheader", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarheader(void)
{
    return PyModule_Create(&module);
}
