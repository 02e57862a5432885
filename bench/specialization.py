"""Instructions of resilient-db's hot path that the interpreter leaves generic.

    python -m bench.specialization [--db pg|sqlite] [--units N] [--pg-url URL]

CPython 3.11 rewrites an instruction for what it meets at run time (PEP 659): an
attribute load on an instance becomes one indexed read, a global load a cached
one. What it cannot specialize stays a generic lookup — dictionary probes through
the type and the instance, at every execution. On 3.11 that is, among others, an
attribute of a ``ContextVar`` (``_SCOPE.get``), a member read from an ``Enum``
class (``BreakerState.CLOSED``), any attribute of a class object
(``AsyncConnection.execute``), and an instance attribute that also exists on the
class (a class-level default). A guarded statement hit a dozen of those until
they were taken out: about a third of the instructions resilient-db added to
figure 1's unit (docs/performance.md).

This runs figure 1's unit (connect, ``SELECT 1``, release) through ``@resilient``
and ``ResilientEngine`` until the interpreter has specialized what it can, then
traces which instructions of ``resilient_db`` execute and lists those still in
their adaptive (generic) form, per unit. Loads whose target the interpreter cannot
specialize at all (a method of asyncio's C ``Task``, attributes of SQLAlchemy's own
objects) are expected; ``tests/test_hot_path.py`` keeps the list from growing.
Only meaningful on CPython 3.11 (3.12 specializes more, and names its forms
differently): elsewhere it says so and lists nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dis
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db
from bench._context import pg_url_from_env
from bench._harness import versions, write_json
from bench._variants import guarded_units
from bench.bytecodes import trace

Unit = Callable[[], Awaitable[Any]]

PACKAGE = str(Path(resilient_db.__file__).resolve().parent)
SUPPORTED = sys.version_info[:2] == (3, 11)
GENERIC_LOADS = ("LOAD_ATTR_ADAPTIVE", "LOAD_METHOD_ADAPTIVE", "LOAD_GLOBAL_ADAPTIVE")
"""The forms of an attribute or global load that failed to specialize (3.11 names)."""


async def generic_loads(unit: Unit, *, units: int, warmup: int) -> list[dict[str, Any]]:
    """The generic attribute and global loads ``resilient_db`` executes per run of
    ``unit`` (those run at least once every other unit), most frequent first."""
    for _ in range(warmup):  # let the interpreter specialize what it can
        await unit()
    executed: Counter[tuple[CodeType, int]] = Counter()

    def seen(frame: FrameType) -> None:
        executed[frame.f_code, frame.f_lasti] += 1

    await trace(unit, units, seen, keep=lambda frame: frame.f_code.co_filename.startswith(PACKAGE))
    # Tracing runs the plain instructions without touching the specialized ones, so
    # the code objects still show what the untraced runs made of them.
    found: list[dict[str, Any]] = []
    forms: dict[CodeType, dict[int, dis.Instruction]] = {}
    for (code, offset), count in executed.items():
        if code not in forms:
            forms[code] = {i.offset: i for i in dis.get_instructions(code, adaptive=True)}
        instruction = forms[code].get(offset)
        if instruction is None or instruction.opname not in GENERIC_LOADS:
            continue
        if count / units < 0.5:
            continue  # an occasional path (a refresh once a second, say)
        positions = instruction.positions
        found.append(
            {
                "file": Path(code.co_filename).name,
                "line": positions.lineno if positions is not None else None,
                "function": code.co_qualname,
                "op": instruction.opname,
                "name": str(instruction.argval),
                "per_unit": round(count / units, 2),
            }
        )
    return sorted(found, key=lambda load: (-load["per_unit"], load["file"], load["line"] or 0))


async def measure(url: str, *, units: int, warmup: int) -> dict[str, list[dict[str, Any]]]:
    engine = create_async_engine(url)
    try:
        return {
            name: await generic_loads(unit, units=units, warmup=warmup)
            for name, unit in guarded_units(engine).items()
        }
    finally:
        await engine.dispose()


def report(found: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for name, loads in found.items():
        total = sum(load["per_unit"] for load in loads)
        lines.append(f"{name}: {total:g} generic loads per unit")
        lines.extend(
            f"  {load['per_unit']:>5g}  {load['file']}:{load['line']} {load['function']}: "
            f"{load['op']} {load['name']}"
            for load in loads
        )
    return "\n".join(lines)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--db", choices=("pg", "sqlite"), default="pg")
    parser.add_argument("--units", type=int, default=20, help="units traced per variant")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server (as the tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (bench/results)")
    args = parser.parse_args(argv)
    if args.units < 1:
        parser.error("--units must be at least 1")
    found: dict[str, list[dict[str, Any]]] = {}
    if not SUPPORTED:
        print(f"Python {sys.version.split()[0]}: only CPython 3.11 is read; nothing listed")
    elif args.db == "pg":
        found = await measure(args.pg_url or pg_url_from_env(), units=args.units, warmup=1000)
    else:
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite+aiosqlite:///{directory}/specialization.db"
            found = await measure(url, units=args.units, warmup=1000)
    print(f"connect, SELECT 1, release ({args.db}), tracing off")
    print(report(found))
    out = None if args.out is None else Path(args.out)
    results = {
        "db": args.db,
        "units": args.units,
        "supported": SUPPORTED,
        "variants": found,
    }
    path = write_json("specialization", {"versions": versions("sqlalchemy"), **results}, out)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    asyncio.run(main())
