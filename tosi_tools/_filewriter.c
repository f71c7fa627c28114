/* tosi_tools._filewriter: create many small files from a thread that never takes the GIL.
 *
 * A layer applier parses tar headers in Python; creating each file is four to
 * six system calls. A Python thread cannot do those beside the parser: it must
 * take the GIL back after every call and waits for it. This thread is plain C,
 * so the calls run while the parser goes on.
 *
 * Writer.submit(tasks, fds) queues a batch; each task is a tuple
 *   (dir_fd, name: bytes, data: bytes-like, mode, flags, uid, gid, mtime_ns)
 * and is created exactly as the Python applier would: openat(dir_fd, name,
 * O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC), the data written, fchown
 * (flags & 1), fchmod (flags & 2), futimens, close. `fds` are closed once the
 * batch is done (the caller passes duplicates of the directory handles so
 * that they stay the same directories whatever it closes meanwhile). The
 * batch keeps its tasks (and their bytes, read in place) alive until the
 * wait() or close() after it.
 *
 * The first task that fails stops the thread's work until the next wait(),
 * which returns (index of that task counted from the previous wait, errno),
 * or None when all were made. The caller redoes that task and all after it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    int dir_fd;
    const char *name;
    const char *data;
    Py_ssize_t size;
    unsigned int mode;
    unsigned int flags;
    unsigned int uid;
    unsigned int gid;
    long long mtime_ns;
} task_t;

typedef struct batch {
    struct batch *next;
    Py_ssize_t count;
    task_t *tasks_c;
    Py_ssize_t nfds;
    int *fds;
    Py_buffer *views;   /* released under the GIL, at wait() or close() */
    PyObject *tasks;    /* the task tuples: the names are read in place */
} batch_t;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t work;
    pthread_cond_t idle;
    batch_t *head, *tail;     /* to do */
    batch_t *finished;        /* done, views still to release */
    int stop;
    int busy;
    Py_ssize_t done;          /* tasks handled (made or skipped) since the last wait */
    Py_ssize_t failed;        /* -1, or the index of the first failed task */
    int failed_errno;
} Writer;

#define FILE_FLAGS (O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC)

static int make_file(const task_t *t)
{
    int fd = openat(t->dir_fd, t->name, FILE_FLAGS, (mode_t)(t->mode & 0777));
    if (fd < 0)
        return errno;
    int err = 0;
    const char *p = t->data;
    Py_ssize_t left = t->size;
    while (left > 0) {
        ssize_t n = write(fd, p, (size_t)left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        p += n;
        left -= n;
    }
    if (!err && (t->flags & 1) && fchown(fd, (uid_t)t->uid, (gid_t)t->gid) < 0)
        err = errno;
    if (!err && (t->flags & 2) && fchmod(fd, (mode_t)t->mode) < 0)
        err = errno;
    if (!err) {
        struct timespec ts[2];
        long long sec = t->mtime_ns / 1000000000LL;
        long long nsec = t->mtime_ns % 1000000000LL;
        if (nsec < 0) {
            nsec += 1000000000LL;
            sec -= 1;
        }
        ts[0].tv_sec = ts[1].tv_sec = (time_t)sec;
        ts[0].tv_nsec = ts[1].tv_nsec = (long)nsec;
        if (futimens(fd, ts) < 0)
            err = errno;
    }
    if (close(fd) < 0 && !err && errno != EINTR)
        err = errno;
    return err;
}

static void *run(void *arg)
{
    Writer *w = (Writer *)arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stop)
            pthread_cond_wait(&w->work, &w->mu);
        if (!w->head)
            break;  /* stopping, nothing left */
        batch_t *b = w->head;
        w->head = b->next;
        if (!w->head)
            w->tail = NULL;
        w->busy = 1;
        int skip = w->failed >= 0;
        Py_ssize_t base = w->done;
        pthread_mutex_unlock(&w->mu);

        Py_ssize_t failed = -1;
        int failed_errno = 0;
        for (Py_ssize_t i = 0; !skip && i < b->count; i++) {
            int err = make_file(&b->tasks_c[i]);
            if (err) {
                failed = base + i;
                failed_errno = err;
                break;
            }
        }
        for (Py_ssize_t i = 0; i < b->nfds; i++)
            close(b->fds[i]);

        pthread_mutex_lock(&w->mu);
        if (failed >= 0 && w->failed < 0) {
            w->failed = failed;
            w->failed_errno = failed_errno;
        }
        w->done += b->count;
        b->next = w->finished;
        w->finished = b;
        w->busy = 0;
        if (!w->head)
            pthread_cond_broadcast(&w->idle);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static void free_batch(batch_t *b)
{
    /* Under the GIL: the views hold the data objects. */
    if (b->views) {
        for (Py_ssize_t i = 0; i < b->count; i++)
            PyBuffer_Release(&b->views[i]);
        PyMem_Free(b->views);
    }
    Py_XDECREF(b->tasks);
    PyMem_Free(b->tasks_c);
    PyMem_Free(b->fds);
    PyMem_Free(b);
}

static void release_finished(Writer *w)
{
    batch_t *b = w->finished;
    w->finished = NULL;
    while (b) {
        batch_t *next = b->next;
        free_batch(b);
        b = next;
    }
}

static PyObject *writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Writer *w = (Writer *)type->tp_alloc(type, 0);
    if (!w)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->idle, NULL);
    w->failed = -1;
    int err = pthread_create(&w->thread, NULL, run, w);
    if (err) {
        Py_DECREF(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    w->started = 1;
    return (PyObject *)w;
}

static void stop_thread(Writer *w)
{
    if (!w->started)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    Py_END_ALLOW_THREADS
    w->started = 0;
    release_finished(w);
}

static void writer_dealloc(Writer *w)
{
    stop_thread(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->idle);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *writer_submit(Writer *w, PyObject *args)
{
    PyObject *tasks, *fds;
    if (!PyArg_ParseTuple(args, "OO", &tasks, &fds))
        return NULL;
    if (!w->started) {
        PyErr_SetString(PyExc_ValueError, "the writer is closed");
        return NULL;
    }
    PyObject *tseq = PySequence_Fast(tasks, "tasks must be a sequence");
    if (!tseq)
        return NULL;
    PyObject *fseq = PySequence_Fast(fds, "fds must be a sequence");
    if (!fseq) {
        Py_DECREF(tseq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(tseq), nf = PySequence_Fast_GET_SIZE(fseq);
    batch_t *b = PyMem_Calloc(1, sizeof(batch_t));
    if (b) {
        b->tasks_c = PyMem_Calloc(n ? n : 1, sizeof(task_t));
        b->views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
        b->fds = PyMem_Calloc(nf ? nf : 1, sizeof(int));
    }
    if (!b || !b->tasks_c || !b->views || !b->fds) {
        if (b) {
            PyMem_Free(b->tasks_c);
            PyMem_Free(b->views);
            PyMem_Free(b->fds);
            PyMem_Free(b);
        }
        Py_DECREF(tseq);
        Py_DECREF(fseq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        task_t *t = &b->tasks_c[i];
        PyObject *name;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(tseq, i), "iOy*IIIIL;a task is "
                              "(dir_fd, name, data, mode, flags, uid, gid, mtime_ns)",
                              &t->dir_fd, &name, &b->views[i], &t->mode, &t->flags,
                              &t->uid, &t->gid, &t->mtime_ns)) {
            b->count = i;
            free_batch(b);
            Py_DECREF(tseq);
            Py_DECREF(fseq);
            return NULL;
        }
        b->count = i + 1;
        if (!PyBytes_Check(name) || strlen(PyBytes_AS_STRING(name)) != (size_t)PyBytes_GET_SIZE(name)) {
            PyErr_SetString(PyExc_ValueError, "a task's name must be bytes without NUL");
            free_batch(b);
            Py_DECREF(tseq);
            Py_DECREF(fseq);
            return NULL;
        }
        /* b->tasks (set below) keeps the tuple, and so the name, alive. */
        t->name = PyBytes_AS_STRING(name);
        t->data = b->views[i].buf;
        t->size = b->views[i].len;
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fseq, i));
        if (fd == -1 && PyErr_Occurred()) {
            free_batch(b);
            Py_DECREF(tseq);
            Py_DECREF(fseq);
            return NULL;
        }
        b->fds[i] = (int)fd;
    }
    b->nfds = nf;
    b->tasks = tseq;  /* our reference now */
    Py_DECREF(fseq);

    pthread_mutex_lock(&w->mu);
    if (w->tail)
        w->tail->next = b;
    else
        w->head = b;
    w->tail = b;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *writer_wait(Writer *w, PyObject *unused)
{
    Py_ssize_t failed;
    int failed_errno;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    while (w->head || w->busy)
        pthread_cond_wait(&w->idle, &w->mu);
    failed = w->failed;
    failed_errno = w->failed_errno;
    w->failed = -1;
    w->failed_errno = 0;
    w->done = 0;
    pthread_mutex_unlock(&w->mu);
    Py_END_ALLOW_THREADS
    release_finished(w);
    if (failed < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ni)", failed, failed_errno);
}

static PyObject *writer_close(Writer *w, PyObject *unused)
{
    stop_thread(w);
    Py_RETURN_NONE;
}

static PyMethodDef writer_methods[] = {
    {"submit", (PyCFunction)writer_submit, METH_VARARGS, "Queue a batch of files; close `fds` after it."},
    {"wait", (PyCFunction)writer_wait, METH_NOARGS,
     "Wait for all queued batches: None, or (index of the first failed task, errno)."},
    {"close", (PyCFunction)writer_close, METH_NOARGS, "Finish the queued batches and stop the thread."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tosi_tools._filewriter.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread that creates small files, batch after batch, without the GIL.",
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
};

/* dup(fd): a close-on-exec duplicate, made without letting go of the GIL. os.dup lets
 * go of it, and getting it back while another thread runs Python costs up to a switch
 * interval (5 ms): for the one dup per batch of files that cost more than the batch. */
static PyObject *quick_dup(PyObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int dup = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(dup);
}

/* make_dir(dir_fd, name, mode, uid, gid, chown): mkdirat, then (chown true) the new
 * directory's owner set through a handle opened without following a symlink; the GIL
 * held throughout, for the reason dup() holds it: an applier makes a directory in four
 * calls, and with two layers applied side by side each os call waited for the GIL to
 * come back longer than the call took. OSError (with the name) as os.mkdir raises it. */
static PyObject *quick_make_dir(PyObject *self, PyObject *args)
{
    int dir_fd, chown;
    PyObject *name_obj, *name_bytes = NULL;
    unsigned int mode, uid, gid;
    if (!PyArg_ParseTuple(args, "iOIIIp", &dir_fd, &name_obj, &mode, &uid, &gid, &chown))
        return NULL;
    if (!PyUnicode_FSConverter(name_obj, &name_bytes))
        return NULL;
    const char *name = PyBytes_AS_STRING(name_bytes);
    int err = 0;
    if (mkdirat(dir_fd, name, (mode_t)mode) < 0)
        err = errno;
    else if (chown) {
        int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            err = errno;
        else {
            if (fchown(fd, (uid_t)uid, (gid_t)gid) < 0)
                err = errno;
            close(fd);
        }
    }
    Py_DECREF(name_bytes);
    if (err) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name_obj);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"dup", quick_dup, METH_O, "dup(fd): a close-on-exec duplicate of fd (the GIL held throughout)."},
    {"make_dir", quick_make_dir, METH_VARARGS,
     "make_dir(dir_fd, name, mode, uid, gid, chown): mkdirat and, if chown, fchown (the GIL held)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_filewriter", "Small files created by a C thread.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__filewriter(void)
{
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
