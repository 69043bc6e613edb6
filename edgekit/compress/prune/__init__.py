"""The prune step as a package (being split by concern: step, graph, plan, check)."""

from .step import (  # noqa: F401
    ADAPTERS, CUSTOM_PRUNERS, DEFAULT_ADAPTER, Adapter, Candidate, Op, Prune, PruneParams, Scope, _classifier,
    _default_lr, _group_ok, _record, adapter_for, apply_plan, check_plan, collect_candidates, find_bad_groups,
    layer_widths, opaque_modules, output_layer, plan, prune_to, resolve_ignored,
)
