"""Raises: the job ends failed with error type `exception` after its retries."""


def main(input):
    raise ValueError(f"cannot handle input {input!r}")
