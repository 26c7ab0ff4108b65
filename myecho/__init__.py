"""myecho: one echo service (RFC 862) in every daemon model of the talk
"Démons en PHP, de inetd à ZeroMQ", packaged and measured."""

__version__ = "0.2.0"
