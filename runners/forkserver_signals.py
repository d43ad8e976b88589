"""Imported only by the engines' forkserver (`engine_pipe._context` preloads it), never by a worker.

BentoML stops a worker by sending SIGTERM to it and to its children (circus's `stop_children`), so the
forkserver gets the server's stop signal too. Dying of it would close the sentinel pipes of every engine
it forked, and the worker would take its engines for crashed and start new ones while the server stops.
The forkserver ignores it instead: it exits anyway once its worker does (its pipe from the worker closes).
It is preloaded after concrete, whose import installs signal handlers of its own (SIGTERM's among them).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
