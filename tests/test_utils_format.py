"""format_metric: the one number format of the trainer's and fine-tuner's log lines."""
from __future__ import annotations

import math

from simmstnet.utils import format_metric


def test_format_metric_four_digits_and_missing_values():
    assert format_metric(12.3456) == "12.35" and format_metric(3) == "3"
    assert format_metric(None) == format_metric(math.nan) == format_metric(math.inf) == "n/a"
