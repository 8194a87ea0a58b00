"""Benchmark data: native-format loaders, hub loading, subsets."""

from .loaders import BENCHMARKS, SUMMARY_BENCHMARKS, LoadResult, load_benchmark
from .record import MULTI, OPEN, SINGLE, SUMMARY, QARecord
from .subsets import exclude_overlap, normalized_question, route_balanced, seeded_subset

__all__ = [
    "BENCHMARKS", "SUMMARY_BENCHMARKS", "LoadResult", "load_benchmark", "QARecord", "SINGLE", "MULTI", "OPEN",
    "SUMMARY",
    "exclude_overlap", "normalized_question", "route_balanced", "seeded_subset",
]
