"""Pruning methods as the composition allocator x pruner (x recovery, its own config group).

- An *allocator* (`methods.base.Allocator`) decides the sparsity of every prunable linear.
- A *pruner* (`methods.base.Pruner`) removes weights inside one block given those rates; a structured
  one (`ChannelPruner`) removes FFN channels physically.
`methods.base` is the contract, `methods.lifecycle` the driver that runs it. A component registers with
`@register_allocator` / `@register_pruner` (`methods.registry`) and is listed in `methods.catalog`,
which parses and builds a method; its `Options` dataclass is the schema of its keys under `method.`.
This init imports nothing: a package init that imported its modules would be imported back by each of
them (Python runs a package's init before any of its modules), an import cycle.
"""
