"""Glue for scripts and campaign runners: flags <-> DistillConfig, and KdigError -> exit code 2.

Scripts start with ``cli.main(main)`` instead of ``absl.app.run(main)``, so a command line
absl cannot parse (an unknown flag, a bad value, a missing flagfile) is reported like every
other bad input: ``error: FlagError: <message>`` and exit code 2, not absl's usage dump.

Flags are only defined on the ``FlagValues`` a caller passes in (scripts pass absl's global
``FLAGS``; a campaign makes a fresh one per run), so importing the package defines no flag.
A campaign parses each run's flagfile and overrides with absl itself (``distill_config``),
exactly as ``scripts/distill.py`` would.
"""
import dataclasses
import sys

from absl import app, flags

from kdig_tf.errors import FlagError, InvalidArgumentError, KdigError

EXIT_BAD_INPUT = 2


def run(function, *args, **kwargs):
    """Call ``function``; on a KdigError print ``error: <Name>: <message>`` and exit 2."""
    try:
        return function(*args, **kwargs)
    except KdigError as err:
        message = str(err).splitlines()[0] if str(err) else ""
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv):
    """absl's ``flags_parser`` for :func:`main`: parse ``argv`` into ``FLAGS`` or raise FlagError."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err).strip().removeprefix("ERROR:: ")  # absl's prefix for an unreadable flagfile
        raise FlagError(message or type(err).__name__) from err


def main(main_fn, argv=None):
    """``absl.app.run(main_fn)``, with flag-parsing failures and KdigErrors as one line and exit 2."""
    run(app.run, main_fn, argv=argv, flags_parser=parse_flags)


WORKDIR_DEFAULT = "runs/distill"


def define_distill_flags(flag_values):
    """One flag per DistillConfig field (same name, type and default), plus --workdir."""
    from kdig_tf.pipeline import FIELD_HELP, DistillConfig

    flags.DEFINE_string("workdir", WORKDIR_DEFAULT, "Output directory of this run.", flag_values=flag_values)
    for field in dataclasses.fields(DistillConfig):
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}.get(
            field.type, flags.DEFINE_string)
        define(field.name, field.default, FIELD_HELP[field.name], flag_values=flag_values)


def config_from_flags(flag_values):
    from kdig_tf.pipeline import DistillConfig

    return DistillConfig(**{field.name: flag_values[field.name].value for field in dataclasses.fields(DistillConfig)})


def distill_config(args):
    """(DistillConfig, workdir) from distill.py arguments, e.g. ``["--flagfile=f.cfg", "--seed=1"]``."""
    flag_values = flags.FlagValues()
    define_distill_flags(flag_values)
    try:
        flag_values(["distill.py", *args])
    except flags.Error as err:
        raise InvalidArgumentError(f"bad distill arguments {args}: {err}") from err
    return config_from_flags(flag_values), flag_values["workdir"].value
