"""Write docs/api.md, the reference of every public name of kvarray, from the code's docstrings.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 when docs/api.md is not what this would write

Public names: the ``__all__`` of every kvarray module that has one, plus the classes and functions of the
modules in `EXTRA_MODULES` (user-facing modules without ``__all__``). Each object is documented once, in
the section of the module that defines it (or, when that module is not a section, the first section that
exports it); other sections list it as re-exported. A class is documented with its constructor's
signature, its docstring and its public methods and properties: those it defines, and those it inherits
from a kvarray class that is not documented itself (tests/test_docs.py checks that every one appears).
"""

from __future__ import annotations

import argparse
import ast
import enum
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
PACKAGE = ROOT / "kvarray"
#: Modules without ``__all__`` whose public classes and functions are part of the API.
EXTRA_MODULES = (
    "kvarray.spec",
    "kvarray.xp",
    "kvarray.views",
    "kvarray.interface",
    "kvarray.errors",
    "kvarray.encdec",
    "kvarray.attention",
    "kvarray.ops.reference",
)
#: Google-style docstring section headers, rendered as bold labels with their entries as a list.
DOC_SECTIONS = ("Args", "Arguments", "Attributes", "Returns", "Raises", "Yields")


def modules_with_all() -> list[str]:
    """Dotted names of the kvarray modules that assign ``__all__`` (read from the source, not imported)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        targets = [t for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
        targets += [node.target for node in tree.body if isinstance(node, ast.AnnAssign)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def section_modules() -> list[str]:
    """The sections of api.md in order: the packages first, then modules alphabetically."""
    names = sorted(set(modules_with_all()) | set(EXTRA_MODULES))
    packages = [n for n in ("kvarray", "kvarray.ops", "kvarray.ort", "kvarray.export") if n in names]
    return packages + [n for n in names if n not in packages]


def public_names(module: ModuleType) -> list[str]:
    """``__all__``, or the classes and functions the module defines whose names do not start with _."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    )


def kvarray_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "kvarray"


def members(cls: type) -> Iterator[tuple[str, type, Any]]:
    """``(name, defining class, attribute)`` of the public methods and properties of `cls`, in the order
    of the MRO's kvarray classes and their definitions."""
    seen: set[str] = set()
    for owner in cls.__mro__:
        if not kvarray_class(owner):
            continue
        for name, attr in vars(owner).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(attr, staticmethod | classmethod | property) or inspect.isfunction(attr):
                seen.add(name)
                yield name, owner, attr


class _Raw:
    """Shown verbatim in a signature (annotations are strings: ``from __future__ import annotations``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _shown_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _Raw(f"{type(value).__name__}.{value.name}")
    if callable(value) or " at 0x" in repr(value):
        return _Raw(getattr(value, "__name__", type(value).__name__))
    return value


def signature(obj: Any, drop_self: bool = False) -> str:
    """The call signature of `obj` as written in its source (string annotations verbatim)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = []
    for i, p in enumerate(sig.parameters.values()):
        if drop_self and i == 0 and p.name in ("self", "cls"):
            continue
        annotation = _Raw(p.annotation) if isinstance(p.annotation, str) else p.annotation
        default = p.default if p.default is inspect.Parameter.empty else _shown_default(p.default)
        params.append(p.replace(annotation=annotation, default=default))
    ret = sig.return_annotation
    ret = _Raw(ret) if isinstance(ret, str) else ret
    return str(sig.replace(parameters=params, return_annotation=ret))


def markdown_doc(doc: str) -> str:
    """A Google-style docstring as Markdown: section headers bold, their entries a list."""
    out: list[str] = []
    in_section = False
    for line in doc.splitlines():
        stripped = line.strip()
        if not line.startswith(" ") and stripped.endswith(":") and stripped[:-1] in DOC_SECTIONS:
            out += ["", f"**{stripped[:-1]}**", ""]
            in_section = True
            continue
        if in_section:
            if re.match(r"^ {4}\S", line):
                out.append(f"- {stripped}")
                continue
            if line.startswith("        ") and out and out[-1].startswith("- "):
                out[-1] += f" {stripped}"
                continue
            if stripped:  # unindented text ends the section
                in_section = False
                out.append("")
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out).strip()) + "\n"


def constant_line(name: str, value: Any) -> str:
    text = repr(value)
    shown = text if len(text) <= 90 and " at 0x" not in text else f"<{type(value).__name__}>"
    return f"`{name} = {shown}`\n"


@dataclass
class Entry:
    module: str
    name: str
    obj: Any


def key(name: str, obj: Any) -> Hashable:
    """What makes two exports one object: a class or function is one object wherever it is exported; a
    constant is its name and value (two modules' ``-1`` sentinels are not one entry)."""
    return id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) else (name, id(obj))


@functools.cache
def top_level_names(module: str) -> frozenset[str]:
    """Names a module's source assigns or defines at top level (not those it imports)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    names: set[str] = set()
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def documented(entries: list[Entry]) -> dict[Hashable, Entry]:
    """`key` -> the entry that documents it: the section of the module that defines it, else the first
    section that exports it."""
    groups: dict[Hashable, list[Entry]] = {}
    for e in entries:
        groups.setdefault(key(e.name, e.obj), []).append(e)
    home: dict[Hashable, Entry] = {}
    for k, group in groups.items():
        defined = getattr(group[0].obj, "__module__", None) if isinstance(k, int) else None
        home[k] = (
            next((e for e in group if e.module == defined), None)
            or next((e for e in group if e.name in top_level_names(e.module)), None)
            or group[0]
        )
    return home


def anchor(module: str, name: str) -> str:
    return f"{module}.{name}".replace(".", "").lower()


def render_class(e: Entry, home: dict[Hashable, Entry]) -> list[str]:
    cls = e.obj
    lines = [f'### <a id="{anchor(e.module, e.name)}"></a>`{e.name}`\n']
    if issubclass(cls, enum.Enum):
        values = ", ".join(f"`{m.name}` = {m.value!r}" for m in cls)
        lines.append(f"`class {e.name}` (enum: {values})\n")
    elif issubclass(cls, BaseException):
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        lines.append(f"`class {e.name}({bases})`\n")
    else:
        lines.append(f"`class {e.name}{signature(cls)}`\n")
    lines.append(markdown_doc(inspect.getdoc(cls) or "(no docstring)"))
    inherited: dict[str, list[str]] = {}
    for name, owner, attr in members(cls):
        if owner is not cls and id(owner) in home:  # documented with its own (public) class
            inherited.setdefault(owner.__name__, []).append(name)
            continue
        if isinstance(attr, property):
            title, doc = f"`{e.name}.{name}` (property)", inspect.getdoc(attr)
        else:
            func = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
            kind = "classmethod " if isinstance(attr, classmethod) else ""
            drop = not isinstance(attr, staticmethod)
            title, doc = f"`{kind}{e.name}.{name}{signature(func, drop_self=drop)}`", inspect.getdoc(func)
        lines.append(f"#### {title}\n")
        lines.append(markdown_doc(doc or "(no docstring)"))
    for base, names in inherited.items():
        home_entry = home[id(next(c for c in cls.__mro__ if c.__name__ == base))]
        listed = ", ".join(f"`{base}.{n}`" for n in names)
        lines.append(f"Inherited from [`{base}`](#{anchor(home_entry.module, base)}): {listed}.\n")
    return lines


def render(entries: list[Entry]) -> str:
    home = documented(entries)
    modules = list(dict.fromkeys(e.module for e in entries))
    out = [
        "# API reference\n",
        "<!-- Written by `python docs/gen_api.py` from the docstrings; tests/test_docs.py checks it is in "
        "sync. Do not edit by hand. -->\n",
        "Every public name of kvarray: the `__all__` of each module that has one, and the classes and "
        "functions of the user-facing modules without one. Each object is described once, in the module "
        "that defines it; packages list what they re-export. Shapes use the letters of "
        "[the docs index](index.md): N cells, H kv heads, D head_dim, T tokens of a pass, S sequences, "
        "L padded length, C = H * D, g values per int8 group.\n",
        "## Modules\n",
        *[f"- [`{m}`](#{m.replace('.', '')})" for m in modules],
        "",
    ]
    for module in modules:
        mod = importlib.import_module(module)
        summary = (inspect.getdoc(mod) or "").split("\n\n")[0].replace("\n", " ")
        out += [f'## <a id="{module.replace(".", "")}"></a>`{module}`\n', f"{summary}\n"]
        reexported = []
        for e in (e for e in entries if e.module == module):
            where = home[key(e.name, e.obj)]
            if where is not e:
                reexported.append(f"[`{e.name}`](#{anchor(where.module, where.name)})")
            elif inspect.isclass(e.obj):
                out += render_class(e, home)
            elif callable(e.obj):
                out += [
                    f'### <a id="{anchor(module, e.name)}"></a>`{e.name}{signature(e.obj)}`\n',
                    markdown_doc(inspect.getdoc(e.obj) or "(no docstring)"),
                ]
            else:
                heading = f'### <a id="{anchor(module, e.name)}"></a>`{e.name}`\n'
                out += [heading, constant_line(e.name, e.obj)]
        if reexported:
            out.append(f"Re-exported here: {', '.join(reexported)}.\n")
    return "\n".join(out).rstrip() + "\n"


def entries() -> list[Entry]:
    found = []
    for module in section_modules():
        mod = importlib.import_module(module)
        found += [Entry(module, name, getattr(mod, name)) for name in public_names(mod)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render(entries())
    if args.check:
        if not API.is_file() or API.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    API.write_text(text)
    print(f"wrote {API.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
