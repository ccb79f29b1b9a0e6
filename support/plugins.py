"""Signals of one's own: a function in a file of the user's, loaded by `path/to/file.py:NAME` with
its optional `needs` and `rule`, and its values checked each time it runs. Whatever the file
does wrong is one line (UsageError) naming the signal; the signal table (in the script) decides
which needs and rules exist.

The rest may call: load_function, checked_values.
"""
import importlib.util
import math
import numbers
from pathlib import Path

from support import UsageError


def load_function(spec: str, flag: str, *, needs, rules, default_rule: str, taken, choices: str) -> tuple:
    """(name, function, needs, rule) of `path/to/file.py:NAME`: the file imported, NAME callable,
    NAME.needs a set of `needs` (none by default), NAME.rule one of `rules` (`default_rule` by
    default), NAME not `taken`. `choices`: what else the flag takes, for the error of a bare word."""
    path, _, name = spec.rpartition(":")
    if not path or not name.isidentifier():
        raise UsageError(f"{flag} {spec}: {choices}")
    if not Path(path).is_file():
        raise UsageError(f"{flag} {spec}: no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"signal_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: whatever it raises is reported in one line
        raise UsageError(f"{flag} {spec}: loading {path} raised {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if function is None:
        raise UsageError(f"{flag} {spec}: {path} defines no {name}")
    if not callable(function):
        raise UsageError(f"{flag} {spec}: {name} in {path} is not callable")
    wanted, rule = getattr(function, "needs", set()), getattr(function, "rule", default_rule)
    if isinstance(wanted, str) or not set(wanted) <= set(needs):
        raise UsageError(f"{flag} {spec}: {name}.needs must be a set of {', '.join(needs)}; got {wanted!r}")
    if rule not in rules:
        raise UsageError(f"{flag} {spec}: {name}.rule {rule!r} is none of {', '.join(rules)}")
    if taken(name):
        raise UsageError(f"{flag} {spec}: {name} is the name of a built-in signal or field; rename the function")
    return name, function, frozenset(wanted), rule


def checked_values(name: str, function, candidates: list[dict], where: str) -> list:
    """The function's values of the candidates: one finite number (ints and bools kept, other
    numbers as floats) or None each; a one-line error naming the signal and `where` when it
    raises or returns anything else."""
    try:
        values = list(function(candidates))
    except Exception as err:  # the user's function: whatever it raises is reported in one line
        raise UsageError(f"signal {name} {where}: raised {type(err).__name__}: {err}") from None
    if len(values) != len(candidates):
        raise UsageError(f"signal {name} {where}: returned {len(values)} values for {len(candidates)} candidates")
    for v in values:
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
            raise UsageError(f"signal {name} {where}: returned {v!r}; each value must be a finite number or None")
    return [v if v is None or isinstance(v, (bool, int)) else float(v) for v in values]
