"""The one exception type for user errors (bad input, missing prerequisites).

The CLI prints its message and exits with status 2, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""


def list_offenders(items, total: int | None = None, limit: int = 5) -> str:
    """Format the first few offenders and the total count for an error message."""
    items = list(items)
    total = len(items) if total is None else total
    shown = ", ".join(str(x) for x in items[:limit])
    more = f" (and {total - limit} more)" if total > limit else ""
    return f"{total} in all: {shown}{more}"
