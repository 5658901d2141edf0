"""Integers in paths, queries and headers, spelt one way only.

Pydantic's lax mode reads `+1`, ` 1`, `1_0` (ten) and `1.0` as integers: a caller's typo
taken for another number instead of refused (from review). Text must be plain decimal digits.
In JSON bodies an integer is a JSON integer: their models use pydantic's StrictInt, which
refuses `"1_0"`, `true` and `2.0` alike.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


def _plain_decimal(value: object) -> object:
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise PydanticCustomError(
            "int_parsing", "a whole number in plain decimal digits (no sign, space or point)"
        )
    return value


PlainInt = Annotated[int, BeforeValidator(_plain_decimal)]
