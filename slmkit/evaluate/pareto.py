"""Pareto fronts, budgets and the recommendation `slm select` makes.

A candidate is a dict of measured metrics (`bits_per_byte`, `bytes_on_disk`, `decode_tok_s_b1`, ...). Each
metric has a direction (lower or higher is better). Candidate a dominates b when it is at least as good on
every objective and strictly better on one; the Pareto front is the set nobody dominates.

A budget is a comma-separated list of constraints, `metric OP value[unit]`, e.g.
`bytes<=20MB,decode_ms<=5,bpb<=1.6`. Units: B, KB, MB, GB (decimal, as file managers show), KiB, MiB, GiB;
ms and s for times. Short names map to the measured fields (see `METRICS`). The recommendation is the best
candidate on the chosen quality objective among those inside the budget, ties broken by fewer bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


class BudgetError(ValueError):
    """A budget string that cannot be parsed; the message names the constraint."""


# short name -> (field in a candidate's measurements, better direction)
METRICS: dict[str, tuple[str, str]] = {
    "bytes": ("bytes_on_disk", "min"),
    "params": ("parameters", "min"),
    "nonzero": ("nonzero_parameters", "min"),
    "rss": ("peak_rss_bytes", "min"),
    "decode_ms": ("decode_ms_per_token", "min"),
    "ttft_ms": ("ttft_ms", "min"),
    "decode_tok_s": ("decode_tok_s_b1", "max"),
    "decode_tok_s_b8": ("decode_tok_s_b8", "max"),
    "bpb": ("bits_per_byte", "min"),
    "bits_per_byte": ("bits_per_byte", "min"),
    "ood_bpb": ("ood_bits_per_byte", "min"),
    "ood_bits_per_byte": ("ood_bits_per_byte", "min"),
    "perplexity": ("perplexity", "min"),
    "accuracy": ("accuracy", "max"),
    "next_line": ("next_line_acc", "max"),
    "parse_rate": ("parse_rate", "max"),
    "exec_pass_rate": ("exec_pass_rate", "max"),
}
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "ms": 1, "s": 1000, "%": 0.01}
_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|==)\s*([-+0-9.eE]+)\s*([a-zA-Z%]*)\s*$")


def direction(metric: str) -> str:
    """'min' or 'max' for a field or short name."""
    for short, (name, d) in METRICS.items():
        if metric in (short, name):
            return d
    raise BudgetError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")


def field_name(metric: str) -> str:
    return METRICS[metric][0] if metric in METRICS else metric


@dataclass(frozen=True)
class Constraint:
    metric: str  # field name in the measurements
    op: str
    value: float
    text: str

    def holds(self, row: dict) -> bool:
        v = row.get(self.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        return {"<=": v <= self.value, ">=": v >= self.value, "<": v < self.value, ">": v > self.value,
                "==": v == self.value}[self.op]


def parse_budget(text: str | None) -> list[Constraint]:
    if not text or not text.strip():
        return []
    out = []
    for part in text.split(","):
        m = _CONSTRAINT.match(part)
        if not m:
            raise BudgetError(f"budget constraint {part.strip()!r} is not `metric<=value[unit]` "
                              "(e.g. bytes<=20MB, decode_ms<=5, bpb<=1.6)")
        name, op, number, unit = m.groups()
        if name not in METRICS:
            raise BudgetError(f"budget constraint {part.strip()!r}: unknown metric {name!r}; "
                              f"known: {', '.join(sorted(METRICS))}")
        scale = _UNITS.get(unit.lower())
        if scale is None:
            raise BudgetError(f"budget constraint {part.strip()!r}: unknown unit {unit!r}; "
                              "use B/KB/MB/GB/KiB/MiB/GiB, ms/s or %")
        out.append(Constraint(METRICS[name][0], op, float(number) * scale, part.strip()))
    return out


def dominates(a: dict, b: dict, objectives: dict[str, str]) -> bool:
    better = False
    for metric, d in objectives.items():
        x, y = a[metric], b[metric]
        if d == "min":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[int]:
    """Indices of the rows no other row dominates on `objectives` ({field: 'min'|'max'}); rows missing a
    field are left out."""
    valid = [i for i, r in enumerate(rows) if all(_finite(r.get(m)) for m in objectives)]
    return [i for i in valid if not any(dominates(rows[j], rows[i], objectives) for j in valid if j != i)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


@dataclass
class Recommendation:
    index: int | None  # into the rows; None when nothing fits the budget
    feasible: list[int]
    reasons: list[str]


def recommend(rows: list[dict], budget: list[Constraint], objective: str = "bits_per_byte",
              names: list[str] | None = None) -> Recommendation:
    """The best row on `objective` among those inside `budget`, with a plain-words explanation."""
    names = names or [str(i) for i in range(len(rows))]
    objective = field_name(objective)
    d = direction(objective)
    feasible = [i for i, r in enumerate(rows) if all(c.holds(r) for c in budget) and _finite(r.get(objective))]

    def broken(r: dict) -> str:
        return ", ".join(c.text for c in budget if not c.holds(r))

    if not feasible:
        reasons = ["no candidate meets the budget; relax it or add stronger compression"]
        reasons += [f"{names[i]} breaks {broken(r)}" for i, r in enumerate(rows)]
        return Recommendation(None, [], reasons)
    sign = 1 if d == "min" else -1
    best = min(feasible, key=lambda i: (sign * rows[i][objective], rows[i].get("bytes_on_disk", 0)))
    inside = f"inside the budget ({', '.join(c.text for c in budget)})" if budget else "with no budget given"
    reasons = [f"{names[best]} has the {'lowest' if d == 'min' else 'highest'} {objective} "
               f"({rows[best][objective]:.5g}) of the {len(feasible)} candidates {inside}"]
    better = [i for i, r in enumerate(rows) if i not in feasible and _finite(r.get(objective))
              and sign * r[objective] < sign * rows[best][objective]]
    for i in better:
        reasons.append(f"{names[i]} scores better ({rows[i][objective]:.5g}) but breaks {broken(rows[i])}")
    return Recommendation(best, feasible, reasons)
