"""Setting an op's launch shape for a timing run and putting the shipped one back
(``tuning_for_run``: a script's ``--matvec FIELD=VALUE`` overrides for the whole run).

Why a module of its own: the timing scripts (bench_decode_attention, bench_decode_linear,
bench_dp4a_matvec, bench_prefill_mass) and bench_gpu all change an op's module-level tuning
dataclass and must restore it however they end; bench_decode_attention imports bench_gpu, so the
helpers cannot live in either without a circular import.
"""
from __future__ import annotations

import contextlib
import dataclasses


def set_tuning(target, values) -> None:
    """Copy every field of the tuning dataclass ``values`` onto the op's module-level ``target``
    (the ops read their launch shape from there)."""
    for field, value in vars(values).items():
        setattr(target, field, value)


@contextlib.contextmanager
def kept_tuning(target):
    """Yields a copy of the op's module-level tuning ``target`` (its shipped launch shape) and puts
    it back on ``target`` when the block ends, however it ends: sweeps change ``target`` meanwhile."""
    shipped = dataclasses.replace(target)
    try:
        yield shipped
    finally:
        set_tuning(target, shipped)


def sweep(target, tunings: list, timed, errors) -> list[dict]:
    """Each launch shape of ``tunings`` copied onto the op's ``target`` in turn: its fields, the
    dict ``errors()`` returns and the µs ``timed()`` returns. The caller restores the tuning (``kept_tuning``)."""
    rows = []
    for tuning in tunings:
        set_tuning(target, tuning)
        rows.append({**vars(tuning), **errors(), "us": timed()})
    return rows


def overridden(tuning, assignments: list[str]):
    """A copy of ``tuning`` with ``FIELD=VALUE`` assignments applied, each value parsed as the
    field's current type (bool from true/false/1/0); an unknown field or bad value is a ValueError
    that names the fields."""
    fields = {f.name for f in dataclasses.fields(tuning)}
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{assignment!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        current = getattr(tuning, name)
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{assignment!r}: {name} takes true or false")
            changes[name] = text.lower() in ("true", "1")
        else:
            try:
                changes[name] = type(current)(text)
            except ValueError as exc:
                raise ValueError(f"{assignment!r}: {name} takes a {type(current).__name__}") from exc
    return dataclasses.replace(tuning, **changes)


@contextlib.contextmanager
def tuning_for_run(parser, target, assignments: list[str], flag: str = "--matvec"):
    """The op's module-level tuning ``target`` with the ``--matvec``-style ``FIELD=VALUE``
    ``assignments`` set for the block (a bad one is ``parser``'s error, naming ``flag``) and a copy
    of it yielded; the tuning from before put back however the block ends (tests call the scripts
    in-process)."""
    try:
        tuning = overridden(target, assignments)
    except ValueError as exc:
        parser.error(f"{flag} {exc}")
    with kept_tuning(target):
        set_tuning(target, tuning)
        yield dataclasses.replace(tuning)
