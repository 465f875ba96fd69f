"""The search behind Self-Pruner, in three rooms: `chat` (the contract the LLM backends implement),
`evolution` (the population, the GA and LLM operators, repair) and `fitness` (scoring candidate rates)."""
