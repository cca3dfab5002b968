"""YAML as users write it: PyYAML reads YAML 1.1, where `1e-5` and `3e-4` (no dot) are strings, not floats, so
`lr: 3e-4` in a config or a JSON config.json's `"rms_norm_eps": 1e-05` read as text. `load` reads them as
YAML 1.2 and JSON do: any decimal with an exponent is a float."""

from __future__ import annotations

import re

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load(text: str):
    """`yaml.safe_load`, except that exponent-only decimals (`1e-5`) are floats; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_file(path, error: type[Exception], *, where: str | None = None, missing: str = "no such file"):
    """The YAML (or JSON) document in `path`; a missing file or bad YAML raises `error` naming the file (as
    `where`, default the path), the line and column: `WHERE: no such file`, `WHERE: not valid YAML (line L,
    column C): ...`."""
    from pathlib import Path

    where = where or str(path)
    try:
        return load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{where}: {missing}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise error(f"{where}: not valid YAML{at}: {e}") from None
