"""Fails on its first attempt and succeeds on the next: shows retries and the job context.

A function that takes a second parameter receives the context: job_id, attempt,
max_attempts and timeout_s.
"""


def main(input, context):
    if context["attempt"] < 2:
        raise RuntimeError(f"attempt {context['attempt']} fails on purpose")
    return {"attempt": context["attempt"], "input": input}
