"""Contract checks shipped for plugin authors: run them in your plugin's tests."""

from causalimg.testing.contracts import check_data_source, check_partitioner

__all__ = ["check_data_source", "check_partitioner"]
