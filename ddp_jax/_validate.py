"""Argument checks shared by the factories: one wording for one mistake."""

from __future__ import annotations


def check_int(value, minimum: int, what: str, hint: str = "") -> int:
  """``value`` if it is an int (not a bool) ``>= minimum``, else a ``ValueError``:
  ``"{what} must be an int >= {minimum}{hint}, got {value!r}."``.

  Examples:
    >>> check_int(3, 1, "accumulate: k")
    3
    >>> check_int(True, 1, "accumulate: k")
    Traceback (most recent call last):
    ...
    ValueError: accumulate: k must be an int >= 1, got True.
  """
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{what} must be an int >= {minimum}{hint}, got {value!r}.")
  return value
