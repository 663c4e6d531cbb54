"""JSON text from outside (request bodies, files a user brings), read so that every way it can
fail is a `json.JSONDecodeError` with a message a user can act on -- not a RecursionError, and
not the bare ValueError Python raises for an integer too long to convert.

    strict_json(body)                       request bodies: NaN and Infinity refused too
    strict_json(text, constants=True)       files whose NaN a later check names by its field
"""

from __future__ import annotations

import json
from typing import Any

MAX_DIGITS = 4300  # sys.get_int_max_str_digits()'s default: Python converts no longer integer


def strict_json(text: str | bytes, constants: bool = False) -> Any:
    """json.loads, strictly: an integer of more than MAX_DIGITS digits and nesting too deep for
    the parser are malformed input; so are NaN and Infinity unless `constants` (they are not
    JSON, and poison every number they reach). Not UTF-8: UnicodeDecodeError."""
    def refuse(constant: str) -> Any:
        raise json.JSONDecodeError(f"{constant} is not a JSON number; send finite numbers", constant, 0)

    def integer(digits: str) -> int:
        n = len(digits.lstrip("-"))
        if n > MAX_DIGITS:
            raise json.JSONDecodeError(f"a number of {n} digits is too long (at most {MAX_DIGITS})", "", 0)
        return int(digits)

    try:
        return json.loads(text, parse_int=integer, **({} if constants else {"parse_constant": refuse}))
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply (send at most a few hundred levels)", "", 0) from None
