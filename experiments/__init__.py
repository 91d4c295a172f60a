"""metagrad's Hydra entry points (train, eval, summarize), benchmarks and device scripts."""
