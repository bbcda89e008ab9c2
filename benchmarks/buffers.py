"""What a compiled graph keeps alive at its peak, read from Inductor's code: a diagnostic, not a
benchmark (prints, writes nothing).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 \\
        python -m benchmarks.diagnose --workload proxy --mode mst --seq 8192 --checkpointing
    python -m benchmarks.buffers /tmp/ind --unit 8192x256

The profiler names the op that made a tensor, but everything a compiled graph allocates is made
by one call ("## Call CompiledFxGraph ##"). This reads the graph's Python wrapper instead (each
file Inductor writes under its cache directory that defines `call(self, args)`; with a
directory, the backward graphs: those with a `tangents_` input) and follows every buffer from
its allocation (`empty_strided_cpu`/`_cuda`, an extern kernel's output) to its `del`, through
aliases (`reinterpret_tensor`) and reuses (`del x  # reuse`: the storage lives on under
another name). It prints the peak, and each storage alive there with its size, the line that
made it and the line that last names it; a storage whose last line is a reuse is dead but
held by Inductor for a later buffer. A model, not a measurement: the sizes of the graph's
inputs and of extern kernels' outputs come from Inductor's `assert_size_stride` lines (absent:
counted as 0), a subgraph's own buffers (mst's chunk calls) and a kernel's scratch are not
counted, and the allocator's view (benchmarks.diagnose --at-peak) is the measurement to check
it against.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re

ELEMENT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8,
                 "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
_ALLOCATE = re.compile(r"(\w+) = empty_strided_\w+\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
_ALIAS = re.compile(r"(\w+) = (?:reinterpret_tensor\()?(\w+)\b")
_ITEM = re.compile(r"(\w+) = (\w+)\[(\d+)\]$")
_DELETE = re.compile(r"del (\w+)\b")
_SIZE = re.compile(r"assert_size_stride\((\w+), \(([^)]*)\), \([^)]*\)(?:, '?torch\.(\w+))?")


@dataclasses.dataclass
class Storage:
    nbytes: int
    made: int  # line number in the call() body; -1: an input of the graph
    names: set[str]


@dataclasses.dataclass
class Peak:
    nbytes: int
    line: int
    alive: list[Storage]
    lines: list[str]

    def last_read(self, storage: Storage) -> int:
        """The last line that reads one of `storage`'s names (its `del`s and the reuses that
        hand it to another buffer aside)."""
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, storage.names)) + r")\b")
        hits = [i for i, text in enumerate(self.lines)
                if pattern.search(text) and not _DELETE.match(text) and "# reuse" not in text]
        return hits[-1] if hits else storage.made


def _numel(dims: str) -> int | None:
    try:
        return math.prod(int(d) for d in dims.split(",") if d.strip())
    except ValueError:  # a symbolic size
        return None


def peak_of(code: str) -> Peak:
    """The peak of the buffers of the `call(self, args)` in Inductor's wrapper `code`."""
    body = code[code.index("def call(self, args):"):]
    lines = [line.strip() for line in body.splitlines()]
    sizes = {}
    for name, dims, dtype in _SIZE.findall(code):
        numel = _numel(dims)
        if numel is not None:
            sizes[name] = numel * ELEMENT_BYTES.get(dtype or "float32", 4)
    storage_of: dict[str, Storage] = {}
    match = re.search(r"^\s*(.*) = args$", body, re.MULTILINE)
    for name in (match.group(1).split(", ") if match else []):
        storage_of[name] = Storage(sizes.get(name, 0), -1, {name})
    best = Peak(0, 0, [], lines)
    for number, line in enumerate(lines):
        for statement in (s.strip() for s in line.split(";")):
            _apply(statement, number, storage_of, sizes)
        alive = {id(s): s for s in storage_of.values()}.values()
        total = sum(s.nbytes for s in alive)
        if total > best.nbytes:  # a copy: the names change as the code goes on
            alive = [dataclasses.replace(s, names=set(s.names)) for s in alive]
            best = Peak(total, number, sorted(alive, key=lambda s: -s.nbytes), lines)
    return best


def _apply(statement: str, number: int, storage_of: dict[str, Storage],
           sizes: dict[str, int]) -> None:
    if m := _ALLOCATE.match(statement):
        name, dims, dtype = m.groups()
        numel = _numel(dims) or 0
        storage_of[name] = Storage(numel * ELEMENT_BYTES.get(dtype, 4), number, {name})
    elif (m := _ITEM.match(statement)) and m.group(2) not in storage_of:
        storage_of[m.group(1)] = Storage(sizes.get(m.group(1), 0), number, {m.group(1)})
    elif (m := _ALIAS.match(statement)) and m.group(2) in storage_of:
        storage = storage_of[m.group(2)]
        storage_of[m.group(1)] = storage
        storage.names.add(m.group(1))
    elif m := _DELETE.match(statement):
        storage = storage_of.pop(m.group(1), None)
        if storage is not None:
            storage.names.discard(m.group(1))


def report(path: pathlib.Path, unit: int) -> str:
    peak = peak_of(path.read_text())
    out = [(f"{path}: peak {peak.nbytes / unit:.1f} units ({peak.nbytes / 2**20:.0f} MB) at "
            f"line {peak.line}: {peak.lines[peak.line][:100]}")]
    for storage in peak.alive:
        if storage.nbytes < unit / 8:
            continue
        last = peak.last_read(storage)
        dead = " (dead: held for a later buffer)" if last < peak.line else ""
        made = (f"made {storage.made}: {peak.lines[storage.made][:60]}" if storage.made >= 0
                else "an input of the graph")
        out.append(f"  {storage.nbytes / unit:6.2f}  {','.join(sorted(storage.names)):24s} "
                   f"{made:70s} last read {last}{dead}")
    return "\n".join(out)


def _unit(text: str) -> int:
    """`8192x256` (fp32 elements) or a byte count."""
    if "x" in text:
        return 4 * math.prod(int(p) for p in text.split("x"))
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=pathlib.Path,
                        help="an output-code file, or Inductor's cache directory")
    parser.add_argument("--unit", default=str(2**20),
                        help="what one unit is: bytes, or a shape of fp32 elements (8192x256)")
    parser.add_argument("--all", action="store_true",
                        help="with a directory: every graph, not only the backward graphs")
    args = parser.parse_args(argv)
    files = [args.path] if args.path.is_file() else sorted(
        p for p in args.path.rglob("*.py")
        if "def call(self, args)" in (text := p.read_text(errors="replace"))
        and (args.all or "tangents_" in text))
    if not files:
        parser.error(f"no Inductor output code under {args.path}")
    for path in files:
        print(report(path, _unit(args.unit)))


if __name__ == "__main__":
    main()
