"""Testing layer: the parts tests, benchmarks and the demo share — the sandbox (a local
double of the providers' report endpoints), real-process helpers (a redis-server on a free
port, worker subprocesses) and the demo's scripted scenario.

May import: every layer below the CLI.
"""
