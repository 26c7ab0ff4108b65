/*
 * zmq-echo -- a minimal ZeroMQ echo in C on libzmq: the "limit" the bench
 * compares the zmq model against, as epoll-echo is select's.
 *
 * Usage: zmq-echo [--host ADDR] [PORT]    (default 127.0.0.1, port 11147)
 *
 * The zmq model's socket with none of its Python: a ROUTER socket (REQ and
 * DEALER clients), 2 libzmq I/O threads, a listen backlog of 4,096, the
 * same high-water marks and message size limit.  Each message goes back
 * frame for frame, envelope included.  A reply to a client that left, or
 * whose queue is full, is dropped (ROUTER_MANDATORY, non-blocking send).
 * What it measures: libzmq's own cost, chiefly for accepting a connection
 * and running its ZMTP handshake, which no Python code can go below.
 *
 * SIGTERM or SIGINT: exit 0 (nothing is in flight between two messages);
 * they are read from a signalfd polled beside the socket, so that one
 * arriving while libzmq is busy cannot be missed.
 * Bad arguments exit 2; an address that cannot be bound exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <zmq.h>

#define PROG          "zmq-echo"
#define DEFAULT_HOST  "127.0.0.1"
#define DEFAULT_PORT  "11147"
#define IO_THREADS    2
#define BACKLOG       4096
#define HIGH_WATER    1000
#define MAX_MESSAGE   (64LL * 1024 * 1024)

static void set_int(void *sock, int option, int value)
{
    if (zmq_setsockopt(sock, option, &value, sizeof value) != 0) {
        fprintf(stderr, PROG ": zmq_setsockopt %d: %s\n", option, zmq_strerror(errno));
        exit(1);
    }
}

static int valid_port(const char *s)
{
    char *end;
    long n = strtol(s, &end, 10);
    return *s && *end == '\0' && n >= 0 && n <= 65535;
}

static int usage(int status)
{
    fprintf(status ? stderr : stdout,
            "usage: " PROG " [--host ADDR] [PORT]\n"
            "A ZeroMQ ROUTER echo on libzmq (default %s:%s): the limit of the zmq models.\n",
            DEFAULT_HOST, DEFAULT_PORT);
    return status;
}

/* Echo one whole message (every frame) if one is there; 0 if none was. */
static int echo_one(void *router)
{
    int more, dropping = 0;
    do {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, router, ZMQ_DONTWAIT) < 0) {  /* the rest of a message is always there */
            zmq_msg_close(&frame);
            if (errno == EAGAIN)
                return 0;
            fprintf(stderr, PROG ": recv: %s\n", zmq_strerror(errno));
            exit(1);
        }
        more = zmq_msg_more(&frame);
        if (!dropping && zmq_msg_send(&frame, router, (more ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0)
            dropping = 1;       /* the client left (EHOSTUNREACH) or does not read (EAGAIN) */
        zmq_msg_close(&frame);  /* a no-op once sent */
    } while (more);
    return 1;
}

int main(int argc, char **argv)
{
    const char *host = DEFAULT_HOST, *port = DEFAULT_PORT;
    int nport = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return usage(0);
        if (!strcmp(a, "--host") && i + 1 < argc) {
            host = argv[++i];
        } else if (a[0] != '-' && !nport++ && valid_port(a)) {
            port = a;
        } else {
            fprintf(stderr, PROG ": bad argument '%s'\n", a);
            return usage(2);
        }
    }

    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    sigprocmask(SIG_BLOCK, &stop_signals, NULL);   /* before libzmq starts its threads */
    int signals = signalfd(-1, &stop_signals, SFD_CLOEXEC);
    if (signals < 0) {
        perror(PROG ": signalfd");
        return 1;
    }

    void *context = zmq_ctx_new();
    zmq_ctx_set(context, ZMQ_IO_THREADS, IO_THREADS);
    void *router = zmq_socket(context, ZMQ_ROUTER);
    set_int(router, ZMQ_ROUTER_MANDATORY, 1);
    set_int(router, ZMQ_SNDHWM, HIGH_WATER);
    set_int(router, ZMQ_RCVHWM, HIGH_WATER);
    set_int(router, ZMQ_BACKLOG, BACKLOG);
    set_int(router, ZMQ_LINGER, 0);
    int64_t max_message = MAX_MESSAGE;
    zmq_setsockopt(router, ZMQ_MAXMSGSIZE, &max_message, sizeof max_message);
    if (strchr(host, ':'))
        set_int(router, ZMQ_IPV6, 1);

    char endpoint[300];
    snprintf(endpoint, sizeof endpoint, strchr(host, ':') ? "tcp://[%s]:%s" : "tcp://%s:%s", host, port);
    if (zmq_bind(router, endpoint) != 0) {
        fprintf(stderr, PROG ": cannot bind %s: %s\n", endpoint, zmq_strerror(errno));
        return 1;
    }
    zmq_pollitem_t items[2] = {
        { .socket = router, .events = ZMQ_POLLIN },
        { .fd = signals, .events = ZMQ_POLLIN },
    };
    for (;;) {
        if (zmq_poll(items, 2, -1) < 0 && errno != EINTR) {
            fprintf(stderr, PROG ": poll: %s\n", zmq_strerror(errno));
            return 1;
        }
        if (items[1].revents)
            break;
        for (int i = 0; i < 256 && echo_one(router); i++)  /* a batch, then the signals again */
            ;
    }
    zmq_close(router);
    zmq_ctx_term(context);
    return 0;
}
