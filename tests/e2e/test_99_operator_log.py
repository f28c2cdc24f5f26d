"""The main operator's log, over the whole suite, holds no refused request:
the chart's RBAC covered everything it did."""

from __future__ import annotations

import re


def test_the_operator_was_never_refused(operators):
    text = operators.log.read_text(errors="replace")
    assert "starting operator" in text
    assert not re.search(r"\b403\b|Forbidden|forbidden", text), \
        [line for line in text.splitlines() if "403" in line or "orbidden" in line][:5]
