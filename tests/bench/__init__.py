"""The benchmark harness (`make bench`); see tests/bench/run.py. Not collected by pytest."""
