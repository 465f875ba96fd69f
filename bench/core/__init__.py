"""The floor everything stands on, importing nothing else of prunebench: the config vocabulary and its
errors (`vocab`), the family adapters (`families`), the sequential layer-wise engine (`engine`),
perplexity (`perplexity`) and the result record with its metric registry (`records`).

`methods/` builds on this package alone; the harness (the rest of `bench/`) and `reports/` build on it
too. The layering is an import-linter contract in pyproject.toml, checked by the test suite.
"""
