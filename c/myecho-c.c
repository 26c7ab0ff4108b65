/*
 * myecho-c -- the talk's C echo server (RFC 862 over TCP, one forked child
 * per connection), corrected.
 *
 * Usage: myecho-c [--host ADDR] [PORT]      (default 127.0.0.1, port 11142)
 *        myecho-c --help | --version
 *
 * What changed compared to the code shown in the talk:
 *  1. The parent closed the listening socket and returned after the first
 *     connection; here it keeps accepting until SIGTERM/SIGINT.
 *  2. No result was checked (socket, bind, listen, accept, fork, read,
 *     write).  Every call is checked; a port that cannot be bound is a
 *     one-line error and exit status 1.
 *  3. read()'s result went into a size_t, so an error (-1) looked like a
 *     huge byte count.  It is an ssize_t here, and EINTR is retried.
 *  4. write() may send fewer bytes than asked; the child loops until every
 *     byte is sent, so the echo is byte-exact.
 *  5. A client that half-closes (shutdown SHUT_WR) gets everything back and
 *     then EOF: the child answers EOF with shutdown(SHUT_WR).
 *  6. signal(SIGCHLD, SIG_IGN) made children impossible to wait for; here
 *     SIGCHLD is only noted and the loop reaps children with waitpid(), so
 *     a stop can wait for open connections (a grace period) and no zombie is
 *     left behind.
 *  7. An accept() error (EMFILE...) made it fork with fd -1 or spin; it now
 *     backs off for 100 ms.  A failed fork() is logged and backed off too.
 *  8. No SO_REUSEADDR: a restart failed while old connections sat in
 *     TIME_WAIT.  The talk also listened on every interface (INADDR_ANY),
 *     IPv4 only; the default is now 127.0.0.1 and --host takes any numeric
 *     IPv4 or IPv6 address.
 *  9. The buffer was 512 bytes; it is 64 KiB.
 * Added: systemd socket activation (LISTEN_FDS, fd 3), graceful stop on
 * SIGTERM/SIGINT (MYECHO_GRACEFUL_TIMEOUT seconds, default 5), children
 * that die with the parent (PR_SET_PDEATHSIG), SIGPIPE ignored.
 *
 * Signals are race-free: they stay blocked except inside ppoll(), which
 * unblocks them atomically while waiting.  A signal arriving just before
 * the wait therefore still interrupts it (a plain blocking accept() could
 * miss a SIGTERM that arrives between the flag check and the call).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROG          "myecho-c"
#ifndef MYECHO_VERSION
#define MYECHO_VERSION "unknown"     /* c/Makefile passes the package's */
#endif
#define DEFAULT_HOST  "127.0.0.1"
#define DEFAULT_PORT  "11142"
#define BUF_SIZE      (64 * 1024)
#define LISTEN_FD     3               /* SD_LISTEN_FDS_START */

static volatile sig_atomic_t stop_requests;  /* SIGTERM/SIGINT count */
static volatile sig_atomic_t child_exited;   /* SIGCHLD seen */

static sigset_t wait_mask;        /* mask used while waiting: signals open */
static sigset_t orig_mask;        /* mask at startup, restored in children */

static pid_t *kids;               /* live children, for the final SIGTERM */
static size_t nkids, capkids;

static void on_stop(int sig) { (void)sig; stop_requests++; }
static void on_child(int sig) { (void)sig; child_exited = 1; }

static void usage(FILE *f)
{
    fprintf(f,
        "usage: " PROG " [--host ADDR] [PORT]\n"
        "       " PROG " --help | --version\n"
        "Echo server (RFC 862, TCP), one forked process per connection.\n"
        "  --host ADDR        numeric IPv4 or IPv6 address to listen on"
        " (default " DEFAULT_HOST ")\n"
        "  PORT, --port PORT  TCP port (default " DEFAULT_PORT
        "; 0 picks a free one)\n"
        "  -h, --help         show this help and exit\n"
        "  --version          show the version and exit\n"
        "Under systemd socket activation (LISTEN_FDS) it serves fd 3.\n"
        "SIGTERM/SIGINT: stop accepting, wait MYECHO_GRACEFUL_TIMEOUT seconds"
        " (default 5)\nfor open connections, then terminate them.\n");
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

/* Sleep up to `seconds` (or forever if < 0) or until fd is readable; a
 * signal ends the wait early.  Signals are delivered only in here. */
static void wait_for(int fd, double seconds)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    struct timespec ts, *tsp = NULL;
    if (seconds >= 0) {
        if (seconds > 86400)
            seconds = 86400;    /* the caller loops; keeps tv_sec sane */
        ts.tv_sec = (time_t)seconds;
        ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    ppoll(&p, fd >= 0 ? 1 : 0, tsp, &wait_mask);
}

/* Strict decimal port, 0-65535 (0 means any free port). */
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

/* "HOST:PORT" (or "[HOST]:PORT" for IPv6) of a bound socket. */
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

/* The listening socket systemd passed (Accept=no), or -1 if none.  The
 * LISTEN_* variables are removed so that children never see them. */
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

static void add_kid(pid_t pid)
{
    if (nkids == capkids) {
        size_t cap = capkids ? 2 * capkids : 64;
        pid_t *p = realloc(kids, cap * sizeof *p);
        if (!p) {       /* untracked, it could outlive a stop: drop it */
            fprintf(stderr, PROG ": out of memory (connection dropped)\n");
            kill(pid, SIGTERM);
            return;
        }
        kids = p;
        capkids = cap;
    }
    kids[nkids++] = pid;
}

/* Collect every finished child; returns 0 once no child is left. */
static int reap(void)
{
    pid_t pid;
    child_exited = 0;
    while ((pid = waitpid(-1, NULL, WNOHANG)) > 0) {
        for (size_t i = 0; i < nkids; i++)
            if (kids[i] == pid) {
                kids[i] = kids[--nkids];
                break;
            }
    }
    return !(pid < 0 && errno == ECHILD);
}

/* Write all of buf, however many calls it takes. */
static int send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void __attribute__((noreturn)) child(int fd, pid_t parent)
{
    char buf[BUF_SIZE];
    struct sigaction dfl = { .sa_handler = SIG_DFL };

    /* Die with the parent; it may already be gone by the time we ask. */
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
        _exit(1);
    sigaction(SIGTERM, &dfl, NULL);
    sigaction(SIGINT, &dfl, NULL);
    sigaction(SIGCHLD, &dfl, NULL);
    sigprocmask(SIG_SETMASK, &orig_mask, NULL);

    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            if (send_all(fd, buf, (size_t)n) < 0)
                _exit(1);
        } else if (n == 0) {        /* client done sending (maybe half-closed) */
            shutdown(fd, SHUT_WR);
            _exit(0);
        } else if (errno != EINTR) {
            _exit(1);
        }
    }
}

/* Stop: no new connections, give open ones a grace period, then end them. */
static void __attribute__((noreturn)) shutdown_server(int lfd)
{
    const char *env = getenv("MYECHO_GRACEFUL_TIMEOUT");
    double grace = env ? strtod(env, NULL) : 5.0, deadline;
    int seen = stop_requests;

    close(lfd);
    deadline = now() + (grace > 0 ? grace : 0);
    if (reap())
        fprintf(stderr, PROG ": stopping, waiting up to %gs for %zu"
                " connection(s)\n", grace > 0 ? grace : 0, nkids);
    while (reap()) {
        double left = deadline - now();
        if (left <= 0 || stop_requests != seen)  /* 2nd signal: hurry */
            break;
        wait_for(-1, left);
    }
    if (reap()) {
        fprintf(stderr, PROG ": terminating %zu connection(s)\n", nkids);
        for (size_t i = 0; i < nkids; i++)
            kill(kids[i], SIGTERM);
        while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
            ;
    }
    fprintf(stderr, PROG ": stopped\n");
    free(kids);
    exit(0);
}

int main(int argc, char **argv)
{
    const char *host = DEFAULT_HOST, *port = DEFAULT_PORT, *env;
    char name[NI_MAXHOST + NI_MAXSERV + 4];
    struct sigaction sa = { .sa_handler = on_stop };  /* no SA_RESTART */
    sigset_t block;
    int lfd, nport = 0, starved = 0;
    pid_t self;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--version")) {
            puts(PROG " " MYECHO_VERSION);
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
        double g = strtod(env, &end);
        if (end == env || *end != '\0' || !(g >= 0))
            die(2, "bad MYECHO_GRACEFUL_TIMEOUT '%s' (seconds)", env);
    }

    /* Signals: handlers only take notes; they stay blocked outside ppoll. */
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, &orig_mask);
    wait_mask = orig_mask;
    sigdelset(&wait_mask, SIGTERM);
    sigdelset(&wait_mask, SIGINT);
    sigdelset(&wait_mask, SIGCHLD);
    sa.sa_mask = block;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_child;
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    self = getpid();
    lfd = systemd_socket();
    if (lfd >= 0) {
        sock_name(lfd, name, sizeof name);
        fprintf(stderr, PROG ": listening on fd %d from systemd (%s, pid %ld)\n",
                lfd, name, (long)self);
    } else {
        lfd = bind_socket(host, port);
        sock_name(lfd, name, sizeof name);
        fprintf(stderr, PROG ": listening on %s (pid %ld)\n", name, (long)self);
    }
    /* Non-blocking: we only accept after ppoll says a connection waits, and
     * a connection reset in between must not block us. */
    if (fcntl(lfd, F_SETFD, FD_CLOEXEC) < 0
        || fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK) < 0)
        die(1, "fcntl: %s", strerror(errno));

    while (!stop_requests) {
        int cfd;
        pid_t pid;

        if (child_exited)
            reap();
        wait_for(lfd, -1);      /* pending signals are delivered here */
        if (stop_requests)
            break;
        cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            switch (errno) {
            case EMFILE: case ENFILE: case ENOBUFS: case ENOMEM:
                if (!starved)       /* one line per episode, not 10/s */
                    fprintf(stderr, PROG ": accept: %s (backing off)\n",
                            strerror(errno));
                starved = 1;
                wait_for(-1, 0.1);
                continue;
            case EAGAIN: case EINTR: case ECONNABORTED: case EPROTO:
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
        pid = fork();
        if (pid == 0) {
            close(lfd);
            child(cfd, self);
        }
        close(cfd);
        if (pid < 0) {
            fprintf(stderr, PROG ": fork: %s (connection dropped)\n",
                    strerror(errno));
            wait_for(-1, 0.1);
        } else {
            add_kid(pid);
        }
    }
    shutdown_server(lfd);
}
