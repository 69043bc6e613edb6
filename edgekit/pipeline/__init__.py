"""The compress pipeline as public stages: baseline -> apply_steps -> export_variants -> evaluate -> measure ->
assemble_report.

``compress`` runs them end to end; ``edgekit.pipeline.benchmark``, the bench scripts and the zoo tests call the same stages
rather than rewiring them. Records are :class:`edgekit.results.Variant` and :class:`edgekit.results.Latency`.
"""

from ..cache import cache_dir  # noqa: F401
from ..hostinfo import machine_info  # noqa: F401
from ..results import Latency, Variant  # noqa: F401
from .assemble import assemble_report, recommend  # noqa: F401
from .baseline import TRAIN_VERSION, baseline_fit_config, get_baseline  # noqa: F401
from .main import CompressResult, compress, default_out_dir, run  # noqa: F401
from .stages import (REFERENCE, VariantSpec, apply_steps, drop_intermediates, evaluate, export_variants,  # noqa: F401
                     load_runners, local_timer, measure, plan_variants)
