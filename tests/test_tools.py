"""tools.py: the registry and the sample tools."""

from __future__ import annotations

import time

import pytest

from custom_llm_server.core.context import Context
from custom_llm_server.llm import tools
from custom_llm_server.llm.tools import ToolRegistry


def test_schema_comes_from_the_signature_and_docstring():
    from typing import Annotated

    from pydantic import Field

    registry = ToolRegistry()

    def book_table(people: Annotated[int, Field(description="How many")], time: str = "19:00") -> dict:
        """Book a table.

        More words that stay out of the description."""

    registry.add(book_table)
    assert registry.schemas() == [
        {
            "type": "function",
            "function": {
                "name": "book_table",
                "description": "Book a table.",
                "parameters": {
                    "type": "object",
                    "required": ["people"],
                    "properties": {
                        "people": {"type": "integer", "description": "How many"},
                        "time": {"type": "string", "default": "19:00"},
                    },
                },
            },
        }
    ]


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "factorial(10**6)",
        "10**5000",
        "2**100000000",
        "9**9**9**9",
        "__import__('os').system('id')",
        "open('/etc/passwd')",
        "x" * 400,
        "(-8)**0.5",
        "1/0",
        "round(1.5, 10**9)",
        "[1] * 10**9",
        "lambda: 1",
    ],
)
def test_calculate_refuses_quickly(expression):
    started = time.thread_time()  # CPU, not the wall clock: a busy machine does not change it
    with pytest.raises(ValueError):
        tools.calculate(expression)
    assert time.thread_time() - started < 0.05


@pytest.mark.parametrize(
    "expression, result",
    [
        ("2 + 3 * 4", 14),
        ("(1 + 2) ** 10", 59049),
        ("sqrt(16) / 8", 0.5),
        ("7 // 2 + 7 % 2", 4),
        ("factorial(5)", 120),
        ("2^10", 1024),
        ("-3 × 4 ÷ 2", -6),
        ("round(pi, 2)", 3.14),
    ],
)
def test_calculate_computes(expression, result):
    assert tools.calculate(expression)["result"] == result


def test_get_current_time_knows_time_zones():
    assert tools.get_current_time("Asia/Shanghai")["iso"].endswith("+08:00")
    with pytest.raises(ValueError, match="unknown time zone"):
        tools.get_current_time("Mars/Olympus")


def test_results_past_64_bits_are_results():
    import asyncio

    registry = tools.sample_tools()
    result = asyncio.run(registry.run("calculate", '{"expression": "factorial(25)"}', Context("t")))
    assert result == '{"expression": "factorial(25)", "result": 15511210043330985984000000}'


def test_an_expected_refusal_is_logged_without_a_traceback(caplog):
    import asyncio

    registry = tools.sample_tools()
    with caplog.at_level("INFO", logger="custom_llm.tools"):
        result = asyncio.run(registry.run("calculate", '{"expression": "1/0"}', Context("t")))
    assert "division by zero" in result
    assert "Traceback" not in caplog.text and all(r.exc_info is None for r in caplog.records)
