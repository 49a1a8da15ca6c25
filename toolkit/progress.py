"""Progress bars that appear on a terminal and stay quiet otherwise."""

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, total=None, desc=None, unit="it", enabled=None):
    """Wrap an iterable (or make a manual bar) that is shown only when stderr is a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
