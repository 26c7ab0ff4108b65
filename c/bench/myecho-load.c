/*
 * myecho-load -- the TCP load generator of myecho-bench: one thread, epoll,
 * non-blocking sockets, so that the client costs far less than any server
 * it measures.  Every echo is checked byte for byte.
 *
 * Usage: myecho-load MODE [options] HOST PORT
 *
 *   single  --trials N       N sequential connections, each: connect(),
 *           --gap S          exchange 1, exchange 2, close, then a pause of
 *                            S seconds (default 0).  Prints the three
 *                            durations of every trial (ns).
 *   burst   --conns N        open N connections at once, then send one
 *                            message on each: the time until all are
 *                            connected, then until all echoes are back.
 *                            Then waits for a line (or EOF) on stdin before
 *                            closing, so the caller can sample the server.
 *   rr      --conns N        closed-loop round trips on N connections for
 *           --duration S     S seconds after --warmup S: count, latency
 *                            percentiles (ns), this process's CPU time
 *                            in that window.  A line {"event":"start"}
 *                            marks the window's start.
 *   hold                     commands on stdin, one JSON line answered per
 *                            command: "open N", "echo", "quit".  The ramp
 *                            of myecho-bench drives several of these.
 *
 * Options: --size B (message bytes, default 64), --timeout S (per phase,
 * default 10), --src A,B,... (source addresses, used in turn), --protocol
 * zmtp (speak ZeroMQ's wire protocol, ZMTP 3.0, as a REQ socket: a
 * connection counts once the server's greeting and READY are in, and every
 * message goes out, and must come back, as an empty delimiter frame and a
 * body frame; what pyzmq would cost in the client is not measured).
 * Output: one JSON object per line on stdout.  Errors are counted by kind:
 * refused, reset, timeout, eof, mismatch, fd_limit, no_address, other.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROG "myecho-load"
#define MAX_SIZE 65536
#define MAX_WIRE (MAX_SIZE + 16)        /* a message and its ZMTP frame headers */
#define MAX_SRC 64

enum err { E_REFUSED, E_RESET, E_TIMEOUT, E_EOF, E_MISMATCH, E_FDLIMIT,
           E_NOADDR, E_OTHER, E_COUNT };
static const char *err_names[E_COUNT] = {
    "refused", "reset", "timeout", "eof", "mismatch", "fd_limit",
    "no_address", "other" };

enum state { S_CONNECTING, S_HANDSHAKE, S_IDLE, S_WAITING, S_DEAD };

struct conn {
    int fd;
    uint32_t id, round;
    enum state state;
    size_t got;
    uint64_t t0;                /* start of the current connect or exchange */
    uint64_t hs, hs_total, hs_size;     /* ZMTP: the peer's handshake so far */
    int hs_long;
};

static struct sockaddr_in dst;
static struct in_addr srcs[MAX_SRC];
static int nsrc, next_src;
static size_t msg_size = 64;
static int zmtp;                /* --protocol zmtp */
static unsigned char hdr[11];   /* ZMTP: delimiter frame, then the body frame's header */
static size_t hdr_len;          /* 0 for plain TCP */
static size_t wire_size;        /* hdr_len + msg_size: the bytes of one message */
static double timeout_s = 10.0;
static int ep;
static long errors[E_COUNT];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void __attribute__((noreturn)) die(const char *msg)
{
    fprintf(stderr, PROG ": %s\n", msg);
    exit(2);
}

static enum err classify(int e)
{
    switch (e) {
    case ECONNREFUSED: return E_REFUSED;
    case ECONNRESET: case EPIPE: case ECONNABORTED: return E_RESET;
    case ETIMEDOUT: case EAGAIN: return E_TIMEOUT;
    case EMFILE: case ENFILE: return E_FDLIMIT;
    case EADDRNOTAVAIL: case EADDRINUSE: return E_NOADDR;
    default: return E_OTHER;
    }
}

/* Byte k of message `round` on connection `id`: every message differs, so a
 * stale or misrouted echo is caught.  The last byte is a newline. */
static char pattern(uint32_t id, uint32_t round, size_t k)
{
    if (k + 1 == msg_size)
        return '\n';
    return (char)('a' + (id * 7u + round * 3u + (uint32_t)k) % 26u);
}

static void fill(char *buf, uint32_t id, uint32_t round)
{
    for (size_t k = 0; k < msg_size; k++)
        buf[k] = pattern(id, round, k);
}

/* Byte k of a message as it travels, frame headers included: an echo must
 * give back exactly what was sent (a REQ envelope is its own reply's). */
static char wire_byte(uint32_t id, uint32_t round, size_t k)
{
    return k < hdr_len ? (char)hdr[k] : pattern(id, round, k - hdr_len);
}

static void fill_wire(char *buf, uint32_t id, uint32_t round)
{
    memcpy(buf, hdr, hdr_len);
    fill(buf + hdr_len, id, round);
}

/* ---- ZMTP 3.0, NULL mechanism, as a REQ socket (rfc.zeromq.org/spec/23) */

/* Our greeting (signature, version 3.0, "NULL", as-server 0, filler) and
 * our READY command (Socket-Type = REQ), sent at once. */
static const unsigned char zmtp_hello[64 + 27] = {
    0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0, 'N', 'U', 'L', 'L',
    [64] = 0x04, 25, 5, 'R', 'E', 'A', 'D', 'Y',
    11, 'S', 'o', 'c', 'k', 'e', 't', '-', 'T', 'y', 'p', 'e', 0, 0, 0, 3, 'R', 'E', 'Q',
};

static void zmtp_setup(void)
{
    hdr[0] = 0x01;              /* MORE, size 0: the REQ delimiter */
    hdr[1] = 0x00;
    if (msg_size <= 255) {
        hdr[2] = 0x00;
        hdr[3] = (unsigned char)msg_size;
        hdr_len = 4;
    } else {
        hdr[2] = 0x02;          /* long frame: 8-byte size */
        for (int i = 0; i < 8; i++)
            hdr[3 + i] = (unsigned char)((uint64_t)msg_size >> (56 - 8 * i));
        hdr_len = 11;
    }
}

/* How many more bytes of the peer's greeting and READY we need (exactly:
 * nothing past them is read). */
static size_t zmtp_need(const struct conn *c)
{
    if (c->hs_total)
        return c->hs_total - c->hs;
    if (c->hs < 65)
        return 65 - c->hs;      /* the greeting and the command's flags */
    return (c->hs_long ? 73 : 66) - c->hs;      /* its size */
}

/* Take n handshake bytes; -1 if they are not ZMTP 3 from a command. */
static int zmtp_take(struct conn *c, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t k = c->hs++;
        if ((k == 0 && p[i] != 0xff) || (k == 10 && p[i] < 3))
            return -1;
        if (k == 64) {
            if (!(p[i] & 0x04))
                return -1;      /* a message before READY */
            c->hs_long = (p[i] & 0x02) != 0;
        } else if (k > 64 && !c->hs_total) {
            c->hs_size = (c->hs_size << 8) | p[i];
            if (c->hs == (c->hs_long ? 73u : 66u))
                c->hs_total = c->hs + c->hs_size;
        } else if (k > 64 && k < c->hs_total - c->hs_size + 6
                   && p[i] != (unsigned char)"\5READY"[k - (c->hs_total - c->hs_size)]) {
            return -1;          /* another command than READY */
        }
    }
    return 0;
}

/* Read what there is of the handshake: 1 done, 0 not yet, -1 failed (errno,
 * or EPROTO). */
static int zmtp_read(struct conn *c)
{
    unsigned char buf[512];
    while (!c->hs_total || c->hs < c->hs_total) {
        size_t need = zmtp_need(c);
        ssize_t r = recv(c->fd, buf, need < sizeof buf ? need : sizeof buf, 0);
        if (r > 0) {
            if (zmtp_take(c, buf, (size_t)r) < 0) {
                errno = EPROTO;
                return -1;
            }
        } else if (r == 0) {
            errno = ECONNRESET;
            return -1;
        } else if (errno == EAGAIN || errno == EINTR) {
            return 0;
        } else {
            return -1;
        }
    }
    return 1;
}

static int zmtp_start(struct conn *c)
{
    c->hs = c->hs_total = c->hs_size = 0;
    c->hs_long = 0;
    return send(c->fd, zmtp_hello, sizeof zmtp_hello, MSG_NOSIGNAL) == (ssize_t)sizeof zmtp_hello ? 0 : -1;
}

/* A non-blocking socket with connect() started; -1 and errno on failure. */
static int start_connect(int *in_progress)
{
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nsrc) {
        struct sockaddr_in src = { .sin_family = AF_INET,
                                   .sin_addr = srcs[next_src++ % nsrc] };
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
    }
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
        if (errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        *in_progress = 1;
    } else {
        *in_progress = 0;
    }
    return fd;
}

static void kill_conn(struct conn *c, enum err why)
{
    if (c->state == S_DEAD)
        return;
    errors[why]++;
    if (c->fd >= 0)
        close(c->fd);           /* also leaves the epoll set */
    c->fd = -1;
    c->state = S_DEAD;
}

static void print_errors(void)
{
    printf("\"errors\":{");
    for (int i = 0, first = 1; i < E_COUNT; i++)
        if (errors[i]) {
            printf("%s\"%s\":%ld", first ? "" : ",", err_names[i], errors[i]);
            first = 0;
        }
    printf("}");
}

static int ms_left(uint64_t deadline)
{
    uint64_t t = now_ns();
    return t >= deadline ? 0 : (int)((deadline - t) / 1000000u) + 1;
}

/* ---- connection sets: open many at once, echo on all at once ---------- */

static struct conn *conns;
static size_t nconns, capconns;

static struct conn *new_conn(void)
{
    if (nconns == capconns) {
        size_t cap = capconns ? capconns * 2 : 1024;
        struct conn *p = realloc(conns, cap * sizeof *p);
        if (!p)
            die("out of memory");
        conns = p;
        capconns = cap;
    }
    struct conn *c = &conns[nconns];
    memset(c, 0, sizeof *c);
    c->id = (uint32_t)nconns++;
    c->fd = -1;
    return c;
}

static void watch(struct conn *c, uint32_t events, int op)
{
    struct epoll_event ev = { .events = events, .data.u32 = c->id };
    if (epoll_ctl(ep, op, c->fd, &ev) < 0)
        kill_conn(c, classify(errno));
}

/* An idle connection the server closed or reset: level-triggered epoll
 * would report it on every wait, so it goes now (counted as reset). */
static void drop_if_hung_up(struct conn *c, uint32_t events)
{
    if (c->state == S_IDLE && (events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)))
        kill_conn(c, E_RESET);
}

/* TCP is connected: done (1), or the ZMTP handshake begins (0); -1 if the
 * connection failed (and was killed). */
static int connected(struct conn *c, int op)
{
    if (!zmtp) {
        c->state = S_IDLE;
        watch(c, 0, op);
        return c->state == S_IDLE ? 1 : -1;
    }
    if (zmtp_start(c) < 0) {
        c->state = S_IDLE;
        kill_conn(c, classify(errno));
        return -1;
    }
    c->state = S_HANDSHAKE;
    watch(c, EPOLLIN, op);
    return c->state == S_HANDSHAKE ? 0 : -1;
}

/* Open n more connections concurrently; returns how many connected. */
static long open_many(long n, uint64_t *elapsed)
{
    struct epoll_event evs[512];
    size_t first = nconns;
    long pending = 0, ok = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(timeout_s * 1e9);

    for (long i = 0; i < n; i++) {
        struct conn *c = new_conn();
        int in_progress;
        c->fd = start_connect(&in_progress);
        if (c->fd < 0) {
            c->state = S_IDLE;
            kill_conn(c, classify(errno));
            continue;
        }
        c->t0 = t0;
        if (in_progress) {
            c->state = S_CONNECTING;
            watch(c, EPOLLOUT, EPOLL_CTL_ADD);
            if (c->state == S_CONNECTING)
                pending++;
        } else {
            int r = connected(c, EPOLL_CTL_ADD);
            ok += r > 0;
            pending += r == 0;
        }
    }
    while (pending > 0) {
        int k = epoll_wait(ep, evs, 512, ms_left(deadline));
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        if (k <= 0 && now_ns() >= deadline)
            break;
        for (int i = 0; i < k; i++) {
            struct conn *c = &conns[evs[i].data.u32];
            int soerr = 0;
            socklen_t len = sizeof soerr;
            if (c->state == S_HANDSHAKE) {
                int r = zmtp_read(c);
                if (r == 0)
                    continue;
                pending--;
                if (r < 0) {
                    kill_conn(c, errno == EPROTO ? E_OTHER : classify(errno));
                    continue;
                }
                c->state = S_IDLE;
                watch(c, 0, EPOLL_CTL_MOD);
                ok += c->state == S_IDLE;
                continue;
            }
            if (c->state != S_CONNECTING) {
                drop_if_hung_up(c, evs[i].events);
                continue;
            }
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
            if (soerr) {
                pending--;
                kill_conn(c, classify(soerr));
                continue;
            }
            int r = connected(c, EPOLL_CTL_MOD);
            ok += r > 0;
            pending -= r != 0;
        }
    }
    for (size_t i = first; i < nconns; i++)
        if (conns[i].state == S_CONNECTING || conns[i].state == S_HANDSHAKE)
            kill_conn(&conns[i], E_TIMEOUT);
    *elapsed = now_ns() - t0;
    return ok;
}

/* Read what is there; returns 1 when the whole echo is in, 0 if not yet,
 * -1 if the connection failed (and was killed). */
static int take_echo(struct conn *c)
{
    char buf[MAX_WIRE];
    for (;;) {
        ssize_t r = recv(c->fd, buf, wire_size - c->got, 0);
        if (r > 0) {
            for (ssize_t k = 0; k < r; k++)
                if (buf[k] != wire_byte(c->id, c->round, c->got + (size_t)k)) {
                    kill_conn(c, E_MISMATCH);
                    return -1;
                }
            c->got += (size_t)r;
            if (c->got == wire_size)
                return 1;
        } else if (r == 0) {
            kill_conn(c, E_EOF);
            return -1;
        } else if (errno == EAGAIN || errno == EINTR) {
            return 0;
        } else {
            kill_conn(c, classify(errno));
            return -1;
        }
    }
}

/* Send the next message on c; 0, or -1 if the connection failed. */
static int send_msg(struct conn *c)
{
    char buf[MAX_WIRE];
    c->round++;
    c->got = 0;
    fill_wire(buf, c->id, c->round);
    c->t0 = now_ns();
    ssize_t w = send(c->fd, buf, wire_size, MSG_NOSIGNAL);
    if (w != (ssize_t)wire_size) {  /* small messages always fit the buffer */
        kill_conn(c, w < 0 ? classify(errno) : E_OTHER);
        return -1;
    }
    c->state = S_WAITING;
    watch(c, EPOLLIN, EPOLL_CTL_MOD);
    return c->state == S_WAITING ? 0 : -1;
}

/* One message on every live connection; returns how many came back right. */
static long echo_all(uint64_t *elapsed)
{
    struct epoll_event evs[512];
    long waiting = 0, ok = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(timeout_s * 1e9);

    for (size_t i = 0; i < nconns; i++)
        if (conns[i].state == S_IDLE && send_msg(&conns[i]) == 0)
            waiting++;
    while (waiting > 0) {
        int k = epoll_wait(ep, evs, 512, ms_left(deadline));
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        if (k <= 0 && now_ns() >= deadline)
            break;
        for (int i = 0; i < k; i++) {
            struct conn *c = &conns[evs[i].data.u32];
            if (c->state != S_WAITING) {
                drop_if_hung_up(c, evs[i].events);
                continue;
            }
            int r = take_echo(c);
            if (r == 0)
                continue;
            waiting--;
            if (r > 0) {
                ok++;
                c->state = S_IDLE;
                watch(c, 0, EPOLL_CTL_MOD);
            }
        }
    }
    for (size_t i = 0; i < nconns; i++)
        if (conns[i].state == S_WAITING)
            kill_conn(&conns[i], E_TIMEOUT);
    *elapsed = now_ns() - t0;
    return ok;
}

static long live_conns(void)
{
    long n = 0;
    for (size_t i = 0; i < nconns; i++)
        n += conns[i].state != S_DEAD;
    return n;
}

static void close_all(void)
{
    for (size_t i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    nconns = 0;
}

/* ---- modes ------------------------------------------------------------ */

static int wait_fd(int fd, short events, uint64_t deadline)
{
    struct pollfd p = { .fd = fd, .events = events };
    for (;;) {
        int r = poll(&p, 1, ms_left(deadline));
        if (r > 0)
            return 0;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR)
            return -1;
    }
}

/* One exchange on a blocking-style loop; returns its duration or 0 (errno
 * set, or EPROTO for a wrong echo, ENODATA for EOF). */
static uint64_t exchange(int fd, uint32_t id, uint32_t round)
{
    char out[MAX_WIRE], in[MAX_WIRE];
    size_t got = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(timeout_s * 1e9);
    fill_wire(out, id, round);
    if (send(fd, out, wire_size, MSG_NOSIGNAL) != (ssize_t)wire_size)
        return 0;
    while (got < wire_size) {
        ssize_t r = recv(fd, in + got, wire_size - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            errno = ENODATA;
            return 0;
        } else if (errno == EAGAIN) {
            if (wait_fd(fd, POLLIN, deadline) < 0)
                return 0;
        } else if (errno != EINTR) {
            return 0;
        }
    }
    if (memcmp(in, out, wire_size) != 0) {
        errno = EPROTO;
        return 0;
    }
    return now_ns() - t0 ? now_ns() - t0 : 1;
}

/* The ZMTP handshake on one connection, waiting for each part. */
static int handshake(int fd, uint64_t deadline)
{
    struct conn c = { .fd = fd };
    int r;
    if (zmtp_start(&c) < 0)
        return -1;
    while ((r = zmtp_read(&c)) == 0)
        if (wait_fd(fd, POLLIN, deadline) < 0)
            return -1;
    return r < 0 ? -1 : 0;
}

static void count_errno(int e)
{
    errors[e == EPROTO ? E_MISMATCH : e == ENODATA ? E_EOF : classify(e)]++;
}

static int mode_single(long trials, double gap)
{
    struct timespec pause = { .tv_sec = (time_t)gap,
                              .tv_nsec = (long)((gap - (double)(time_t)gap) * 1e9) };
    uint64_t *t = calloc((size_t)trials * 3, sizeof *t);
    long done = 0, failed_in_a_row = 0;
    if (!t)
        die("out of memory");
    for (long i = 0; i < trials && failed_in_a_row < 10; i++) {
        int in_progress, soerr = 0;
        socklen_t len = sizeof soerr;
        uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(timeout_s * 1e9);
        int fd = start_connect(&in_progress);
        if (fd < 0) {
            count_errno(errno);
            failed_in_a_row++;
            continue;
        }
        if (in_progress && (wait_fd(fd, POLLOUT, deadline) < 0
                || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0
                || soerr)) {
            count_errno(soerr ? soerr : errno);
            close(fd);
            failed_in_a_row++;
            continue;
        }
        if (zmtp && handshake(fd, deadline) < 0) {
            count_errno(errno == EPROTO ? EIO : errno);   /* not ZMTP: "other" */
            close(fd);
            failed_in_a_row++;
            continue;
        }
        uint64_t tc = now_ns() - t0;
        uint64_t e1 = exchange(fd, (uint32_t)i, 1);
        uint64_t e2 = e1 ? exchange(fd, (uint32_t)i, 2) : 0;
        if (!e1 || !e2) {
            count_errno(errno);
            close(fd);
            failed_in_a_row++;
            continue;
        }
        close(fd);
        if (gap > 0)
            nanosleep(&pause, NULL);    /* the next trial starts on an idle server */
        failed_in_a_row = 0;
        t[3 * done] = tc;
        t[3 * done + 1] = e1;
        t[3 * done + 2] = e2;
        done++;
    }
    const char *names[3] = { "connect", "exchange1", "exchange2" };
    printf("{\"mode\":\"single\",\"trials\":%ld,", done);
    for (int j = 0; j < 3; j++) {
        printf("\"%s\":[", names[j]);
        for (long i = 0; i < done; i++)
            printf("%s%llu", i ? "," : "", (unsigned long long)t[3 * i + j]);
        printf("],");
    }
    print_errors();
    printf("}\n");
    free(t);
    return 0;
}

static int mode_burst(long n)
{
    uint64_t t_open, t_msgs = 0;
    char line[64];
    long opened = open_many(n, &t_open), echoed = 0;
    if (opened > 0)
        echoed = echo_all(&t_msgs);
    printf("{\"mode\":\"burst\",\"conns\":%ld,\"opened\":%ld,\"open_ns\":%llu,"
           "\"echoed\":%ld,\"messages_ns\":%llu,", n, opened,
           (unsigned long long)t_open, echoed, (unsigned long long)t_msgs);
    print_errors();
    printf("}\n");
    fflush(stdout);
    (void)!fgets(line, sizeof line, stdin);     /* hold until told */
    close_all();
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* CPU time (user + system) of this process so far. */
static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int mode_rr(long n, double duration, double warmup)
{
    struct epoll_event evs[512];
    uint64_t t_open, start, stop, end, next_check = 0;
    size_t nlat = 0, caplat = 1 << 20;
    uint32_t *lat = malloc(caplat * sizeof *lat);
    long measured = 0, total = 0;
    int announced = 0;
    double cpu0 = 0;

    if (!lat)
        die("out of memory");
    open_many(n, &t_open);
    /* One echo on every connection first: a server that forks or starts a
     * program per connection is then running, and what follows measures
     * its steady state (the start-up cost is the burst mode's business). */
    echo_all(&t_open);
    start = now_ns() + (uint64_t)(warmup * 1e9);
    stop = start + (uint64_t)(duration * 1e9);
    end = stop;
    for (size_t i = 0; i < nconns; i++)
        if (conns[i].state == S_IDLE)
            send_msg(&conns[i]);
    while (live_conns() > 0) {
        uint64_t t = now_ns();
        if (t >= stop)
            break;
        if (!announced && t >= start) {
            /* The caller samples the server's CPU time now and at the end. */
            printf("{\"event\":\"start\"}\n");
            fflush(stdout);
            announced = 1;
            cpu0 = cpu_seconds();
        }
        int k = epoll_wait(ep, evs, 512, ms_left(announced ? stop : start));
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        t = now_ns();
        for (int i = 0; i < k; i++) {
            struct conn *c = &conns[evs[i].data.u32];
            if (c->state != S_WAITING || take_echo(c) <= 0)
                continue;
            total++;
            if (c->t0 >= start && t <= stop) {
                uint64_t d = t - c->t0;
                measured++;
                if (nlat == caplat) {
                    uint32_t *p = realloc(lat, 2 * caplat * sizeof *p);
                    if (p) {
                        lat = p;
                        caplat *= 2;
                    }
                }
                if (nlat < caplat)
                    lat[nlat++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
            }
            send_msg(c);
        }
        /* A connection silent for the whole timeout counts as failed. */
        if (t >= next_check) {
            next_check = t + 100000000u;
            for (size_t j = 0; j < nconns; j++)
                if (conns[j].state == S_WAITING && t > conns[j].t0
                    && t - conns[j].t0 > (uint64_t)(timeout_s * 1e9))
                    kill_conn(&conns[j], E_TIMEOUT);
        }
    }
    end = now_ns();
    if (end > stop)
        end = stop;
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    double cpu = announced ? cpu_seconds() - cpu0 : 0;
#define PCT(p) (nlat ? lat[(size_t)((p) * (double)(nlat - 1) + 0.5)] : 0u)
    printf("{\"mode\":\"rr\",\"conns\":%ld,\"live\":%ld,\"round_trips\":%ld,"
           "\"total_round_trips\":%ld,\"elapsed_ns\":%llu,\"p50_ns\":%u,"
           "\"p90_ns\":%u,\"p99_ns\":%u,\"max_ns\":%u,\"cpu_s\":%.6f,",
           n, live_conns(), measured, total,
           (unsigned long long)(end > start ? end - start : 0),
           PCT(0.5), PCT(0.9), PCT(0.99), nlat ? lat[nlat - 1] : 0u, cpu);
    print_errors();
    printf("}\n");
    free(lat);
    close_all();
    return 0;
}

static int mode_hold(void)
{
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        long n;
        uint64_t t;
        memset(errors, 0, sizeof errors);
        if (sscanf(line, "open %ld", &n) == 1) {
            long ok = open_many(n, &t);
            printf("{\"cmd\":\"open\",\"new\":%ld,\"live\":%ld,\"ns\":%llu,",
                   ok, live_conns(), (unsigned long long)t);
        } else if (!strncmp(line, "echo", 4)) {
            long ok = echo_all(&t);
            printf("{\"cmd\":\"echo\",\"ok\":%ld,\"live\":%ld,\"ns\":%llu,",
                   ok, live_conns(), (unsigned long long)t);
        } else if (!strncmp(line, "quit", 4)) {
            break;
        } else {
            printf("{\"cmd\":\"?\",");
        }
        print_errors();
        printf("}\n");
        fflush(stdout);
    }
    close_all();
    return 0;
}

static void usage(void)
{
    printf("usage: " PROG " single|burst|rr|hold [options] HOST PORT\n"
        "  --trials N      single: sequential connections (default 100)\n"
        "  --conns N       burst, rr: concurrent connections (default 100)\n"
        "  --duration S    rr: measured seconds (default 2)\n"
        "  --warmup S      rr: seconds before measuring (default 0.2)\n"
        "  --gap S         single: seconds between trials (default 0)\n"
        "  --size B        message bytes, 2-65536 (default 64)\n"
        "  --timeout S     per connect/echo phase (default 10)\n"
        "  --src A,B,...   IPv4 source addresses, used in turn\n"
        "  --protocol P    tcp (default), or zmtp: ZeroMQ's, as a REQ socket\n"
        "hold reads 'open N', 'echo', 'quit' lines on stdin.\n"
        "One JSON object per line on stdout.\n");
}

int main(int argc, char **argv)
{
    const char *mode = NULL, *host = NULL, *port = NULL;
    long count = 100;
    double duration = 2.0, warmup = 0.2, gap = 0;
    struct rlimit rl;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        }
        if (a[0] == '-' && a[1] == '-') {
            if (i + 1 == argc)
                die("option needs a value (try --help)");
            const char *v = argv[++i];
            if (!strcmp(a, "--trials") || !strcmp(a, "--conns"))
                count = atol(v);
            else if (!strcmp(a, "--duration"))
                duration = atof(v);
            else if (!strcmp(a, "--warmup"))
                warmup = atof(v);
            else if (!strcmp(a, "--gap"))
                gap = atof(v);
            else if (!strcmp(a, "--size"))
                msg_size = (size_t)atol(v);
            else if (!strcmp(a, "--timeout"))
                timeout_s = atof(v);
            else if (!strcmp(a, "--protocol")) {
                if (strcmp(v, "tcp") && strcmp(v, "zmtp"))
                    die("--protocol is tcp or zmtp");
                zmtp = !strcmp(v, "zmtp");
            }
            else if (!strcmp(a, "--src")) {
                char *list = strdup(v), *save = NULL;
                for (char *s = strtok_r(list, ",", &save); s && nsrc < MAX_SRC;
                     s = strtok_r(NULL, ",", &save))
                    if (inet_pton(AF_INET, s, &srcs[nsrc++]) != 1)
                        die("bad --src address");
                free(list);
            } else
                die("unknown option (try --help)");
        } else if (!mode) {
            mode = a;
        } else if (!host) {
            host = a;
        } else if (!port) {
            port = a;
        } else {
            die("too many arguments (try --help)");
        }
    }
    if (!mode || !host || !port)
        die("need MODE HOST PORT (try --help)");
    if (msg_size < 2 || msg_size > MAX_SIZE || count < 1 || timeout_s <= 0 || gap < 0 || gap > 60)
        die("bad --size, --trials/--conns or --timeout");
    if (zmtp)
        zmtp_setup();
    wire_size = hdr_len + msg_size;
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1)
        die("HOST must be a numeric IPv4 address");
    /* As many descriptors as we are allowed: the ramp needs thousands. */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    if (!strcmp(mode, "single"))
        return mode_single(count, gap);
    if (!strcmp(mode, "burst"))
        return mode_burst(count);
    if (!strcmp(mode, "rr"))
        return mode_rr(count, duration, warmup);
    if (!strcmp(mode, "hold"))
        return mode_hold();
    die("MODE is single, burst, rr or hold");
}
