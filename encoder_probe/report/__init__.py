"""Reports over results.json files: schema and validation, comparison tables, plots, HTML, regression check."""
from .check import CheckResult, check, parse_tolerances
from .compare import Comparison, compare
from .schema import SCHEMA_VERSION, load_results, load_runs, validate

__all__ = ["SCHEMA_VERSION", "CheckResult", "Comparison", "check", "compare", "load_results", "load_runs",
           "parse_tolerances", "validate"]
