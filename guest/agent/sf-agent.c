/* sf-agent: the in-guest agent of the sftest guest image.
 *
 * It speaks the Shaken Fist agent protocol v2 (protos/shakenfist/agent/v2/agent.proto,
 * wire-identical to shakenfist-agent 1.0.1), with protobuf encoded and decoded by hand.
 * The host connects and speaks first. There is no framing: the host writes one serialized
 * HypervisorToAgent per write, and we parse our whole input buffer as one envelope after
 * every read. A truncated buffer means "read more"; concatenated envelopes parse as one.
 * Each reply is one AgentToHypervisor envelope in one write.
 *
 * It also speaks the legacy protocol v1 (JSON packets, what shakenfist-agent 0.7.0 speaks)
 * on the port "sf-agent": see "protocol v1" below.
 *
 * Transports: the virtio-serial ports named "sf-agent2" and "sf-agent" (default; found
 * through sysfs as the guest has no udev), or one of --device PATH, --unix PATH (listen, one
 * connection at a time) or --stdio, for v2 or (--v1) v1. By default and with --device it also
 * listens on vsock port 1025 for v2 if /dev/vsock exists (each connection in its own
 * process, as the host may hold several at once).
 *
 * Build: guest/agent/build.sh (gcc -static -Os, C11, no libraries beyond libc).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define VERSION "sf-test-agent 1"
#define PORT_NAME "sf-agent2"
#define V1_PORT_NAME "sf-agent"
#define VSOCK_PORT 1025
#define MAX_BUFFER (64u << 20) /* an input buffer this big that still does not parse is garbage */
#define READ_SIZE (1u << 20)
#define CHUNK 102400 /* get-file piece size, as agent 1.0.1 */

static int verbose;
extern char **environ;

static void logmsg(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    if (write(2, line, n) < 0) { /* nowhere else to report it */ }
}

static double now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void msleep(int ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* ---- growable byte buffer; a failed allocation sets oom and drops further data ---- */

typedef struct { uint8_t *p; size_t len, cap; int oom; } buf_t;

/* room for n more bytes */
static uint8_t *buf_space(buf_t *b, size_t n) {
    if (b->oom)
        return NULL;
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap - b->len < n)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return NULL;
        }
        b->p = p;
        b->cap = cap;
    }
    return b->p + b->len;
}

static void buf_add(buf_t *b, const void *d, size_t n) {
    uint8_t *q = buf_space(b, n);
    if (q && n) {
        memcpy(q, d, n);
        b->len += n;
    }
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ---- protobuf encoder. It writes backwards (from the end of its buffer towards the
 * start, like upb), so a message's length is known once its fields are written and goes
 * in front of them. Fields are therefore written last to first. One "external" field may
 * refer to bytes held elsewhere (a big stdout), which are then not copied. */

typedef struct {
    uint8_t *p;
    size_t cap, used; /* the data is p[cap - used, cap) */
    int oom;
    const uint8_t *ext; /* external bytes, sent between the first used - split bytes ... */
    size_t extn, split; /* ... and the last split bytes */
} enc_t;

static void e_raw(enc_t *e, const void *d, size_t n) {
    if (e->oom || !n)
        return;
    if (e->cap - e->used < n) {
        size_t cap = e->cap ? e->cap * 2 : 4096;
        while (cap - e->used < n)
            cap *= 2;
        uint8_t *p = malloc(cap);
        if (!p) {
            e->oom = 1;
            return;
        }
        if (e->used)
            memcpy(p + cap - e->used, e->p + e->cap - e->used, e->used);
        free(e->p);
        e->p = p;
        e->cap = cap;
    }
    e->used += n;
    memcpy(e->p + e->cap - e->used, d, n);
}

static size_t e_mark(const enc_t *e) { return e->used + e->extn; }

static void e_varint(enc_t *e, uint64_t v) {
    uint8_t t[10];
    size_t n = 0;
    do {
        uint8_t c = v & 0x7f;
        v >>= 7;
        t[n++] = c | (v ? 0x80 : 0);
    } while (v);
    e_raw(e, t, n);
}

static void e_tag(enc_t *e, int field, int wt) { e_varint(e, (uint64_t)field << 3 | wt); }

/* Close length-delimited field `field` holding everything written since mark (even if empty). */
static void e_close(enc_t *e, int field, size_t mark) {
    e_varint(e, e_mark(e) - mark);
    e_tag(e, field, 2);
}

/* proto3 scalars: default values (0, "", 0.0) are not written. */
static void e_bytes(enc_t *e, int field, const void *d, size_t n) {
    if (!n)
        return;
    size_t m = e_mark(e);
    e_raw(e, d, n);
    e_close(e, field, m);
}

static void e_str(enc_t *e, int field, const char *s) { e_bytes(e, field, s, strlen(s)); }

/* int32, int64, bool, enum */
static void e_int(enc_t *e, int field, int64_t v) {
    if (v) {
        e_varint(e, (uint64_t)v);
        e_tag(e, field, 0);
    }
}

static void e_double(enc_t *e, int field, double d) {
    uint64_t u;
    uint8_t t[8];
    if (d == 0)
        return;
    memcpy(&u, &d, 8);
    for (int i = 0; i < 8; i++)
        t[i] = u >> (8 * i);
    e_raw(e, t, 8);
    e_tag(e, field, 1);
}

/* at most once */
static void e_ext(enc_t *e, int field, const uint8_t *d, size_t n) {
    if (!n || e->ext)
        return;
    e->split = e->used;
    e->ext = d;
    e->extn = n;
    e_varint(e, n);
    e_tag(e, field, 2);
}

/* ---- UTF-8: proto3 strings must be valid UTF-8 or the host's parser rejects the whole
 * envelope (and, with this framing, waits forever). Invalid bytes become U+FFFD. */

/* length of the valid sequence at p, or 0 */
static size_t utf8_len(const uint8_t *p, size_t n) {
    uint8_t c = p[0];
    size_t k;
    uint32_t cp, min;
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0)
        k = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0)
        k = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0)
        k = 4, cp = c & 0x07, min = 0x10000;
    else
        return 0;
    if (n < k)
        return 0;
    for (size_t i = 1; i < k; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return k;
}

/* d itself if it is valid UTF-8, else a repaired copy in fix (*n updated). */
static const uint8_t *text(const uint8_t *d, size_t *n, buf_t *fix) {
    size_t i = 0, k;
    while (i < *n && (k = utf8_len(d + i, *n - i)))
        i += k;
    if (i == *n)
        return d;
    for (i = 0; i < *n; i += k ? k : 1) {
        k = utf8_len(d + i, *n - i);
        buf_add(fix, k ? d + i : (const uint8_t *)"\xef\xbf\xbd", k ? k : 3);
    }
    *n = fix->len;
    return fix->p;
}

static void e_text(enc_t *e, int field, const char *s) {
    buf_t fix = { 0 };
    size_t n = strlen(s);
    const uint8_t *t = text((const uint8_t *)s, &n, &fix);
    e_bytes(e, field, t, n);
    buf_free(&fix);
}

/* ---- protobuf decoder: a field iterator over [p, end). */

typedef struct { const uint8_t *p, *end; } rd_t;
typedef struct { uint32_t num; int wt; uint64_t v; const uint8_t *d; size_t n; } fld_t;
enum { RD_END = 0, RD_OK = 1, RD_SHORT = -1, RD_BAD = -2 };

static int rd_varint(rd_t *r, uint64_t *v) {
    *v = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end)
            return RD_SHORT;
        uint8_t c = *r->p++;
        *v |= (uint64_t)(c & 0x7f) << (7 * i);
        if (!(c & 0x80))
            return RD_OK;
    }
    return RD_BAD;
}

/* The next field: RD_OK, RD_END, RD_SHORT (runs past end) or RD_BAD (can never parse). */
static int rd_next(rd_t *r, fld_t *f) {
    uint64_t key;
    int rc;
    if (r->p >= r->end)
        return RD_END;
    if ((rc = rd_varint(r, &key)) != RD_OK)
        return rc;
    if (key >> 32 || key >> 3 == 0)
        return RD_BAD;
    f->num = key >> 3;
    f->wt = key & 7;
    f->d = NULL;
    f->n = 0;
    switch (f->wt) {
    case 0:
        return rd_varint(r, &f->v);
    case 1:
    case 5: {
        size_t k = f->wt == 1 ? 8 : 4;
        if ((size_t)(r->end - r->p) < k)
            return RD_SHORT;
        f->v = 0;
        for (size_t i = 0; i < k; i++)
            f->v |= (uint64_t)r->p[i] << (8 * i);
        r->p += k;
        return RD_OK;
    }
    case 2:
        if ((rc = rd_varint(r, &f->v)) != RD_OK)
            return rc;
        if (f->v > MAX_BUFFER)
            return RD_BAD;
        if ((uint64_t)(r->end - r->p) < f->v)
            return RD_SHORT;
        f->d = r->p;
        f->n = f->v;
        r->p += f->n;
        return RD_OK;
    default:
        return RD_BAD; /* groups (3, 4), which nobody sends, and the invalid 6 and 7 */
    }
}

static int utf8_ok(const uint8_t *d, size_t n) {
    size_t k;
    for (size_t i = 0; i < n; i += k)
        if (!(k = utf8_len(d + i, n - i)))
            return 0;
    return 1;
}

/* The host-to-agent schema, for checking a command as the host's protobuf parser would
 * (valid UTF-8 in strings, sub-messages that parse) before echoing it in last_envelope:
 * otherwise the host could not parse our reply. Per message: {field, 's'tring or
 * 'm'essage, message index}; other fields are skipped, as protobuf does. */
typedef struct { uint8_t num; char type; uint8_t sub; } field_t;
static const field_t SCHEMA[][20] = {
    { { 1, 'm', 1 } },                                                  /* 0 HypervisorToAgent */
    { { 1, 's' }, { 10, 'm', 2 }, { 11, 'm', 3 }, { 20, 'm', 4 }, { 21, 'm', 5 }, { 30, 'm', 3 },
      { 40, 'm', 6 }, { 41, 'm', 3 }, { 42, 'm', 3 }, { 43, 'm', 8 }, { 44, 'm', 9 },
      { 45, 'm', 10 }, { 46, 'm', 11 }, { 47, 'm', 2 }, { 48, 'm', 10 }, { 50, 'm', 2 },
      { 51, 'm', 3 } },                                                 /* 1 ...Command */
    { { 1, 's' } },                               /* 2 HypervisorWelcome, GetFileRequest, ExecStream */
    { { 0 } },                                    /* 3 the empty requests, ExecInput */
    { { 1, 's' }, { 2, 'm', 0 } },                /* 4 CommandError */
    { { 1, 'm', 0 } },                            /* 5 UnknownCommand */
    { { 1, 's' }, { 2, 'm', 7 }, { 3, 's' }, { 5, 's' }, { 6, 's' }, { 7, 's' } }, /* 6 Execute */
    { { 1, 's' }, { 2, 's' } },                   /* 7 EnvironmentVariable */
    { { 1, 's' }, { 4, 'm', 9 } },                /* 8 PutFileRequest */
    { { 3, 's' } },                               /* 9 FileChunk */
    { { 1, 's' } },                               /* 10 ChmodRequest, FileChunkReply */
    { { 1, 's' }, { 2, 's' }, { 3, 's' } },       /* 11 ChownRequest */
};

static int valid(const uint8_t *d, size_t n, int msg, int depth) {
    rd_t r = { d, d + n };
    fld_t f;
    int rc = RD_BAD;
    while (depth < 32 && (rc = rd_next(&r, &f)) == RD_OK) {
        for (const field_t *s = SCHEMA[msg]; f.wt == 2 && s->num; s++)
            if (s->num == f.num && !(s->type == 's' ? utf8_ok(f.d, f.n) : valid(f.d, f.n, s->sub, depth + 1)))
                return 0;
    }
    return rc == RD_END;
}

/* a string field as a C string; NULL if it has a NUL */
static char *dupstr(const fld_t *f) {
    if (memchr(f->d, 0, f->n))
        return NULL;
    char *s = malloc(f->n + 1);
    if (s) {
        memcpy(s, f->d, f->n);
        s[f->n] = 0;
    }
    return s;
}

/* ---- base64 ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t b64_encode(const uint8_t *in, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    return o;
}

/* -1 if invalid */
static long b64_decode(const uint8_t *in, size_t n, uint8_t *out) {
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    long o = 0;
    for (size_t i = 0; i < n; i++) {
        const char *c = in[i] ? strchr(B64, in[i]) : NULL;
        if (in[i] == '=' || isspace(in[i])) {
            pad += in[i] == '=';
            continue;
        }
        if (!c || pad)
            return -1;
        acc = acc << 6 | (uint32_t)(c - B64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = acc >> bits;
            acc &= (1u << bits) - 1;
        }
    }
    return o;
}

/* ---- one host connection ---- */

/* A streamed execution (exec_stream_request): one at a time per session, run beside
 * the session's other commands; serve() polls its pipes with the host's input. */
typedef struct {
    pid_t pid;                  /* 0: none; also its process group (it runs setsid) */
    int fd[3];                  /* its stdin (our write end), stdout, stderr; -1 when closed */
    buf_t in;                   /* stdin not yet written */
    int in_eof, timed_out;      /* in_eof: close stdin once `in` is written */
    double t0, deadline;        /* CLOCK_MONOTONIC; deadline 0: none */
    uint8_t id[64];             /* the command_id its replies carry */
    size_t idlen;
} job_t;

typedef struct {
    job_t job;
    int in, out, in_eof, dead;  /* dead: a write failed, the host has gone */
    buf_t pending;              /* input read while we waited to write */
    int put_fd;                 /* the file a put_file_request is writing, or -1 */
    char *put_path;
    const uint8_t *cmd, *id;    /* the command being handled, and its command_id */
    size_t cmdlen, idlen;
} sess_t;

static ssize_t read_in(sess_t *s, buf_t *b) {
    uint8_t *q = buf_space(b, READ_SIZE);
    if (!q) {
        errno = ENOMEM;
        return -1;
    }
    ssize_t n = read(s->in, q, READ_SIZE);
    if (n > 0)
        b->len += n;
    return n;
}

/* Write all of iov. While the host cannot take more, read what it sends into pending, so
 * that neither side can block the other (the host acks every get-file chunk). */
static int write_all(sess_t *s, struct iovec *iov, int cnt) {
    while (cnt > 0) {
        ssize_t n = writev(s->out, iov, cnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -1;
            struct pollfd pf[2] = { { s->out, POLLOUT, 0 }, { s->in, POLLIN, 0 } };
            int np = s->in_eof || s->pending.len > MAX_BUFFER ? 1 : 2;
            if (poll(pf, np, -1) < 0 && errno != EINTR)
                return -1;
            if (np == 2 && pf[1].revents && read_in(s, &s->pending) == 0)
                s->in_eof = 1;
            if ((pf[0].revents & (POLLHUP | POLLERR)) && !(pf[0].revents & POLLOUT))
                return -1; /* a virtio-serial port whose host end is not connected */
            continue;
        }
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= iov->iov_len;
            iov++, cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= n;
        }
    }
    return 0;
}

static void reply_error(sess_t *s, const char *msg);

/* Wrap the fields in e as reply `field` of an AgentToHypervisorCommand echoing the
 * command_id, in an AgentToHypervisor envelope, and write it. Frees e. */
static void send_reply(sess_t *s, int field, enc_t *e) {
    buf_t fix = { 0 };
    size_t idlen = s->idlen;
    const uint8_t *id = s->id ? text(s->id, &idlen, &fix) : NULL;
    e_close(e, field, 0);
    e_bytes(e, 1, id, idlen);
    e_close(e, 1, 0);
    buf_free(&fix);
    if (e->oom) {
        free(e->p);
        s->cmd = NULL;
        if (field != 20) /* an error reply is small: no recursion */
            reply_error(s, "out of memory");
        return;
    }
    uint8_t *d = e->p + e->cap - e->used;
    struct iovec iov[3] = { { d, e->used - e->split }, { (void *)e->ext, e->extn },
                            { d + e->used - e->split, e->split } };
    if (!s->dead && write_all(s, iov, 3) < 0)
        s->dead = 1;
    free(e->p);
}

static void reply_error(sess_t *s, const char *msg) {
    enc_t e = { 0 };
    if (s->cmd) { /* last_envelope: a HypervisorToAgent holding just the failed command */
        e_raw(&e, s->cmd, s->cmdlen);
        e_close(&e, 1, 0);
        e_close(&e, 2, 0);
    }
    e_text(&e, 1, msg);
    send_reply(s, 20, &e);
}

/* An error about a command we could not parse: without last_envelope, as the host's
 * parser would reject the echoed bytes and so the whole reply. */
static void malformed(sess_t *s, const char *msg) {
    s->cmd = NULL;
    reply_error(s, msg);
}

/* as Python's str(OSError) */
static void reply_errno(sess_t *s, const char *path) {
    char msg[4200];
    snprintf(msg, sizeof msg, "[Errno %d] %s: '%s'", errno, strerror(errno), path);
    reply_error(s, msg);
}

static void reply_unknown(sess_t *s) {
    enc_t e = { 0 };
    e_raw(&e, s->cmd, s->cmdlen);
    e_close(&e, 1, 0); /* HypervisorToAgent.commands */
    e_close(&e, 1, 0); /* UnknownCommand.last_envelope */
    send_reply(s, 21, &e);
}

/* ---- handlers ---- */

/* as psutil.boot_time(): btime in /proc/stat */
static double boot_time(void) {
    char line[4096];
    double bt = 0, up = 0;
    FILE *f = fopen("/proc/stat", "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "btime %lf", &bt) == 1)
            break;
    if (f)
        fclose(f);
    if (bt > 0)
        return bt;
    if ((f = fopen("/proc/uptime", "r"))) {
        if (fscanf(f, "%lf", &up) != 1)
            up = 0;
        fclose(f);
    }
    return now(CLOCK_REALTIME) - up;
}

/* a whole (small) file as a C string, or NULL */
static char *slurp(const char *path) {
    buf_t b = { 0 };
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n;
    if (fd < 0)
        return NULL;
    while (buf_space(&b, 65536) && (n = read(fd, b.p + b.len, 65536)) > 0)
        b.len += n;
    close(fd);
    buf_add(&b, "", 1);
    if (b.oom)
        buf_free(&b);
    return (char *)b.p;
}

/* The lines of text (modified in place), for walking backwards; free the result. */
static char **split_lines(char *text, size_t *count) {
    buf_t v = { 0 };
    for (char *save = NULL, *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
        buf_add(&v, &l, sizeof l);
    *count = v.oom ? 0 : v.len / sizeof(char *);
    return (char **)v.p;
}

static void gather_facts(sess_t *s) {
    static const char *keys[] = { "rsa", "ecdsa", "ed25519" };
    enc_t e = { 0 };
    char path[64], *t, **lines;
    size_t n;
    for (int i = 2; i >= 0; i--) { /* ssh_host_keys = 3 */
        snprintf(path, sizeof path, "/etc/ssh/ssh_host_%s_key.pub", keys[i]);
        if ((t = slurp(path))) {
            size_t m = e_mark(&e);
            e_text(&e, 2, t);
            e_str(&e, 1, keys[i]);
            e_close(&e, 3, m);
            free(t);
        }
    }
    if ((t = slurp("/proc/mounts"))) { /* mount_points = 2 */
        lines = split_lines(t, &n);
        while (n--) {
            char dev[1024], dir[1024], type[256];
            if (sscanf(lines[n], "%1023s %1023s %255s", dev, dir, type) != 3)
                continue;
            size_t m = e_mark(&e);
            e_text(&e, 3, type);
            e_text(&e, 2, dir);
            e_text(&e, 1, dev);
            e_close(&e, 2, m);
        }
        free(lines);
        free(t);
    }
    /* distro_facts = 1: os-release KEY="value" as name "key", value JSON-encoded */
    if (!(t = slurp("/etc/os-release")))
        t = slurp("/usr/lib/os-release");
    lines = t ? split_lines(t, &n) : NULL;
    if (!lines || !n) {
        size_t m = e_mark(&e);
        e_str(&e, 2, "\"sftest\"");
        e_str(&e, 1, "name");
        e_close(&e, 1, m);
    }
    while (lines && n--) {
        char *k = lines[n], *v = strchr(k, '='), q;
        if (*k == '#' || !v)
            continue;
        *v++ = 0;
        buf_t json = { 0 };
        q = *v == '"' || *v == '\'' ? *v++ : 0;
        buf_add(&json, "\"", 1);
        for (; *v && *v != q; v++) {
            if (q == '"' && *v == '\\' && v[1])
                v++;
            if (*v == '"' || *v == '\\')
                buf_add(&json, "\\", 1);
            if ((uint8_t)*v >= 0x20)
                buf_add(&json, v, 1);
        }
        buf_add(&json, "\"", 2); /* with the terminating NUL */
        for (char *c = k; *c; c++)
            *c = tolower((unsigned char)*c);
        size_t m = e_mark(&e);
        if (!json.oom)
            e_text(&e, 2, (char *)json.p);
        e_text(&e, 1, k);
        e_close(&e, 1, m);
        buf_free(&json);
    }
    free(lines);
    free(t);
    send_reply(s, 42, &e);
}

/* Read a child's stdout (fo) and stderr (fe) until both are closed (and close them),
 * then wait for it: its exit code, or minus the signal that ended it. */
static int collect(pid_t pid, int fo, int fe, buf_t out[2]) {
    struct pollfd pf[2] = { { fo, POLLIN, 0 }, { fe, POLLIN, 0 } };
    uint8_t scratch[4096];
    while (pf[0].fd >= 0 || pf[1].fd >= 0) {
        if (poll(pf, 2, -1) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !pf[i].revents)
                continue;
            uint8_t *q = buf_space(&out[i], 65536); /* out of memory: keep draining */
            ssize_t k = read(pf[i].fd, q ? q : scratch, q ? 65536 : sizeof scratch);
            if (k > 0 && q)
                out[i].len += k;
            else if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN))
                close(pf[i].fd), pf[i].fd = -1;
        }
    }
    for (int i = 0; i < 2; i++)
        if (pf[i].fd >= 0)
            close(pf[i].fd);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

static void execute(sess_t *s, const uint8_t *d, size_t n) {
    rd_t r = { d, d + n };
    fld_t f, g;
    int rc, prio = 0, bad = 0;
    char *cmd = NULL, *cwd = NULL, *ns = NULL;
    fld_t rid = { 0 }, eid = { 0 };
    buf_t env = { 0 }; /* char *[] */
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 4 && f.wt == 0)
            prio = (int)f.v;
        if (f.wt != 2)
            continue;
        if (f.num == 1)
            free(cmd), bad |= !(cmd = dupstr(&f));
        else if (f.num == 3)
            free(ns), bad |= !(ns = dupstr(&f));
        else if (f.num == 5)
            free(cwd), bad |= !(cwd = dupstr(&f));
        else if (f.num == 6)
            rid = f;
        else if (f.num == 7)
            eid = f;
        else if (f.num == 2) { /* EnvironmentVariable{name=1, value=2} */
            rd_t er = { f.d, f.d + f.n };
            fld_t name = { 0 }, value = { 0 };
            while ((rc = rd_next(&er, &g)) == RD_OK)
                if (g.wt == 2 && (g.num == 1 || g.num == 2))
                    *(g.num == 1 ? &name : &value) = g;
            char *nv = malloc(name.n + value.n + 2);
            bad |= rc != RD_END || !nv;
            if (nv) { /* "name=value" */
                snprintf(nv, name.n + value.n + 2, "%.*s=%.*s", (int)name.n,
                         name.n ? (const char *)name.d : "", (int)value.n, value.n ? (const char *)value.d : "");
                buf_add(&env, &nv, sizeof nv);
                if (env.oom)
                    free(nv);
            }
        }
    }
    char *none = NULL;
    if (env.len)
        buf_add(&env, &none, sizeof none);
    struct stat st;
    int po[2] = { -1, -1 }, pe[2] = { -1, -1 }, cwd_err = 0;
    pid_t pid = -1;
    if (cwd && *cwd && stat(cwd, &st) < 0)
        cwd_err = errno;
    else if (cwd && *cwd && !S_ISDIR(st.st_mode))
        cwd_err = ENOTDIR;
    double t0 = now(CLOCK_MONOTONIC);
    if (rc != RD_END || bad || env.oom)
        malformed(s, "malformed execute_request");
    else if (cwd_err)
        errno = cwd_err, reply_errno(s, cwd);
    else if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || (pid = fork()) < 0)
        reply_errno(s, "/bin/sh");
    if (pid == 0) { /* the child: sh -c, or ip netns exec NS sh -c */
        char *argv[] = { "ip", "netns", "exec", ns, "/bin/sh", "-c", cmd ? cmd : "", NULL };
        int null = open("/dev/null", O_RDONLY);
        signal(SIGPIPE, SIG_DFL);
        dup2(null, 0), dup2(po[1], 1), dup2(pe[1], 2);
        if (cwd && *cwd && chdir(cwd) < 0)
            _exit(127);
        if (prio == 1 || prio == 2) /* as ionice -c 3 (idle) or -c 1 (realtime) */
            syscall(SYS_ioprio_set, 1, 0, prio == 1 ? 3 << 13 : 1 << 13 | 4);
        if (env.len)
            environ = (char **)env.p;
        char **av = ns && *ns ? argv : argv + 4;
        execvp(av[0], av);
        fprintf(stderr, "sf-agent: %s: %s\n", av[0], strerror(errno));
        _exit(127);
    }
    buf_t out[2] = { { 0 } }, fix[2] = { { 0 } };
    if (pid > 0) {
        close(po[1]), close(pe[1]);
        po[1] = pe[1] = -1;
        int code = collect(pid, po[0], pe[0], out);
        po[0] = pe[0] = -1;
        if (out[0].oom || out[1].oom) {
            reply_error(s, "out of memory collecting the output");
        } else {
            enc_t e = { 0 };
            size_t n1 = out[0].len, n2 = out[1].len;
            const uint8_t *o1 = text(out[0].p, &n1, &fix[0]), *o2 = text(out[1].p, &n2, &fix[1]);
            e_double(&e, 6, now(CLOCK_MONOTONIC) - t0);
            e_bytes(&e, 5, eid.d, eid.n);
            e_bytes(&e, 4, rid.d, rid.n);
            e_int(&e, 3, code);
            e_bytes(&e, 2, o2, n2);
            e_ext(&e, 1, o1, n1); /* stdout is not copied */
            send_reply(s, 40, &e);
        }
    }
    for (int i = 0; i < 2; i++) {
        if (po[i] >= 0)
            close(po[i]);
        if (pe[i] >= 0)
            close(pe[i]);
        buf_free(&out[i]);
        buf_free(&fix[i]);
    }
    for (size_t i = 0; i < env.len / sizeof(char *); i++)
        free(((char **)env.p)[i]); /* the last is the NULL terminator */
    buf_free(&env);
    free(cmd), free(cwd), free(ns);
}

/* errno kept */
static int pwrite_all(int fd, const uint8_t *p, size_t n, off_t offset) {
    while (n) {
        ssize_t w = pwrite(fd, p, n, offset);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            errno = w ? errno : EIO;
            return -1;
        }
        p += w, n -= w, offset += w;
    }
    return 0;
}

static void put_close(sess_t *s) {
    if (s->put_fd >= 0)
        close(s->put_fd);
    s->put_fd = -1;
    free(s->put_path);
    s->put_path = NULL;
}

/* Write a FileChunk{offset=1, encoding=2, payload=3} to the open file and acknowledge it.
 * An empty payload ends the file, unless it is a put_file_request's first chunk. */
static void put_chunk(sess_t *s, const uint8_t *d, size_t n, int first) {
    rd_t r = { d, d + n };
    fld_t f, payload = { 0 };
    int64_t offset = 0;
    int rc;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 1 && f.wt == 0)
            offset = (int64_t)f.v;
        if (f.num == 3 && f.wt == 2)
            payload = f;
    }
    if (rc != RD_END || offset < 0) {
        malformed(s, "malformed file_chunk");
        return;
    }
    if (s->put_fd < 0) {
        reply_error(s, "no file is being written");
        return;
    }
    if (payload.n) {
        uint8_t *raw = malloc(payload.n / 4 * 3 + 3);
        long k = raw ? b64_decode(payload.d, payload.n, raw) : -1;
        int w = k >= 0 ? pwrite_all(s->put_fd, raw, k, offset) : 0;
        free(raw);
        if (k < 0 || w < 0) {
            if (w < 0)
                reply_errno(s, s->put_path);
            else
                reply_error(s, raw ? "invalid base64 payload" : "out of memory");
            return;
        }
    }
    enc_t e = { 0 };
    e_int(&e, 2, offset);
    e_text(&e, 1, s->put_path);
    if (!payload.n && !first)
        put_close(s);
    send_reply(s, 43, &e);
}

static void put_file(sess_t *s, const uint8_t *d, size_t n) {
    rd_t r = { d, d + n };
    fld_t f, chunk = { 0 };
    char *path = NULL;
    int rc, mode = 0, bad = 0;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 1 && f.wt == 2)
            free(path), bad |= !(path = dupstr(&f));
        if (f.num == 2 && f.wt == 0)
            mode = (int)f.v & 07777;
        if (f.num == 4 && f.wt == 2)
            chunk = f;
    }
    put_close(s);
    if (rc != RD_END || bad || !path || !*path) {
        free(path);
        malformed(s, "malformed put_file_request");
        return;
    }
    s->put_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode ? mode : 0644);
    if (s->put_fd < 0 || (mode && fchmod(s->put_fd, mode) < 0)) {
        reply_errno(s, path);
        free(path);
        put_close(s);
        return;
    }
    s->put_path = path;
    put_chunk(s, chunk.d, chunk.n, 1);
}

static char *path_of(sess_t *s, const uint8_t *d, size_t n, int *mode) {
    rd_t r = { d, d + n };
    fld_t f;
    char *path = NULL;
    int rc, bad = 0;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 1 && f.wt == 2)
            free(path), bad |= !(path = dupstr(&f));
        if (f.num == 2 && f.wt == 0 && mode)
            *mode = (int)f.v & 07777;
    }
    if (rc == RD_END && !bad && path && *path)
        return path;
    free(path);
    malformed(s, "malformed request");
    return NULL;
}

static void do_chmod(sess_t *s, const uint8_t *d, size_t n) {
    int mode = 0;
    char *path = path_of(s, d, n, &mode);
    if (path && chmod(path, mode) < 0) {
        reply_errno(s, path);
    } else if (path) {
        enc_t e = { 0 };
        e_text(&e, 1, path);
        send_reply(s, 44, &e);
    }
    free(path);
}

/* stat_result, then FileChunks of CHUNK bytes, then an empty one at offset=size. */
static void get_file(sess_t *s, const uint8_t *d, size_t n) {
    static uint8_t raw[CHUNK];
    static char b64[CHUNK / 3 * 4 + 4];
    char *path = path_of(s, d, n, NULL);
    struct stat st;
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (path && fd < 0 && errno == ENOENT)
        reply_error(s, "file not found");
    else if (path && (fd < 0 || fstat(fd, &st) < 0 || (S_ISDIR(st.st_mode) && (errno = EISDIR))))
        reply_errno(s, path);
    else if (path) {
        enc_t e = { 0 };
        e_double(&e, 8, st.st_ctim.tv_sec + st.st_ctim.tv_nsec / 1e9);
        e_double(&e, 7, st.st_mtim.tv_sec + st.st_mtim.tv_nsec / 1e9);
        e_double(&e, 6, st.st_atim.tv_sec + st.st_atim.tv_nsec / 1e9);
        e_int(&e, 5, st.st_gid);
        e_int(&e, 4, st.st_uid);
        e_int(&e, 3, st.st_size);
        e_int(&e, 2, st.st_mode);
        e_text(&e, 1, path);
        send_reply(s, 47, &e);
        int64_t offset = 0;
        size_t k = 1;
        while (k && !s->dead) {
            ssize_t got = 1;
            for (k = 0; k < CHUNK && got; k += got > 0 ? got : 0)
                if ((got = read(fd, raw + k, CHUNK - k)) < 0 && errno != EINTR)
                    break;
            if (got < 0) {
                reply_errno(s, path);
                break;
            }
            enc_t c = { 0 };
            e_bytes(&c, 3, b64, b64_encode(raw, k, b64));
            e_int(&c, 1, offset);
            send_reply(s, 46, &c); /* k == 0: the empty chunk at offset=size ends the file */
            offset += k;
        }
    }
    if (fd >= 0)
        close(fd);
    free(path);
}

/* ---- streamed executions ---- */

static void job_reply(sess_t *s, int field, enc_t *e) {
    s->cmd = NULL; /* no last_envelope: this answers no command now being handled */
    s->id = s->job.id, s->idlen = s->job.idlen;
    send_reply(s, field, e);
}

static void job_close(job_t *j, int i) {
    if (j->fd[i] >= 0)
        close(j->fd[i]);
    j->fd[i] = -1;
}

static void exec_stream(sess_t *s, const uint8_t *d, size_t n) {
    rd_t r = { d, d + n };
    fld_t f;
    int rc, bad = 0;
    char *cmd = NULL;
    double deadline = 0;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 1 && f.wt == 2)
            free(cmd), bad |= !(cmd = dupstr(&f));
        else if (f.num == 2 && f.wt == 1)
            memcpy(&deadline, &f.v, sizeof deadline);
    }
    job_t *j = &s->job;
    int p[3][2] = { { -1, -1 }, { -1, -1 }, { -1, -1 } };
    if (rc != RD_END || bad || !cmd) {
        malformed(s, "malformed exec_stream_request");
    } else if (j->pid) {
        reply_error(s, "a streamed command is already running in this session");
    } else if (s->idlen > sizeof j->id) {
        malformed(s, "command_id too long");
    } else if (pipe2(p[0], O_CLOEXEC) < 0 || pipe2(p[1], O_CLOEXEC) < 0 || pipe2(p[2], O_CLOEXEC) < 0
               || (j->pid = fork()) < 0) {
        j->pid = 0;
        reply_errno(s, "/bin/sh");
    } else if (j->pid == 0) { /* the child: a session of its own, so that its tree can be killed */
        setsid();
        signal(SIGPIPE, SIG_DFL);
        dup2(p[0][0], 0), dup2(p[1][1], 1), dup2(p[2][1], 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    } else {
        j->fd[0] = p[0][1], j->fd[1] = p[1][0], j->fd[2] = p[2][0];
        close(p[0][0]), close(p[1][1]), close(p[2][1]);
        for (int i = 0; i < 3; i++)
            fcntl(j->fd[i], F_SETFL, fcntl(j->fd[i], F_GETFL) | O_NONBLOCK);
        j->t0 = now(CLOCK_MONOTONIC);
        j->deadline = deadline > 0 ? j->t0 + deadline : 0;
        j->in_eof = j->timed_out = 0;
        j->in.len = 0;
        memcpy(j->id, s->id, s->idlen);
        j->idlen = s->idlen;
        free(cmd);
        return;
    }
    for (int i = 0; i < 3; i++)
        for (int k = 0; k < 2; k++)
            if (p[i][k] >= 0)
                close(p[i][k]);
    free(cmd);
}

static void exec_input(sess_t *s, const uint8_t *d, size_t n) {
    rd_t r = { d, d + n };
    fld_t f, data = { 0 };
    int rc, eof = 0, stop = 0;
    job_t *j = &s->job;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.num == 1 && f.wt == 2)
            data = f;
        else if (f.num == 2 && f.wt == 0)
            eof = f.v != 0;
        else if (f.num == 3 && f.wt == 0)
            stop = f.v != 0;
    }
    if (rc != RD_END)
        malformed(s, "malformed exec_input");
    else if (!j->pid || s->idlen != j->idlen || memcmp(s->id, j->id, j->idlen))
        reply_error(s, "no streamed command of this command_id is running");
    else if (stop)
        kill(-j->pid, SIGKILL); /* its end is still reported */
    else if (j->fd[0] >= 0) { /* stdin closed already (the command exited or closed it): dropped */
        if (data.n)
            buf_add(&j->in, data.d, data.n);
        j->in_eof |= eof;
    }
}

/* Move what the command's pipes have, feed its stdin, enforce its deadline, and report its
 * end once its output is closed and it has exited. Never blocks. */
static void job_step(sess_t *s) {
    job_t *j = &s->job;
    if (!j->pid)
        return;
    uint8_t q[16384];
    for (int i = 1; i < 3; i++) {
        while (j->fd[i] >= 0 && !s->dead) {
            ssize_t k = read(j->fd[i], q, sizeof q);
            if (k > 0) {
                enc_t e = { 0 };
                e_bytes(&e, 2, q, k);
                e_int(&e, 1, i);
                job_reply(s, 50, &e);
            } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
                job_close(j, i);
            } else {
                break;
            }
        }
    }
    while (j->fd[0] >= 0 && j->in.len) {
        ssize_t k = write(j->fd[0], j->in.p, j->in.len);
        if (k > 0) {
            memmove(j->in.p, j->in.p + k, j->in.len - k);
            j->in.len -= k;
        } else if (k < 0 && errno == EAGAIN) {
            break;
        } else if (k < 0 && errno != EINTR) { /* EPIPE: it does not read its stdin */
            j->in.len = 0;
            job_close(j, 0);
        }
    }
    if (j->fd[0] >= 0 && j->in_eof && !j->in.len)
        job_close(j, 0);
    if (j->deadline && !j->timed_out && now(CLOCK_MONOTONIC) >= j->deadline) {
        kill(-j->pid, SIGKILL); /* the whole process group, not only the shell */
        j->timed_out = 1;
    }
    int status;
    if (j->fd[1] >= 0 || j->fd[2] >= 0 || waitpid(j->pid, &status, WNOHANG) != j->pid)
        return;
    if (j->timed_out)
        kill(-j->pid, SIGKILL); /* what it left running */
    enc_t e = { 0 };
    e_double(&e, 3, now(CLOCK_MONOTONIC) - j->t0);
    e_int(&e, 2, j->timed_out);
    e_int(&e, 1, WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
    job_close(j, 0);
    buf_free(&j->in);
    j->pid = 0;
    job_reply(s, 51, &e);
}

/* The job's pipes to poll (after the host's input at pf[0]); and how long poll may wait. */
static int job_poll(sess_t *s, struct pollfd *pf, int *timeout) {
    job_t *j = &s->job;
    int np = 0;
    *timeout = -1;
    if (!j->pid)
        return 0;
    for (int i = 1; i < 3; i++)
        if (j->fd[i] >= 0)
            pf[np++] = (struct pollfd){ j->fd[i], POLLIN, 0 };
    if (j->fd[0] >= 0 && j->in.len)
        pf[np++] = (struct pollfd){ j->fd[0], POLLOUT, 0 };
    if (j->fd[1] < 0 && j->fd[2] < 0)
        *timeout = 50; /* its output is closed: wait for it to exit */
    if (j->deadline && !j->timed_out) {
        int ms = (int)((j->deadline - now(CLOCK_MONOTONIC)) * 1000) + 1;
        if (*timeout < 0 || ms < *timeout)
            *timeout = ms < 0 ? 0 : ms;
    }
    return np;
}

/* The host went away: nobody will read the command's output. */
static void job_kill(sess_t *s) {
    job_t *j = &s->job;
    if (!j->pid)
        return;
    kill(-j->pid, SIGKILL);
    for (int i = 0; i < 3; i++)
        job_close(j, i);
    while (waitpid(j->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    buf_free(&j->in);
    j->pid = 0;
}

/* Handle one HypervisorToAgentCommand. Returns 1 for hypervisor_departure. */
static int handle(sess_t *s, const uint8_t *d, size_t n) {
    static const uint8_t requests[] = { 10, 11, 20, 21, 30, 40, 41, 42, 43, 44, 45, 46, 47, 48, 50, 51 };
    rd_t r = { d, d + n };
    fld_t f, body = { 0 };
    int rc;
    s->cmd = d, s->cmdlen = n, s->id = NULL, s->idlen = 0;
    while ((rc = rd_next(&r, &f)) == RD_OK) {
        if (f.wt == 2 && f.num == 1)
            s->id = f.d, s->idlen = f.n;
        else if (f.wt == 2 && f.num < 256 && memchr(requests, f.num, sizeof requests))
            body = f;
    }
    if (rc != RD_END || !valid(d, n, 1, 0)) {
        malformed(s, "malformed command");
        return 0;
    }
    enc_t e = { 0 };
    switch (body.num) {
    case 10: /* hypervisor_welcome: a new session */
        put_close(s);
        e_double(&e, 2, boot_time());
        e_str(&e, 1, VERSION);
        send_reply(s, 10, &e);
        break;
    case 11: /* hypervisor_departure */
        return 1;
    case 20: case 21: case 48: /* the host's errors, and its acks of our file chunks */
        break;
    case 30:
        send_reply(s, 30, &e);
        break;
    case 40:
        execute(s, body.d, body.n);
        break;
    case 41:
        e_double(&e, 3, boot_time());
        e_str(&e, 2, "running");
        e_int(&e, 1, 1);
        send_reply(s, 41, &e);
        break;
    case 42:
        gather_facts(s);
        break;
    case 43:
        put_file(s, body.d, body.n);
        break;
    case 44:
        put_chunk(s, body.d, body.n, 0);
        break;
    case 45:
        do_chmod(s, body.d, body.n);
        break;
    case 47:
        get_file(s, body.d, body.n);
        break;
    case 50:
        exec_stream(s, body.d, body.n);
        break;
    case 51:
        exec_input(s, body.d, body.n);
        break;
    default: /* no request, or chown_request (agent 1.0.1 has no handler either) */
        reply_unknown(s);
    }
    return 0;
}

/* Serve one host connection until it ends: 0 at EOF, -1 on an error. */
static int serve(int in, int out) {
    sess_t s = { .in = in, .out = out, .put_fd = -1, .job = { .fd = { -1, -1, -1 } } };
    buf_t b = { 0 };
    int ret = 0;
    fcntl(in, F_SETFL, fcntl(in, F_GETFL) | O_NONBLOCK);
    fcntl(out, F_SETFL, fcntl(out, F_GETFL) | O_NONBLOCK);
    while (!s.dead) {
        if (s.pending.len) { /* read while writing replies */
            buf_add(&b, s.pending.p, s.pending.len);
            s.pending.len = 0;
        } else if (s.in_eof) {
            break;
        } else {
            struct pollfd pfs[4] = { { in, POLLIN, 0 } };
            int timeout, np = 1 + job_poll(&s, pfs + 1, &timeout);
            if (poll(pfs, np, timeout) < 0 && errno != EINTR) {
                ret = -1;
                break;
            }
            job_step(&s);
            struct pollfd pf = pfs[0];
            if (!pf.revents)
                continue;
            ssize_t n = read_in(&s, &b);
            if (n == 0)
                break; /* EOF; on a virtio-serial port, the host is not connected */
            if (n < 0 && (errno == EINTR || errno == EAGAIN) && !(pf.revents & (POLLHUP | POLLERR)))
                continue;
            if (n < 0 && errno != ENOMEM) {
                ret = -1;
                break;
            }
        }
        rd_t r = { b.p, b.p + b.len };
        fld_t f;
        int rc;
        while ((rc = rd_next(&r, &f)) == RD_OK)
            ;
        if (rc == RD_SHORT && b.len <= MAX_BUFFER && !b.oom)
            continue; /* a partial envelope: read more */
        if (rc != RD_END) { /* can never parse: drop it all */
            char msg[80];
            snprintf(msg, sizeof msg, "unparseable input, %zu bytes dropped", b.len);
            s.cmd = s.id = NULL, s.cmdlen = s.idlen = 0;
            reply_error(&s, msg);
        } else {
            r.p = b.p;
            while (!s.dead && rd_next(&r, &f) == RD_OK)
                if (f.num == 1 && f.wt == 2 && handle(&s, f.d, f.n))
                    break; /* departure: ignore the rest of the buffer */
        }
        b.len = 0;
        b.oom = 0;
        if (b.cap > 4 * READ_SIZE) /* give back what a big transfer took */
            buf_free(&b);
        if (s.pending.oom)
            buf_free(&s.pending);
    }
    put_close(&s);
    job_kill(&s);
    buf_free(&b);
    buf_free(&s.pending);
    return s.dead ? -1 : ret;
}

/* ---- protocol v1 (shakenfist-agent 0.7.0 and older), on the port "sf-agent" ----
 *
 * Packets are "*SFv001[%08d]" and that many bytes of JSON (shared/reference/
 * shakenfist-rest-api.md E.4, with 0.7.0's framing); each request's "unique" comes back in
 * its answers. The answers are 0.7.0's: agent-start when the port opens, pong,
 * is-system-running-response, gather-facts-response, execute-response (result true only
 * for exit code 0), put-file (a stat_result packet, base64 chunks, a null chunk) ->
 * put-file-response, chmod-response, get-file-response (a stat_result packet, base64
 * chunks, a null chunk); command-error for what fails, unknown-command otherwise. The JSON
 * is a flat object of strings, numbers, booleans and nulls; nested values are skipped. */

#define V1_PREAMBLE "*SFv001"
#define V1_HEADER 17 /* the preamble, "[", 8 digits, "]" */
#define V1_MAX 99999999
#define V1_CHUNK 65536

typedef struct { char *key; char type; char *str; size_t slen; double num; } jv_t; /* type: s n b z(null) o(skipped) */
typedef struct { jv_t v[24]; int n; } jobj_t;

static void j_free(jobj_t *o) {
    for (int i = 0; i < o->n; i++)
        free(o->v[i].key), free(o->v[i].str);
    o->n = 0;
}

static const char *j_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static void utf8_put(buf_t *b, uint32_t cp) {
    uint8_t u[4];
    int k = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    if (k == 1)
        u[0] = cp;
    else {
        for (int i = k - 1; i > 0; i--, cp >>= 6)
            u[i] = 0x80 | (cp & 0x3f);
        u[0] = (k == 2 ? 0xc0 : k == 3 ? 0xe0 : 0xf0) | cp;
    }
    buf_add(b, u, k);
}

static int hex4(const char *p, const char *end, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) {
        if (p + i >= end || !isxdigit((unsigned char)p[i]))
            return 0;
        *v = *v << 4 | (uint32_t)(isdigit((unsigned char)p[i]) ? p[i] - '0' : (tolower((unsigned char)p[i]) - 'a' + 10));
    }
    return 1;
}

/* a string at p (after its quote): decoded into out (NUL-terminated); the end, or NULL */
static const char *j_string(const char *p, const char *end, buf_t *out) {
    while (p < end && *p != '"') {
        if ((unsigned char)*p < 0x20)
            return NULL;
        if (*p != '\\') {
            buf_add(out, p++, 1);
            continue;
        }
        if (++p >= end)
            return NULL;
        char c = *p++, plain = 0;
        switch (c) {
        case '"': case '\\': case '/': plain = c; break;
        case 'b': plain = '\b'; break;
        case 'f': plain = '\f'; break;
        case 'n': plain = '\n'; break;
        case 'r': plain = '\r'; break;
        case 't': plain = '\t'; break;
        }
        if (plain) {
            buf_add(out, &plain, 1);
        } else if (c == 'u') {
            uint32_t cp, lo;
            if (!hex4(p, end, &cp))
                return NULL;
            p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && p + 6 <= end && p[0] == '\\' && p[1] == 'u' &&
                hex4(p + 2, end, &lo) && lo >= 0xdc00 && lo < 0xe000) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                p += 6;
            } else if (cp >= 0xd800 && cp < 0xe000) {
                cp = 0xfffd;
            }
            utf8_put(out, cp);
        } else {
            return NULL;
        }
    }
    if (p >= end)
        return NULL;
    buf_add(out, "", 1);
    return out->oom ? NULL : p + 1;
}

/* skip any value at p; the end, or NULL */
static const char *j_skip(const char *p, const char *end, int depth) {
    p = j_ws(p, end);
    if (p >= end || depth > 32)
        return NULL;
    if (*p == '"') {
        buf_t t = { 0 };
        p = j_string(p + 1, end, &t);
        buf_free(&t);
        return p;
    }
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = j_ws(p + 1, end);
        if (p < end && *p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                p = j_ws(p, end);
                if (p >= end || *p != '"' || !(p = j_skip(p, end, depth + 1)))
                    return NULL;
                p = j_ws(p, end);
                if (p >= end || *p++ != ':')
                    return NULL;
            }
            if (!(p = j_skip(p, end, depth + 1)))
                return NULL;
            p = j_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            return p < end && *p == close ? p + 1 : NULL;
        }
    }
    while (p < end && (isalnum((unsigned char)*p) || strchr("+-.", *p)))
        p++;
    return p;
}

/* one JSON object: 0, or -1 if it is not one */
static int j_parse(const char *p, size_t n, jobj_t *o) {
    const char *end = p + n;
    o->n = 0;
    p = j_ws(p, end);
    if (p >= end || *p++ != '{')
        return -1;
    p = j_ws(p, end);
    if (p < end && *p == '}')
        return j_ws(p + 1, end) == end ? 0 : -1;
    for (;;) {
        buf_t key = { 0 };
        jv_t v = { 0 };
        p = j_ws(p, end);
        if (p >= end || *p != '"' || !(p = j_string(p + 1, end, &key)))
            return buf_free(&key), j_free(o), -1;
        p = j_ws(p, end);
        if (p >= end || *p++ != ':')
            return buf_free(&key), j_free(o), -1;
        p = j_ws(p, end);
        const char *start = p;
        if (p < end && *p == '"') {
            buf_t val = { 0 };
            if (!(p = j_string(p + 1, end, &val)))
                return buf_free(&key), buf_free(&val), j_free(o), -1;
            v.type = 's', v.str = (char *)val.p, v.slen = val.len - 1;
        } else {
            if (!(p = j_skip(p, end, 0)))
                return buf_free(&key), j_free(o), -1;
            char *num_end;
            if (*start == '{' || *start == '[')
                v.type = 'o';
            else if (p - start == 4 && !strncmp(start, "true", 4))
                v.type = 'b', v.num = 1;
            else if (p - start == 5 && !strncmp(start, "false", 5))
                v.type = 'b';
            else if (p - start == 4 && !strncmp(start, "null", 4))
                v.type = 'z';
            else if ((v.num = strtod(start, &num_end)), num_end == p && p > start)
                v.type = 'n';
            else
                return buf_free(&key), j_free(o), -1;
        }
        if (o->n < (int)(sizeof o->v / sizeof o->v[0])) { /* more fields than any request has: dropped */
            v.key = (char *)key.p;
            o->v[o->n++] = v;
        } else {
            free(v.str), buf_free(&key);
        }
        p = j_ws(p, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        if (p < end && *p == '}' && j_ws(p + 1, end) == end)
            return 0;
        j_free(o);
        return -1;
    }
}

static const jv_t *j_get(const jobj_t *o, const char *key, char type) {
    for (int i = 0; i < o->n; i++)
        if (!strcmp(o->v[i].key, key) && (!type || o->v[i].type == type))
            return &o->v[i];
    return NULL;
}

/* ---- JSON out: one object into a buffer, field by field ---- */

static void jw_key(buf_t *b, const char *key) {
    buf_add(b, b->len > 1 ? ", \"" : "\"", b->len > 1 ? 3 : 1);
    buf_add(b, key, strlen(key));
    buf_add(b, "\": ", 3);
}

static void jw_text(buf_t *b, const uint8_t *d, size_t n) {
    buf_t fix = { 0 };
    const uint8_t *t = text(d, &n, &fix);
    char esc[8];
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (t[i] == '"' || t[i] == '\\')
            buf_add(b, "\\", 1), buf_add(b, &t[i], 1);
        else if (t[i] < 0x20)
            snprintf(esc, sizeof esc, "\\u%04x", t[i]), buf_add(b, esc, 6);
        else
            buf_add(b, &t[i], 1);
    }
    buf_add(b, "\"", 1);
    buf_free(&fix);
}

static void jw_str(buf_t *b, const char *key, const char *v) {
    jw_key(b, key);
    jw_text(b, (const uint8_t *)v, strlen(v));
}

static void jw_num(buf_t *b, const char *key, double v) {
    char n[64];
    jw_key(b, key);
    if (v == (double)(long long)v)
        snprintf(n, sizeof n, "%lld", (long long)v);
    else
        snprintf(n, sizeof n, "%.6f", v);
    buf_add(b, n, strlen(n));
}

static void jw_raw(buf_t *b, const char *key, const char *json) {
    jw_key(b, key);
    buf_add(b, json, strlen(json));
}

typedef struct {
    int fd;
    buf_t in;
    jobj_t req;          /* the packet being handled */
    int put_fd;          /* a put-file under way, or -1 */
    char *put_path;
} v1_t;

static const char *v1_unique(v1_t *v) {
    const jv_t *u = j_get(&v->req, "unique", 's');
    return u ? u->str : NULL;
}

/* Finish the object in b and send it as one packet (written in 2048-byte pieces, as 0.7.0). */
static void v1_send(v1_t *v, buf_t *b) {
    char head[V1_HEADER + 1];
    const jv_t *number = j_get(&v->req, "unique", 'n'); /* answers carry the request's unique */
    if (v1_unique(v))
        jw_str(b, "unique", v1_unique(v));
    else if (number)
        jw_num(b, "unique", number->num);
    buf_add(b, "}", 1);
    if (b->oom || b->len > V1_MAX) {
        buf_free(b);
        return;
    }
    snprintf(head, sizeof head, V1_PREAMBLE "[%08zu]", b->len);
    struct iovec iov[2] = { { head, V1_HEADER }, { b->p, b->len } };
    for (int i = 0; i < 2; i++)
        for (size_t off = 0; off < iov[i].iov_len;) {
            size_t k = iov[i].iov_len - off < 2048 ? iov[i].iov_len - off : 2048;
            struct pollfd pf = { v->fd, POLLOUT, 0 };
            ssize_t w = poll(&pf, 1, 5000) > 0 ? write(v->fd, (char *)iov[i].iov_base + off, k) : -1;
            if (w < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (w <= 0) { /* nobody is reading: the answer is lost, as on a real port */
                buf_free(b);
                return;
            }
            off += w;
        }
    buf_free(b);
}

static buf_t v1_begin(const char *command) {
    buf_t b = { 0 };
    buf_add(&b, "{", 1);
    jw_str(&b, "command", command);
    return b;
}

static void v1_error(v1_t *v, const char *command, const char *message) {
    buf_t b = v1_begin(command);
    jw_str(&b, "message", message);
    v1_send(v, &b);
}

static void v1_errno(v1_t *v, const char *path) {
    char m[600];
    snprintf(m, sizeof m, "%s: %s", path ? path : "", strerror(errno));
    v1_error(v, "command-error", m);
}

static void v1_facts(v1_t *v) {
    buf_t b = v1_begin("gather-facts-response"), mounts = { 0 };
    char *t = slurp("/proc/mounts"), **lines;
    size_t n = 0;
    buf_add(&mounts, "[", 1);
    lines = t ? split_lines(t, &n) : NULL;
    for (size_t i = 0; i < n; i++) {
        char dev[1024], dir[1024], type[256];
        if (sscanf(lines[i], "%1023s %1023s %255s", dev, dir, type) != 3)
            continue;
        buf_t m = { 0 };
        buf_add(&m, "{", 1);
        jw_str(&m, "device", dev), jw_str(&m, "mount_point", dir), jw_str(&m, "vfs_type", type);
        buf_add(&m, "}", 1);
        if (mounts.len > 1)
            buf_add(&mounts, ", ", 2);
        buf_add(&mounts, m.p, m.len);
        buf_free(&m);
    }
    buf_add(&mounts, "]", 2); /* with the NUL */
    free(lines), free(t);
    jw_key(&b, "result");
    static const char head[] = "{\"distribution\": {\"id\": \"sftest\", \"name\": \"sftest\"}, "
                               "\"ssh-host-keys\": {}, \"mounts\": ";
    buf_add(&b, head, strlen(head));
    if (!mounts.oom)
        buf_add(&b, mounts.p, mounts.len - 1);
    buf_add(&b, "}", 1);
    buf_free(&mounts);
    v1_send(v, &b);
}

static void v1_execute(v1_t *v) {
    const jv_t *cmd = j_get(&v->req, "command-line", 's');
    int po[2] = { -1, -1 }, pe[2] = { -1, -1 };
    pid_t pid = -1;
    if (!cmd) {
        buf_t b = v1_begin("execute-response");
        jw_raw(&b, "result", "false"), jw_str(&b, "message", "command-line is not set");
        v1_send(v, &b);
        return;
    }
    if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || (pid = fork()) < 0) {
        v1_errno(v, "/bin/sh");
        for (int i = 0; i < 2; i++)
            if (po[i] >= 0)
                close(po[i]);
        return;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        signal(SIGPIPE, SIG_DFL);
        dup2(null, 0), dup2(po[1], 1), dup2(pe[1], 2);
        execl("/bin/sh", "sh", "-c", cmd->str, (char *)NULL);
        _exit(127);
    }
    close(po[1]), close(pe[1]);
    buf_t out[2] = { { 0 } };
    int code = collect(pid, po[0], pe[0], out);
    buf_t b = v1_begin("execute-response");
    jw_str(&b, "command-line", cmd->str);
    jw_raw(&b, "result", code == 0 ? "true" : "false");
    jw_key(&b, "stdout"), jw_text(&b, out[0].p ? out[0].p : (const uint8_t *)"", out[0].len);
    jw_key(&b, "stderr"), jw_text(&b, out[1].p ? out[1].p : (const uint8_t *)"", out[1].len);
    jw_num(&b, "return-code", code);
    if (out[0].oom || out[1].oom)
        buf_free(&b), v1_error(v, "command-error", "out of memory collecting the output");
    else
        v1_send(v, &b);
    buf_free(&out[0]), buf_free(&out[1]);
}

static void v1_put_close(v1_t *v) {
    if (v->put_fd >= 0)
        close(v->put_fd);
    v->put_fd = -1;
    free(v->put_path);
    v->put_path = NULL;
}

static void v1_put(v1_t *v) {
    const jv_t *path = j_get(&v->req, "path", 's'), *chunk = j_get(&v->req, "chunk", 0);
    if (!path)
        return v1_error(v, "command-error", "put-file: path is not set");
    if (!v->put_path || strcmp(v->put_path, path->str)) { /* a new file: the stat_result packet */
        v1_put_close(v);
        v->put_fd = open(path->str, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (v->put_fd < 0)
            return v1_errno(v, path->str);
        v->put_path = strdup(path->str);
    }
    if (!chunk)
        return; /* the stat_result packet */
    if (chunk->type == 'z') {
        int failed = close(v->put_fd) < 0;
        v->put_fd = -1;
        if (failed)
            return v1_put_close(v), v1_errno(v, path->str);
        v1_put_close(v);
        buf_t b = v1_begin("put-file-response");
        jw_str(&b, "path", path->str);
        return v1_send(v, &b);
    }
    uint8_t *data = chunk->type == 's' ? malloc(chunk->slen / 4 * 3 + 3) : NULL;
    long k = data ? b64_decode((const uint8_t *)chunk->str, chunk->slen, data) : -1;
    if (k < 0 || pwrite_all(v->put_fd, data, k, lseek(v->put_fd, 0, SEEK_END)) < 0) {
        free(data);
        v1_put_close(v);
        return k < 0 ? v1_error(v, "command-error", "put-file: a chunk is not base64") : v1_errno(v, path->str);
    }
    free(data);
}

static void v1_chmod(v1_t *v) {
    const jv_t *path = j_get(&v->req, "path", 's'), *mode = j_get(&v->req, "mode", 'n');
    if (!path || !mode)
        return v1_error(v, "command-error", "chmod: path and mode are needed");
    if (chmod(path->str, (mode_t)mode->num & 07777) < 0)
        return v1_errno(v, path->str);
    buf_t b = v1_begin("chmod-response");
    jw_str(&b, "path", path->str);
    v1_send(v, &b);
}

static void v1_get(v1_t *v) {
    const jv_t *path = j_get(&v->req, "path", 's');
    struct stat st;
    int fd = path ? open(path->str, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        buf_t b = v1_begin("get-file-response");
        jw_raw(&b, "result", "false");
        jw_str(&b, "message", !path ? "path is not set" : fd < 0 ? "path does not exist" : "path is not a file");
        if (fd >= 0)
            close(fd);
        return v1_send(v, &b);
    }
    char stat_json[512];
    snprintf(stat_json, sizeof stat_json, "{\"mode\": %u, \"size\": %lld, \"uid\": %u, \"gid\": %u, "
             "\"atime\": %lld, \"mtime\": %lld, \"ctime\": %lld}", (unsigned)st.st_mode, (long long)st.st_size,
             (unsigned)st.st_uid, (unsigned)st.st_gid, (long long)st.st_atime, (long long)st.st_mtime,
             (long long)st.st_ctime);
    buf_t b = v1_begin("get-file-response");
    jw_raw(&b, "result", "true"), jw_str(&b, "path", path->str), jw_raw(&b, "stat_result", stat_json);
    v1_send(v, &b);
    uint8_t *data = malloc(V1_CHUNK);
    char *enc = malloc(V1_CHUNK / 3 * 4 + 8);
    ssize_t k;
    off_t offset = 0;
    while (data && enc && (k = read(fd, data, V1_CHUNK)) > 0) {
        enc[b64_encode(data, k, enc)] = 0;
        b = v1_begin("get-file-response");
        jw_raw(&b, "result", "true"), jw_str(&b, "path", path->str), jw_num(&b, "offset", offset);
        jw_str(&b, "encoding", "base64"), jw_str(&b, "chunk", enc);
        v1_send(v, &b);
        offset += k;
    }
    b = v1_begin("get-file-response");
    jw_raw(&b, "result", "true"), jw_str(&b, "path", path->str), jw_num(&b, "offset", offset);
    jw_str(&b, "encoding", "base64"), jw_raw(&b, "chunk", "null");
    v1_send(v, &b);
    free(data), free(enc);
    close(fd);
}

static void v1_handle(v1_t *v, const char *body, size_t n) {
    if (j_parse(body, n, &v->req) < 0 || !j_get(&v->req, "command", 's')) {
        j_free(&v->req);
        return v1_error(v, "json-decode-failure", "the packet is not a JSON object with a command");
    }
    const char *c = j_get(&v->req, "command", 's')->str;
    if (verbose)
        logmsg("sf-agent: v1 %s", c);
    if (!strcmp(c, "ping")) {
        buf_t b = v1_begin("pong");
        v1_send(v, &b);
    } else if (!strcmp(c, "is-system-running")) {
        buf_t b = v1_begin("is-system-running-response");
        jw_raw(&b, "result", "true"), jw_str(&b, "message", "running"), jw_num(&b, "system_boot_time", boot_time());
        v1_send(v, &b);
    } else if (!strcmp(c, "gather-facts")) {
        v1_facts(v);
    } else if (!strcmp(c, "execute")) {
        v1_execute(v);
    } else if (!strcmp(c, "put-file")) {
        v1_put(v);
    } else if (!strcmp(c, "chmod")) {
        v1_chmod(v);
    } else if (!strcmp(c, "get-file")) {
        v1_get(v);
    } else if (strcmp(c, "pong") && strcmp(c, "agent-start") && strcmp(c, "agent-stop")) {
        char m[300];
        snprintf(m, sizeof m, "unknown command %.200s", c);
        v1_error(v, "unknown-command", m);
    }
    j_free(&v->req);
}

/* Serve fd until EOF (0) or an error (-1). */
static int v1_serve(int fd) {
    v1_t v = { .fd = fd, .put_fd = -1 };
    buf_t b = v1_begin("agent-start");
    char unique[64];
    snprintf(unique, sizeof unique, "%.6f", now(CLOCK_REALTIME));
    jw_str(&b, "message", "version " VERSION), jw_num(&b, "system_boot_time", boot_time());
    jw_str(&b, "unique", unique);
    v1_send(&v, &b);
    for (;;) {
        struct pollfd pf = { fd, POLLIN, 0 };
        if (poll(&pf, 1, -1) < 0 && errno != EINTR)
            break;
        uint8_t *q = buf_space(&v.in, 65536);
        ssize_t k = q ? read(fd, q, 65536) : -1;
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k <= 0) {
            v1_put_close(&v), buf_free(&v.in);
            return k == 0 ? 0 : -1;
        }
        v.in.len += k;
        for (;;) { /* every whole packet in the buffer; bytes before a preamble are dropped */
            uint8_t *start = memmem(v.in.p, v.in.len, V1_PREAMBLE, 7);
            size_t skip = start ? (size_t)(start - v.in.p) : (v.in.len > 6 ? v.in.len - 6 : 0);
            memmove(v.in.p, v.in.p + skip, v.in.len - skip);
            v.in.len -= skip;
            if (!start || v.in.len < V1_HEADER)
                break;
            char digits[9] = { 0 };
            memcpy(digits, v.in.p + 8, 8);
            size_t len = strspn(digits, "0123456789") == 8 ? strtoul(digits, NULL, 10) : V1_MAX + 1;
            if (v.in.p[7] != '[' || v.in.p[16] != ']' || len > V1_MAX) {
                memmove(v.in.p, v.in.p + 1, --v.in.len); /* not a header: look further */
                continue;
            }
            if (v.in.len < V1_HEADER + len)
                break;
            v1_handle(&v, (const char *)v.in.p + V1_HEADER, len);
            memmove(v.in.p, v.in.p + V1_HEADER + len, v.in.len - V1_HEADER - len);
            v.in.len -= V1_HEADER + len;
        }
    }
    v1_put_close(&v), buf_free(&v.in);
    return -1;
}

/* ---- transports ---- */

static int serve_v2(int fd) { return serve(fd, fd); }

/* /dev/vportNpM named name */
static const char *find_port(const char *name, char *out, size_t size) {
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *de;
    const char *found = NULL;
    while (dir && !found && (de = readdir(dir))) {
        char path[512], found_name[64] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fgets(found_name, sizeof found_name, f))
            found_name[strcspn(found_name, "\n")] = 0;
        fclose(f);
        if (!strcmp(found_name, name)) {
            snprintf(out, size, "/dev/%s", de->d_name);
            found = out;
        }
    }
    if (dir)
        closedir(dir);
    return found;
}

/* Serve the port (device, or the virtio-serial port named name) with fn, forever. */
static void port_server(const char *device, const char *name, int (*fn)(int)) {
    char path[300];
    int fd = -1, opened = 0;
    for (;;) {
        if (fd < 0) {
            const char *p = device ? device : find_port(name, path, sizeof path);
            if (!p || (fd = open(p, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)) < 0) {
                msleep(500);
                continue;
            }
            struct termios t;
            if (tcgetattr(fd, &t) == 0) { /* a serial line: make it 8-bit clean */
                cfmakeraw(&t);
                tcsetattr(fd, TCSANOW, &t);
            }
            if (!opened++)
                logmsg("SFTEST agent: %s on %s (%s)", VERSION, p, fn == v1_serve ? "protocol v1" : "protocol v2");
        }
        /* Returns at EOF: a virtio-serial port reads EOF while the host is not connected,
         * so poll it; reopen only after an error (a pty whose other end closed). */
        if (fn(fd) < 0) {
            close(fd);
            fd = -1;
        }
        msleep(200);
    }
}

/* in its own process; each connection in a child */
static void vsock_server(void) {
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_port = VSOCK_PORT, .svm_cid = VMADDR_CID_ANY };
    int l = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 8) < 0) {
        if (verbose)
            logmsg("sf-agent: no vsock listener: %s", strerror(errno));
        _exit(0);
    }
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EINTR)
                msleep(100);
            continue;
        }
        if (fork() == 0) {
            signal(SIGCHLD, SIG_DFL); /* execute waits for its own children */
            close(l);
            _exit(serve(c, c) < 0);
        }
        close(c);
    }
}

static int unix_server(const char *path, int (*fn)(int)) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (strlen(path) >= sizeof a.sun_path) {
        logmsg("sf-agent: socket path too long: %s", path);
        return 1;
    }
    strcpy(a.sun_path, path);
    unlink(path);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 8) < 0) {
        logmsg("sf-agent: %s: %s", path, strerror(errno));
        return 1;
    }
    for (;;) { /* one connection at a time */
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) {
            fn(c);
            close(c);
        } else if (errno != EINTR) {
            msleep(100);
        }
    }
}

/* A child running a port server, killed with us. */
static pid_t port_child(const char *device, const char *name, int (*fn)(int)) {
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        port_server(device, name, fn);
    }
    return pid;
}

int main(int argc, char **argv) {
    const char *device = NULL, *unix_path = NULL;
    int use_stdio = 0, vsock = 1, v1 = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc)
            device = argv[++i];
        else if (!strcmp(argv[i], "--unix") && i + 1 < argc)
            unix_path = argv[++i];
        else if (!strcmp(argv[i], "--stdio"))
            use_stdio = 1;
        else if (!strcmp(argv[i], "--v1"))
            v1 = 1;
        else if (!strcmp(argv[i], "--no-vsock"))
            vsock = 0;
        else if (!strcmp(argv[i], "--verbose"))
            verbose = 1;
        else {
            fprintf(stderr, "usage: %s [--device PATH | --unix PATH | --stdio] [--v1] [--no-vsock] [--verbose]\n"
                    "The Shaken Fist agent of the sftest guest. By default protocol v2 on the\n"
                    "virtio-serial port %s (and vsock port %d if /dev/vsock exists) and protocol v1\n"
                    "on the port %s; with a --device, --unix or --stdio, v2 there (v1 with --v1).\n",
                    argv[0], PORT_NAME, VSOCK_PORT, V1_PORT_NAME);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN); /* a write to a closed connection fails with EPIPE instead */
    int (*fn)(int) = v1 ? v1_serve : serve_v2;
    if (use_stdio)
        return v1 ? v1_serve(0) < 0 : serve(0, 1) < 0;
    if (unix_path)
        return unix_server(unix_path, fn);
    if (vsock && !v1 && access("/dev/vsock", F_OK) == 0 && fork() == 0)
        vsock_server();
    /* the port servers run in children, restarted should one ever die */
    pid_t v2_pid = device && v1 ? 0 : port_child(device, PORT_NAME, serve_v2);
    pid_t v1_pid = device && !v1 ? 0 : port_child(device, V1_PORT_NAME, v1_serve);
    for (;;) {
        int status = 0;
        pid_t w = waitpid(-1, &status, 0); /* also reaps the vsock server */
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            break;
        if (w != v2_pid && w != v1_pid)
            continue;
        logmsg("SFTEST agent: restarting the agent's %s server (wait status %d)",
               w == v2_pid ? "v2" : "v1", status);
        msleep(1000);
        if (w == v2_pid)
            v2_pid = port_child(device, PORT_NAME, serve_v2);
        else
            v1_pid = port_child(device, V1_PORT_NAME, v1_serve);
    }
    return 1;
}
