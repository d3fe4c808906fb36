"""`qat.summary`'s table: whole layer names in logs and pipes, fitted to the width on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from torch import nn

import qat

NAME = "encoder_with_a_rather_long_name.block_number_seven.projection_to_the_hidden_size"


def _summary() -> qat.QuantSummary:
    inner = nn.Module()
    inner.block_number_seven = nn.Module()
    inner.block_number_seven.projection_to_the_hidden_size = nn.Linear(4, 4)
    model = nn.Module()
    model.encoder_with_a_rather_long_name = inner
    model.forward = lambda x: inner.block_number_seven.projection_to_the_hidden_size(x)
    return qat.summary(qat.prepare(model, {"weight": {"bits": 4}}))


def _printed(**console) -> list[str]:
    out = io.StringIO()
    _summary().show(Console(file=out, width=80, **console))
    return out.getvalue().splitlines()


def test_not_a_terminal_prints_names_whole():
    lines = _printed()
    assert any(NAME in line for line in lines)
    assert max(map(len, lines)) > 80


def test_a_terminal_keeps_its_width():
    lines = _printed(force_terminal=True, color_system=None)
    assert max(map(len, lines)) <= 80
    assert not any(NAME in line for line in lines)


def test_str_prints_names_whole():
    text = str(_summary())
    assert NAME in text and "…" not in text
