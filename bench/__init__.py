"""Fleet's benchmarks: each writes JSON plus a markdown table (and a PNG where it helps).

Run as ``python -m bench NAME`` from the repository root, or ``fleet bench NAME``.
"""
