"""The compress pipeline as public stages: baseline -> apply_steps -> export_variants -> evaluate -> measure ->
assemble_report (``train_stage`` and ``export_stage`` group the first four, as compress and sweep run them).

``compress`` runs them end to end; ``edgekit.pipeline.benchmark``, the bench scripts and the zoo tests call the same stages
rather than rewiring them. Records are :class:`edgekit.results.Variant` and :class:`edgekit.results.Latency`.
"""

from ..cache import cache_dir  # noqa: F401
from ..hostinfo import machine_info  # noqa: F401
from ..results import Latency, Variant  # noqa: F401
from .assemble import assemble_report, recommend  # noqa: F401
from .baseline import TRAIN_VERSION, baseline_fit_config, get_baseline  # noqa: F401
from .main import CompressResult, compress, default_out_dir, run  # noqa: F401
from .stages import (REFERENCE, Trained, VariantSpec, apply_steps, drop_intermediates, evaluate,  # noqa: F401
                     export_stage, export_variants, load_runners, local_timer, measure, plan_variants,
                     train_stage)
