/* tosi_tools._tarheader: the common tar header, parsed without the interpreter.
 *
 * A layer of 100,000 small files is 100,000 headers; parsed in Python each
 * costs several microseconds of slicing, stripping and int() calls, the
 * biggest part of such a layer's applying that is not a system call. Almost
 * every header in real layers is a plain one: ustar or GNU, octal numbers, a
 * name without a PAX record; or such a header after a PAX extended header
 * ('x') of times alone, which GNU tar's --format=posix writes before every
 * member (Debian's base images are made so): "30 mtime=1700000000.123456789"
 * and the same for atime and ctime. This parses exactly those and answers
 * None for anything else (other PAX records, long names, sparse files,
 * base-256 numbers, odd spacing, a bad checksum, the end of the archive, a
 * PAX time it cannot hold exactly), which tarstream's Python parser then
 * reads as it always did. So the two cannot disagree: what this returns is
 * what the Python parser returns for the same blocks.
 *
 * parse(buf, pos) reads the header at buf[pos:] and returns (fields, data
 * position): fields (name, type, mode, uid, gid, size, mtime, linkname,
 * devmajor, devminor, data_size) as tarstream.Entry holds them (mtime an int,
 * or a fractions.Fraction for a PAX mtime with a fraction, as
 * tarstream._pax_time makes it), and where the entry's data starts: past the
 * header, and past the PAX header before it. None unless all of that is in
 * buf.
 *
 * files(buf, pos, prefix, max_files, max_bytes, max_size, room_bytes,
 * room_inodes, dir_fd, canonical, as_root, chown_all, euid, egid, umask,
 * (batch, tasks, queued, made)) goes on from an applier that has just queued
 * a small file for the file writer (layer._Applier.apply_run): once the
 * Python code per file costs more than the system calls, the files that
 * follow it in the same directory are taken here, each as the applier would
 * take it. It takes entries while each is a plain header (after a PAX
 * header of times or not, as parse reads them) of a regular file
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

#include <limits.h>
#include <string.h>

#define BLOCK 512
/* tarstream.MAX_TIME: seconds whose nanoseconds fit in 64 bits (MIN_TIME is -MAX_TIME) */
#define MAX_TIME (9223372036854775807LL / 1000000000LL)
/* tarstream._MAX_META: the largest PAX header read */
#define MAX_META (16LL << 20)
/* The most digits of a PAX time's fraction (trailing zeros aside) taken here */
#define MAX_FRACTION_DIGITS 18

static PyObject *Fraction;  /* fractions.Fraction */

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

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* A PAX mtime, as tarstream._apply_pax and _pax_time read it. */
typedef struct {
    int fraction;        /* it has a dot: a Fraction, else an int */
    long long num, den;  /* the value, num / den in lowest terms (den 1 without a fraction) */
    long long ns;        /* in nanoseconds, truncated toward zero (layer._ns) */
} pax_time_t;

/* 1 and *t filled when the value of an mtime record (n bytes at v) is one
 * tarstream takes (_PAX_TIME: -?([0-9]+(\.[0-9]*)?|\.[0-9]+), at most 20
 * characters before the dot, MIN_TIME to MAX_TIME), with at most
 * MAX_FRACTION_DIGITS digits in its fraction but trailing zeros and a
 * numerator that fits in 64 bits; else 0. */
static int pax_time(const unsigned char *v, size_t n, pax_time_t *t)
{
    size_t i = 0;
    int negative = 0;
    if (i < n && v[i] == '-') {
        negative = 1;
        i++;
    }
    size_t whole_start = i;
    while (i < n && is_digit(v[i]))
        i++;
    size_t whole_end = i, fraction_start = i, fraction_end = i;
    int dot = 0;
    if (i < n && v[i] == '.') {
        dot = 1;
        fraction_start = ++i;
        while (i < n && is_digit(v[i]))
            i++;
        fraction_end = i;
    }
    if (i != n)
        return 0;  /* not _PAX_TIME: a bad mtime */
    if (whole_end == whole_start && fraction_end == fraction_start)
        return 0;  /* "", "-", ".", "-.": a bad mtime */
    if (whole_end > 20)
        return 0;  /* more than time_t has: out of range */

    /* The seconds: MAX_TIME has 10 digits. */
    size_t s = whole_start;
    while (s < whole_end && v[s] == '0')
        s++;
    if (whole_end - s > 10)
        return 0;
    long long whole = 0;
    for (; s < whole_end; s++)
        whole = whole * 10 + (v[s] - '0');
    if (whole > MAX_TIME)
        return 0;  /* out of range */

    /* The fraction, its trailing zeros aside (they change nothing). */
    size_t significant = fraction_end;
    while (significant > fraction_start && v[significant - 1] == '0')
        significant--;
    size_t k = significant - fraction_start;
    if (k > MAX_FRACTION_DIGITS)
        return 0;
    if (whole == MAX_TIME && k > 0)
        return 0;  /* beyond MAX_TIME (or MIN_TIME): out of range */
    long long part = 0, den = 1;
    for (size_t j = fraction_start; j < significant; j++) {
        part = part * 10 + (v[j] - '0');  /* < 10**18 */
        den *= 10;
    }
    /* In lowest terms: what divides den (a power of 10) and whole * den + part divides part. */
    long long a = part, b = den;
    while (b) {
        long long r = a % b;
        a = b;
        b = r;
    }
    part /= a;  /* a >= 1: gcd(part, den) with den >= 1 */
    den /= a;
    if (whole > (LLONG_MAX - part) / den)
        return 0;
    t->fraction = dot;
    t->num = whole * den + part;
    t->den = den;

    long long ns = 0;
    for (size_t j = 0; j < 9; j++)
        ns = ns * 10 + (fraction_start + j < fraction_end ? v[fraction_start + j] - '0' : 0);
    ns += whole * 1000000000LL;  /* whole < MAX_TIME, or ns was 0: no overflow */
    if (negative) {
        t->num = -t->num;
        ns = -ns;
    }
    t->ns = ns;
    return 1;
}

/* The mtime of a PAX header whose records are times alone (atime, ctime,
 * mtime: tarstream._pax_records and _apply_pax read them so, and take no
 * other record as lightly), at b, with `avail` bytes from b in the buffer.
 * Returns how many bytes the header and its records take (the next header is
 * that far from b), with *has_mtime and *t saying the last mtime record; 0
 * for anything else, for the Python parser to read (or refuse). */
static Py_ssize_t time_pax(const unsigned char *b, Py_ssize_t avail, int *has_mtime, pax_time_t *t)
{
    long long size;
    if (avail < BLOCK || b[156] != 'x' || !checksum_ok(b) || !octal(b + 124, 12, &size) || size > MAX_META)
        return 0;
    long long padded = (size + BLOCK - 1) / BLOCK * BLOCK;
    if (avail - BLOCK < padded)
        return 0;  /* not all here: the Python path reads on */
    const unsigned char *data = b + BLOCK;
    long long pos = 0, end = size;
    *has_mtime = 0;
    while (pos < end) {
        if (data[pos] == 0)
            break;  /* padding */
        /* "<length> <key>=<value>\n", the length a decimal that counts it all */
        long long q = pos, length = 0;
        while (q < end && is_digit(data[q])) {
            if (length > end)
                return 0;  /* longer than the header: malformed (and no overflow) */
            length = length * 10 + (data[q] - '0');
            q++;
        }
        if (q == pos || q >= end || data[q] != ' ')
            return 0;  /* no length, or not digits up to the first space */
        if (length <= 0 || length > end - pos)
            return 0;
        long long record = q + 1, record_end = pos + length;  /* the record with its "\n" */
        if (record_end <= record || data[record_end - 1] != '\n')
            return 0;
        const unsigned char *eq = memchr(data + record, '=', (size_t)(record_end - record));
        if (!eq)
            return 0;
        size_t key_len = (size_t)(eq - (data + record));
        if (key_len != 5)
            return 0;
        if (memcmp(data + record, "mtime", 5) == 0) {
            const unsigned char *value = eq + 1;
            if (!pax_time(value, (size_t)(data + record_end - 1 - value), t))
                return 0;
            *has_mtime = 1;  /* the last one counts, as in _apply_pax */
        }
        else if (memcmp(data + record, "atime", 5) != 0 && memcmp(data + record, "ctime", 5) != 0)
            return 0;  /* (atime and ctime are not read, whatever they say) */
        pos += length;
    }
    return BLOCK + (Py_ssize_t)padded;
}

/* The mtime tarstream gives: an int, or a Fraction when the PAX time has a dot. */
static PyObject *time_object(const pax_time_t *t)
{
    if (!t->fraction)
        return PyLong_FromLongLong(t->num);
    return PyObject_CallFunction(Fraction, "LL", t->num, t->den);
}

/* The tuple tarstream.Entry is made from (see the module's doc); the mtime
 * of a PAX header of times when has_mtime. */
static PyObject *fields_of(const header_t *h, int has_mtime, const pax_time_t *t)
{
    PyObject *py_mtime = has_mtime ? time_object(t) : PyLong_FromLongLong(h->mtime);
    if (!py_mtime)
        return NULL;
    PyObject *py_name = PyUnicode_DecodeUTF8(h->name, (Py_ssize_t)h->name_len, "surrogateescape");
    if (!py_name) {
        Py_DECREF(py_mtime);
        return NULL;
    }
    PyObject *py_link = PyUnicode_DecodeUTF8((const char *)h->link, (Py_ssize_t)h->link_len,
                                             "surrogateescape");
    if (!py_link) {
        Py_DECREF(py_mtime);
        Py_DECREF(py_name);
        return NULL;
    }
    return Py_BuildValue("(NCLLLLNNLLL)", py_name, (int)(unsigned char)h->type, h->mode, h->uid, h->gid,
                         h->size, py_mtime, py_link, h->devmajor, h->devminor, h->data_size);
}

/* 1 and *h (and *skip, *has_mtime, *t) filled when at b (avail bytes in the buffer) is a
 * plain header, or a PAX header of times and a plain header after it; *skip is how far
 * the plain header is from b. */
static int parse_at(const unsigned char *b, Py_ssize_t avail, header_t *h, Py_ssize_t *skip,
                    int *has_mtime, pax_time_t *t)
{
    *has_mtime = 0;
    *skip = 0;
    if (avail < BLOCK)
        return 0;
    if (b[156] == 'x') {
        *skip = time_pax(b, avail, has_mtime, t);
        if (!*skip || avail - *skip < BLOCK)
            return 0;
    }
    /* (parse_block refuses a header mtime beyond MAX_TIME even where a PAX mtime replaces it) */
    return parse_block(b + *skip, h);
}

static PyObject *parse(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "y*n", &view, &pos))
        return NULL;
    PyObject *result;
    header_t h;
    pax_time_t t;
    Py_ssize_t skip;
    int has_mtime;
    if (pos < 0 || pos > view.len
        || !parse_at((const unsigned char *)view.buf + pos, view.len - pos, &h, &skip, &has_mtime, &t))
        result = Py_NewRef(Py_None);
    else
        result = Py_BuildValue("(Nn)", fields_of(&h, has_mtime, &t), pos + skip + BLOCK);
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
    pax_time_t t;
    Py_ssize_t skip;
    int has_mtime;
    while (count < max_files && data_bytes < max_bytes && pos >= 0 && view.len - pos >= BLOCK) {
        if (!parse_at(buf + pos, view.len - pos, &h, &skip, &has_mtime, &t) || h.type != '0'
            || h.data_size > max_size || (h.mode & 06000))
            break;
        Py_ssize_t padded = (Py_ssize_t)((h.data_size + BLOCK - 1) / BLOCK * BLOCK);
        if (view.len - pos - skip - BLOCK < padded)
            break;  /* the data is not all here: the Python path reads on */
        const unsigned char *header = buf + pos + skip;
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
            || !(data = PyBytes_FromStringAndSize((const char *)header + BLOCK, (Py_ssize_t)h.data_size))
            || !(fields = fields_of(&h, has_mtime, &t))
            || !(task = Py_BuildValue("(iOOIIIIL)", dir_fd, base_bytes, data, (unsigned int)h.mode, flags,
                                      (unsigned int)h.uid, (unsigned int)h.gid,
                                      has_mtime ? t.ns : h.mtime * 1000000000LL))
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
        pos += skip + BLOCK + padded;
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
     "parse(buf, pos): (fields, data position) of the plain tar header at buf[pos:], or None"},
    {"files", files, METH_VARARGS,
     "files(buf, pos, prefix, ...): queue the run of small plain files at buf[pos:] (see the module's doc)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tarheader", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarheader(void)
{
    if (!Fraction) {
        PyObject *fractions = PyImport_ImportModule("fractions");
        if (!fractions)
            return NULL;
        Fraction = PyObject_GetAttrString(fractions, "Fraction");
        Py_DECREF(fractions);
        if (!Fraction)
            return NULL;
    }
    return PyModule_Create(&module);
}
