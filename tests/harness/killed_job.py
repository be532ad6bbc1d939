"""A job's ``main`` that the system kills, as it kills a process out of memory (for the
forking worker's tests)."""

import os
import signal


def main(argv):
    os.kill(os.getpid(), signal.SIGKILL)
