"""``python -m benchmarks``: the benchmark entry point (FLOPs/params table for now)."""
from .flops import main

if __name__ == "__main__":
    main()
