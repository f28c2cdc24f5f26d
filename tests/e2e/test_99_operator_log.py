"""The main operator's log, over the whole suite, holds no refused request:
the chart's RBAC covered everything it did."""

from __future__ import annotations

from conftest import refusals


def test_the_operator_was_never_refused(operators):
    text = operators.log.read_text(errors="replace")
    assert "starting operator" in text
    assert not refusals(text), refusals(text)[:5]
