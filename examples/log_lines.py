"""Prints log lines; they are captured as the job's stdout and stderr (`sless logs` shows them)."""

import sys


def main(input):
    for step in range(1, int(input or 3) + 1):
        print(f"step {step}: working")
    print("almost done", file=sys.stderr)
    return "done"
