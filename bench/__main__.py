"""``python -m bench NAME``: run one of Fleet's benchmarks."""

from .cli import main

main()
