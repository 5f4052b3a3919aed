"""The command-line tools (training, evaluation, studies, benchmarks, supervised examples).

Each runs as ``python scripts/<name>.py``; the package makes them importable as
``scripts.<name>`` by each other and by the tests, without ``sys.path`` edits.
"""
