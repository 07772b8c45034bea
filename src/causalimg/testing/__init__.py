"""Contract checks shipped for plugin authors: run them in your plugin's tests."""

from causalimg.testing.contracts import (
    capabilities,
    check_attribute_mechanism,
    check_data_source,
    check_image_mechanism,
    check_partitioner,
)

__all__ = [
    "capabilities",
    "check_attribute_mechanism",
    "check_data_source",
    "check_image_mechanism",
    "check_partitioner",
]
