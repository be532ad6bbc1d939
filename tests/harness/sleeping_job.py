"""A job's ``main`` that runs until it is stopped (for the forking worker's tests)."""

import time


def main(argv):
    while True:
        time.sleep(0.1)
