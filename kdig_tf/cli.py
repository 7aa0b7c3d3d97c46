"""Glue for scripts: turn a KdigError into a one-line message and exit code 2.

Flags are parsed only in ``scripts/``; this module holds no flags.
"""
import sys

from kdig_tf.errors import KdigError

EXIT_BAD_INPUT = 2


def run(function, *args, **kwargs):
    """Call ``function``; on a KdigError print ``error: <Name>: <message>`` and exit 2."""
    try:
        return function(*args, **kwargs)
    except KdigError as err:
        message = str(err).splitlines()[0] if str(err) else ""
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
