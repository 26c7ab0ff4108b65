/*
 * epoll-echo -- a minimal single-threaded epoll echo server (RFC 862, TCP):
 * the "limit" the benchmarks compare the daemon models against.
 *
 * Usage: epoll-echo [--host ADDR] [PORT]    (default 127.0.0.1, port 11146)
 *
 * Non-blocking sockets, level-triggered epoll.  In the common case an echo
 * costs one recv() into a shared 64 KiB buffer and one send() from it.  If
 * the peer does not read fast enough, the unsent rest is copied to a buffer
 * of its own and the connection stops reading (EPOLLIN off, EPOLLOUT on)
 * until it is flushed: backpressure, at most 64 KiB pending per connection.
 * On EOF (which is only read once nothing is pending) it answers with
 * shutdown(SHUT_WR) and closes, so a half-closing client gets everything.
 *
 * Same conventions as myecho-c: systemd socket activation (LISTEN_FDS, fd
 * 3), SIGTERM/SIGINT stop accepting and give open connections
 * MYECHO_GRACEFUL_TIMEOUT seconds (default 5; a second signal cuts it
 * short), bad arguments exit 2, a port that cannot be bound exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROG          "epoll-echo"
#define DEFAULT_HOST  "127.0.0.1"
#define DEFAULT_PORT  "11146"
#define BUF_SIZE      (64 * 1024)
#define LISTEN_FD     3               /* SD_LISTEN_FDS_START */
#define MAX_EVENTS    256

struct conn {
    int fd;
    char *pend;                 /* bytes not echoed yet, NULL if none */
    size_t off, len;            /* pend[off..len) still to send */
    struct conn *prev, *next;   /* every open connection */
};

static volatile sig_atomic_t stop_requests;
static sigset_t wait_mask;      /* signals open only inside epoll_pwait */
static int ep, lfd = -1;
static struct conn *conns;
static int starved;             /* accept ran out of fds/memory */
static char rbuf[BUF_SIZE];     /* shared: data leaves it before the next recv */

static void on_stop(int sig) { (void)sig; stop_requests++; }

static void usage(void)
{
    printf("usage: " PROG " [--host ADDR] [PORT]\n"
        "Single-threaded epoll echo server (RFC 862, TCP).\n"
        "  --host ADDR        numeric IPv4 or IPv6 address to listen on"
        " (default " DEFAULT_HOST ")\n"
        "  PORT, --port PORT  TCP port (default " DEFAULT_PORT
        "; 0 picks a free one)\n"
        "  -h, --help         show this help and exit\n"
        "Under systemd socket activation (LISTEN_FDS) it serves fd 3.\n"
        "SIGTERM/SIGINT: stop accepting, wait MYECHO_GRACEFUL_TIMEOUT seconds"
        " (default 5)\nfor open connections, then close them.\n");
}

static void __attribute__((noreturn, format(printf, 2, 3)))
die(int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, PROG ": %s\n", msg);
    exit(status);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Milliseconds until time t (rounded up, capped), for epoll timeouts. */
static int ms_until(double t)
{
    double ms = (t - now()) * 1000.0 + 1.0;
    return ms <= 0 ? 0 : ms > 86400000.0 ? 86400000 : (int)ms;
}

static int valid_port(const char *s)
{
    char *end;
    long v;
    if (*s < '0' || *s > '9')
        return 0;
    errno = 0;
    v = strtol(s, &end, 10);
    return errno == 0 && *end == '\0' && v >= 0 && v <= 65535;
}

static void sock_name(int fd, char *out, size_t outlen)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0 ||
        getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, serv,
                    sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(out, outlen, "?");
        return;
    }
    snprintf(out, outlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s",
             host, serv);
}

/* The listening socket systemd passed (Accept=no), or -1 if none. */
static int systemd_socket(void)
{
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    int fd = -1;
    if (pid && fds && strtol(pid, NULL, 10) == (long)getpid()
        && strtol(fds, NULL, 10) >= 1) {
        int listening = 0;
        socklen_t len = sizeof listening;
        fd = LISTEN_FD;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0
            || !listening)
            die(1, "fd %d from systemd is not a listening socket", fd);
        if (strtol(fds, NULL, 10) > 1)
            fprintf(stderr, PROG ": LISTEN_FDS=%s, serving fd %d only\n",
                    fds, fd);
    }
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return fd;
}

static int bind_socket(const char *host, const char *port)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV,
    }, *res;
    int one = 1, fd, err;

    err = getaddrinfo(host, port, &hints, &res);
    if (err != 0)
        die(2, "bad address '%s': %s", host, gai_strerror(err));
    fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC,
                res->ai_protocol);
    if (fd < 0)
        die(1, "socket: %s", strerror(errno));
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0
        || bind(fd, res->ai_addr, res->ai_addrlen) < 0
        || listen(fd, 65535) < 0) { /* the kernel caps it at somaxconn */
        int v6 = res->ai_family == AF_INET6;
        err = errno;
        close(fd);
        freeaddrinfo(res);
        die(1, "cannot listen on %s%s%s:%s: %s", v6 ? "[" : "", host,
            v6 ? "]" : "", port, strerror(err));
    }
    freeaddrinfo(res);
    return fd;
}

static int watch(int op, int fd, uint32_t events, void *ptr)
{
    struct epoll_event ev = { .events = events, .data.ptr = ptr };
    return epoll_ctl(ep, op, fd, &ev);
}

static void close_conn(struct conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    close(c->fd);               /* also removes it from the epoll set */
    free(c->pend);
    free(c);
}

static int again(void)
{
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
}

/* One readiness event on a connection. */
static void serve(struct conn *c)
{
    ssize_t n, w;

    if (c->pend) {              /* backpressure: only flush until drained */
        w = send(c->fd, c->pend + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (!again())
                close_conn(c);
            return;
        }
        c->off += (size_t)w;
        if (c->off < c->len)
            return;
        free(c->pend);
        c->pend = NULL;
        if (watch(EPOLL_CTL_MOD, c->fd, EPOLLIN, c) < 0)
            close_conn(c);
        return;
    }

    n = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (n > 0) {
        w = send(c->fd, rbuf, (size_t)n, MSG_NOSIGNAL);
        if (w == n)
            return;             /* the common case */
        if (w < 0) {
            if (!again()) {
                close_conn(c);
                return;
            }
            w = 0;
        }
        c->len = (size_t)(n - w);
        c->off = 0;
        c->pend = malloc(c->len);
        if (!c->pend || watch(EPOLL_CTL_MOD, c->fd, EPOLLOUT, c) < 0) {
            close_conn(c);
            return;
        }
        memcpy(c->pend, rbuf + w, c->len);
    } else if (n == 0) {        /* EOF, nothing pending: we are done too */
        shutdown(c->fd, SHUT_WR);
        close_conn(c);
    } else if (!again()) {
        close_conn(c);
    }
}

/* Accept every waiting connection.  Returns 0, or 1 if out of file
 * descriptors or memory: the caller then pauses the listener. */
static int accept_all(void)
{
    for (;;) {
        struct conn *c;
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
            case EAGAIN:
                return 0;
            case EMFILE: case ENFILE: case ENOBUFS: case ENOMEM:
                if (!starved)       /* one line per episode */
                    fprintf(stderr, PROG ": accept: %s (pausing)\n",
                            strerror(errno));
                starved = 1;
                return 1;
            case EINTR: case ECONNABORTED: case EPROTO:
            case EPERM:             /* a firewall said no */
            /* Network errors Linux reports early, see accept(2). */
            case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
            case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH:
                continue;
            default:
                die(1, "accept: %s", strerror(errno));
            }
        }
        starved = 0;
        c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            return 1;
        }
        c->fd = fd;
        if (watch(EPOLL_CTL_ADD, fd, EPOLLIN, c) < 0) {
            close(fd);
            free(c);
            return 1;
        }
        c->next = conns;
        if (conns)
            conns->prev = c;
        conns = c;
    }
}

int main(int argc, char **argv)
{
    const char *host = DEFAULT_HOST, *port = DEFAULT_PORT, *env;
    char name[NI_MAXHOST + NI_MAXSERV + 4];
    struct sigaction sa = { .sa_handler = on_stop };
    struct epoll_event evs[MAX_EVENTS];
    sigset_t block;
    double grace = 5.0, deadline = 0, paused_until = 0;
    int nport = 0, stop_seen = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        } else if (!strcmp(a, "--host") || !strcmp(a, "--port")) {
            if (i + 1 == argc)
                die(2, "%s needs a value (try --help)", a);
            val = argv[++i];
        } else if (!strncmp(a, "--host=", 7) || !strncmp(a, "--port=", 7)) {
            val = a + 7;
        } else if (a[0] == '-' && a[1] != '\0') {
            die(2, "unknown option '%s' (try --help)", a);
        } else {
            val = a;            /* the positional PORT */
            a = "--port";
        }
        if (a[2] == 'h') {
            host = val;
        } else if (nport++) {
            die(2, "more than one port given (try --help)");
        } else if (!valid_port(val)) {
            die(2, "bad port '%s' (0-65535)", val);
        } else {
            port = val;
        }
    }
    env = getenv("MYECHO_GRACEFUL_TIMEOUT");
    if (env) {
        char *end;
        grace = strtod(env, &end);
        if (end == env || *end != '\0' || !(grace >= 0))
            die(2, "bad MYECHO_GRACEFUL_TIMEOUT '%s' (seconds)", env);
    }

    /* Signals only set a flag; they are delivered inside epoll_pwait. */
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &wait_mask);
    sigdelset(&wait_mask, SIGTERM);
    sigdelset(&wait_mask, SIGINT);
    sa.sa_mask = block;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    lfd = systemd_socket();
    if (lfd >= 0) {
        sock_name(lfd, name, sizeof name);
        fprintf(stderr, PROG ": listening on fd %d from systemd (%s, pid %ld)\n",
                lfd, name, (long)getpid());
    } else {
        lfd = bind_socket(host, port);
        sock_name(lfd, name, sizeof name);
        fprintf(stderr, PROG ": listening on %s (pid %ld)\n", name,
                (long)getpid());
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0
        || fcntl(lfd, F_SETFD, FD_CLOEXEC) < 0
        || fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK) < 0
        || watch(EPOLL_CTL_ADD, lfd, EPOLLIN, NULL) < 0)
        die(1, "epoll setup: %s", strerror(errno));

    for (;;) {
        int timeout = -1, n;

        if (stop_requests && !stop_seen) {      /* begin the graceful stop */
            stop_seen = stop_requests;
            close(lfd);
            lfd = -1;
            deadline = now() + grace;
            if (conns)
                fprintf(stderr, PROG ": stopping, waiting up to %gs for open"
                        " connections\n", grace);
        }
        if (stop_seen) {
            if (!conns)
                break;
            if (stop_requests != stop_seen || now() >= deadline) {
                fprintf(stderr, PROG ": closing open connections\n");
                while (conns)
                    close_conn(conns);
                break;
            }
            timeout = ms_until(deadline);
        } else if (paused_until > 0) {          /* out of fds: listener off */
            if (now() >= paused_until) {
                paused_until = 0;
                if (watch(EPOLL_CTL_ADD, lfd, EPOLLIN, NULL) < 0)
                    die(1, "epoll_ctl: %s", strerror(errno));
            } else {
                timeout = ms_until(paused_until);
            }
        }

        n = epoll_pwait(ep, evs, MAX_EVENTS, timeout, &wait_mask);
        if (n < 0 && errno != EINTR)
            die(1, "epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr) {
                serve(evs[i].data.ptr);
            } else if (lfd >= 0 && paused_until == 0 && accept_all()) {
                epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
                paused_until = now() + 0.1;
            }
        }
    }
    close(ep);
    fprintf(stderr, PROG ": stopped\n");
    return 0;
}
