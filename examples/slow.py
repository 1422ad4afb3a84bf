"""Runs past its timeout: `sless submit examples/slow.py --timeout 1 --retries 0 --wait` fails with `timeout`."""

import time


def main(input):
    time.sleep(float(input or 10))
    return "finished"
