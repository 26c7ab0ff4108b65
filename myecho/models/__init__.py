"""The daemon models, side by side. Each module has ``serve(runtime)``
(inetd, which is handed one connection on stdin/stdout, has ``main()``)."""

#: model name -> module under myecho.models; imported only when chosen,
#: so ``myecho serve inetd`` never pays for pyzmq.
MODELS = {
    "inetd": "inetd",
    "fork": "fork",
    "select": "select",
    "asyncio": "aio",  # not "asyncio": the module would shadow the standard library's
    "zmq": "zmq",
    "broker": "broker",
    "worker": "worker",
}
