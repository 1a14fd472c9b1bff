"""A small declarative engine for checkpoint conversion tables.

A table is a list of :class:`Rule` s. Each rule maps source names to target names written as
patterns with named placeholders, and says what happens to the tensors on the way::

    transpose("bert/encoder/layer_{i}/attention/self/query/kernel",
              "bert.encoder.layer.{i}.attention.self.query.weight")

``{name}`` matches one name component (no ``/`` or ``.``); ``{name:REGEX}`` matches ``REGEX``
(which may not contain ``}``), e.g. ``drop("{var:.+}/adam_m")``. Every placeholder of a rule's
sources must appear in each of its targets and vice versa, so every rule can be run backwards:
:func:`inverse` turns an import table into an export table (drop rules vanish).

A rule may read several sources and write several targets (``fn`` receives the source tensors in
order and returns the target tensors in order), which is how a fused QKV matrix is split or fused.

:func:`apply` is strict: a source key that no rule matches, or that two rules match, is an error
naming it -- nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")
_COMPONENT = r"[^/.]+"


def _compile(pattern: str) -> re.Pattern:
    parts, names, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        if m.group(1) in names:
            raise ValueError(f"placeholder {{{m.group(1)}}} appears twice in {pattern!r}")
        names.append(m.group(1))
        parts += [re.escape(pattern[pos:m.start()]), f"(?P<{m.group(1)}>{m.group(2) or _COMPONENT})"]
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts))


def _fill(pattern: str, bound: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: bound[m.group(1)], pattern)


def _names(pattern: str) -> set[str]:
    return {m.group(1) for m in _PLACEHOLDER.finditer(pattern)}


@dataclass(frozen=True)
class Rule:
    """``sources -> targets`` through ``fn``; ``inverse_fn`` undoes it. No targets means drop.

    Both functions take the tensors of one side in order and return those of the other side as a
    sequence. Build rules with :func:`copy`, :func:`transpose`, :func:`drop`, :func:`split`, :func:`fuse`.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    fn: Callable[..., Sequence[Any]] | None = None
    inverse_fn: Callable[..., Sequence[Any]] | None = None
    op: str = "copy"  # shown in error messages
    _regexes: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_regexes", tuple(_compile(s) for s in self.sources))
        if self.targets:
            names = _names(self.sources[0])
            for pattern in self.sources + self.targets:
                if _names(pattern) != names:
                    raise ValueError(f"rule {self}: every pattern needs the placeholders {sorted(names)}, "
                                     f"{pattern!r} has {sorted(_names(pattern))}")

    def match(self, key: str) -> dict[str, str] | None:
        """The placeholder values if ``key`` is one of this rule's sources, else None."""
        for regex in self._regexes:
            m = regex.fullmatch(key)
            if m:
                return m.groupdict()
        return None

    def __str__(self) -> str:
        src, dst = ", ".join(self.sources), ", ".join(self.targets)
        return f"{self.op}({src}{' -> ' + dst if dst else ''})"


def _transpose(x):
    if x.ndim != 2:
        raise ValueError(f"transpose expects a matrix, got shape {tuple(x.shape)}")
    return (x.T,)


def copy(source: str, target: str) -> Rule:
    """Renames ``source`` to ``target``; the tensor is passed through untouched."""
    return Rule((source,), (target,), lambda x: (x,), lambda x: (x,), "copy")


def transpose(source: str, target: str) -> Rule:
    """Renames and transposes a matrix (its own inverse), e.g. TF's (in, out) kernels."""
    return Rule((source,), (target,), _transpose, _transpose, "transpose")


def drop(source: str) -> Rule:
    """Declares ``source`` as known but unwanted (optimizer slots, step counters); never read."""
    return Rule((source,), (), op="drop")


def split(source: str, targets: Sequence[str], fn: Callable, inverse_fn: Callable) -> Rule:
    """One source into several targets, e.g. a fused QKV matrix.

    ``fn(x)`` returns the target tensors in order; ``inverse_fn(*parts)`` fuses them back.
    """
    return Rule((source,), tuple(targets), fn, lambda *xs: (inverse_fn(*xs),), "split")


def fuse(sources: Sequence[str], target: str, fn: Callable, inverse_fn: Callable) -> Rule:
    """Several sources into one target: ``fn(*xs)`` fuses, ``inverse_fn(x)`` returns the parts."""
    return Rule(tuple(sources), (target,), lambda *xs: (fn(*xs),), inverse_fn, "fuse")


_INVERSE_OP = {"split": "fuse", "fuse": "split"}


def inverse(table: Sequence[Rule]) -> list[Rule]:
    """The table that undoes ``table``: targets become sources; drop rules have no inverse."""
    return [Rule(r.targets, r.sources, r.inverse_fn, r.fn, _INVERSE_OP.get(r.op, r.op)) for r in table if r.targets]


def apply(table: Sequence[Rule], state: Mapping[str, Any]) -> dict[str, Any]:
    """Converts ``state`` (source name -> tensor) into a dict of target name -> tensor.

    Every key is matched first and every problem reported before any tensor is read, so a lazy
    mapping (such as a checkpoint reader) reads only the tensors that are kept.

    Args:
        table: the conversion rules.
        state: source tensors by name; any mapping (numpy arrays, torch tensors, a reader).

    Returns:
        The converted tensors, by target name.

    Raises:
        ValueError: keys that match no rule or several rules (all of them named), a rule whose
            other sources are missing, two rules writing one target, or a rule failing on its input.
    """
    plan, unknown, problems, done = [], [], [], set()
    for key in state:
        if key in done:
            continue
        hits = [(r, bound) for r in table if (bound := r.match(key)) is not None]
        if not hits:
            unknown.append(key)
            continue
        if len(hits) > 1:
            problems.append(f"{key!r} matches several rules: {'; '.join(str(r) for r, _ in hits)}")
            continue
        rule, bound = hits[0]
        keys = [_fill(s, bound) for s in rule.sources]
        missing = [k for k in keys if k not in state]
        if missing:
            problems.append(f"{key!r} needs {', '.join(map(repr, missing))} too ({rule}), which is missing")
        done.update(keys)
        plan.append((rule, keys, [_fill(t, bound) for t in rule.targets]))
    if unknown:
        problems.insert(0, f"{len(unknown)} key(s) match no rule of the conversion table (add a rule, or a drop "
                           "rule if they are not weights):\n  " + "\n  ".join(map(repr, unknown)))
    written = Counter(t for _, _, names in plan for t in names)
    duplicates = sorted(t for t, n in written.items() if n > 1)
    if duplicates:
        problems.append(f"several sources would write {', '.join(map(repr, duplicates))}")
    if problems:
        raise ValueError("cannot convert the checkpoint:\n" + "\n".join(problems))

    out = {}
    for rule, keys, names in plan:
        if not names:
            continue  # drop: the tensor is never read
        values = [state[k] for k in keys]  # outside the try: reader errors speak for themselves
        try:
            out.update(zip(names, rule.fn(*values), strict=True))  # strict: a split must fill every target
        except Exception as exc:
            raise ValueError(f"{rule} failed on {', '.join(map(repr, keys))}: {exc}") from exc
    return out
