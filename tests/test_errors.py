"""The error tree drawn in app/core/errors.py's docstring is the tree of its classes: every class, its parent
and its HTTP status, no more and no fewer."""

from __future__ import annotations

import re

import app.core.errors as errors

LINE = re.compile(r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z]\w+)(?:\s+\((?P<group>[^)]*)\)|\s+(?P<status>\d{3})\b)?")


def drawn_tree() -> dict[str, tuple[str | None, int | None]]:
    """``{class: (parent, status or None)}`` from the docstring's drawing."""
    doc = errors.__doc__ or ""
    lines = doc.split("\n\n")[1].splitlines()  # the drawing is the docstring's second paragraph
    out: dict[str, tuple[str | None, int | None]] = {}
    stack: list[str] = []
    for line in lines:
        m = LINE.match(line)
        assert m, line
        depth = (len(m["lead"]) - 4) // 4  # "    TlserveError" is the root; each level adds "│   " or "├── "
        del stack[depth:]
        group = m["group"] or ""
        status = int(m["status"]) if m["status"] else (int(group) if group.isdigit() else None)
        out[m["name"]] = (stack[-1] if stack else None, status)
        stack.append(m["name"])
    return out


def test_the_docstring_tree_is_the_class_tree() -> None:
    classes = {c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TlserveError)}
    drawn = drawn_tree()
    assert sorted(drawn) == sorted(classes)
    for name, (parent, status) in drawn.items():
        cls = classes[name]
        assert (cls.__bases__[0].__name__ if parent else None) == parent, name
        if status is not None:
            assert cls.status_code == status, name


def test_the_parser_sees_a_wrong_drawing() -> None:
    """The check above can fail: a class drawn under the wrong parent is told apart."""
    drawn = drawn_tree()
    assert drawn["BadRequest"] == ("MalformedRequest", 400) and drawn["TlserveError"] == (None, None)
    assert drawn["AdminDisabled"][0] == "Forbidden" and drawn["Int8Mismatch"] == ("IncompatibleHead", 409)
    assert drawn["QueueFull"] == ("CapacityError", 503)
