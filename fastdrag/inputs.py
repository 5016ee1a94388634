"""Input checks that need more than a type test: the shape of `points`, prompt length, radii against the feature
map, and warnings that point at the caller's line.

    fastdrag.pairs_from_flat([[hx, hy], [tx, ty], ...])   # GoodDrag's points.json / DragBench's "points" shape
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings

import numpy as np

from .errors import ConfigError, InvalidInputError

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category=UserWarning) -> None:
    """warnings.warn attributed to the first frame outside fastdrag: the user's line that called the API, whichever
    path (fastdrag.edit, Editor.edit, make_request) led here. Python 3.12's skip_file_prefixes does the same."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def is_number(v) -> bool:
    """A real number as a coordinate: Python and numpy ints and floats, 0-d arrays and tensors of them; not a bool
    (True would be the coordinate 1) and not a string ("40" is text)."""
    if isinstance(v, (bool, np.bool_, str, bytes)):
        return False
    if isinstance(v, numbers.Real):
        return True
    dtype = getattr(v, "dtype", None)
    return getattr(v, "ndim", None) == 0 and dtype is not None and "bool" not in str(dtype)


def _is_xy(p) -> bool:
    try:
        return len(p) == 2 and all(is_number(v) for v in p)
    except TypeError:
        return False


def pairs_from_flat(points) -> list[tuple[tuple, tuple]]:
    """[[hx, hy], [tx, ty], [hx, hy], [tx, ty], ...] (handles and targets alternating, image pixels: GoodDrag's
    points.json, DragBench's meta_data["points"]) -> [((hx, hy), (tx, ty)), ...], the pairs fastdrag.edit takes.
    A dict with a "points" key (points.json as loaded) is read for that key."""
    if isinstance(points, dict):
        if "points" not in points:
            raise InvalidInputError(f"pairs_from_flat: a dict must hold a 'points' list, got keys {sorted(points)}")
        points = points["points"]
    if isinstance(points, (str, bytes)) or not hasattr(points, "__len__"):
        raise InvalidInputError(f"pairs_from_flat expects a list of [x, y] points, got {points!r:.80}")
    bad = [i for i, p in enumerate(points) if not _is_xy(p)]
    if bad:
        raise InvalidInputError(f"pairs_from_flat: point {bad[0]} must be an [x, y] pair of numbers, got "
                                f"{points[bad[0]]!r}")
    if len(points) % 2:
        raise InvalidInputError(f"pairs_from_flat: {len(points)} points is an odd count; handles and targets "
                                f"alternate, so the last handle has no target")
    xy = [tuple(p) for p in points]
    return list(zip(xy[0::2], xy[1::2]))


def _parse_drag_string(s: str):
    """'hx,hy:tx,ty[;...]' -> pairs, or None when it does not parse (only to suggest the list in a message)."""
    try:
        out = []
        for part in s.replace(" ", ";").split(";"):
            if part:
                h, t = part.split(":")
                out.append(tuple(tuple(float(v) for v in q.split(",", 1)) for q in (h, t)))
        return out if all(len(q) == 2 for pair in out for q in pair) and out else None
    except ValueError:
        return None


def points_list(points) -> list:
    """`points` as a list (a generator is read once), after refusing, with the expected form in the message, the
    shapes it is often given in by mistake: a string (the CLI's 'hx,hy:tx,ty'), strings as pairs, and the flat
    alternating list of the official datasets."""
    expected = "a list of ((hx, hy), (tx, ty)) pairs in image pixels, e.g. points=[((40, 60), (60, 60))]"
    if isinstance(points, (str, bytes)):
        parsed = _parse_drag_string(points) if isinstance(points, str) else None
        raise InvalidInputError(f"points must be {expected}, not the string {points!r}"
                                + (f"; did you mean points={parsed!r}?" if parsed else "")
                                + " (the 'hx,hy:tx,ty' text form is the command line's --drag)")
    try:
        items = list(points)
    except TypeError:
        raise InvalidInputError(f"points must be {expected}, got {type(points).__name__} {points!r:.60}") from None
    for i, pair in enumerate(items):
        if isinstance(pair, str):
            parsed = _parse_drag_string(pair)
            raise InvalidInputError(f"point pair {i} is the string {pair!r}; points must be {expected}"
                                    + (f" (here {parsed[0]!r})" if parsed and len(parsed) == 1 else ""))
    if items and all(_is_xy(p) for p in items):
        hint = (f"did you mean pairs ((hx, hy), (tx, ty))? fastdrag.pairs_from_flat(points) pairs them up: "
                f"{pairs_from_flat(items)!r:.120}" if len(items) % 2 == 0 else
                f"did you mean pairs ((hx, hy), (tx, ty))? ({len(items)} points is an odd count: a handle lacks its "
                f"target)")
        raise InvalidInputError(f"points is a flat list of {len(items)} (x, y) points (handles and targets "
                                f"alternating, as in GoodDrag's points.json), not pairs: {hint}")
    return items


def check_prompt_tokens(tokenizer, prompt: str, what: str = "prompt") -> None:
    """Warn when `prompt` is longer than the text encoder reads: the official code (and this one) truncates to
    model_max_length (77 for CLIP) tokens, start and end tokens included, silently."""
    limit = int(tokenizer.model_max_length)
    tokens = tokenizer.tokenize(prompt)
    n = len(tokens) + 2  # + start and end of text
    if n > limit:
        dropped = tokenizer.convert_tokens_to_string(tokens[limit - 2:]).strip()
        warn_user(f"{what} is {n} CLIP tokens (start and end tokens included), more than the {limit} the text "
                  f"encoder reads: the last {n - limit} are cut off, as in the official code, so {dropped!r:.80} has "
                  f"no effect. Shorten the {what} to keep it all")


RADII = {"r_m": "motion-supervision patch radius", "r_p": "point-tracking search radius",
         "r1": "motion-supervision patch radius", "r2": "point-tracking search radius"}


def check_radii(cfg, size_hw: tuple[int, int], sup_hw: tuple[int, int]) -> None:
    """A patch or search window of side 2r+1 must fit in the supervision feature map (half the image's
    resolution); a larger radius reads mostly outside the map."""
    sh, sw = sup_hw
    limit = (min(sh, sw) - 1) // 2
    for name, what in RADII.items():
        r = getattr(cfg, name, None)
        if r is not None and r > limit:
            raise ConfigError(f"{name}={r} ({what}, feature px) is too large for this {size_hw[1]}x{size_hw[0]} "
                              f"image: its window of 2*{name}+1 = {2 * r + 1} px must fit in the {sh}x{sw} feature "
                              f"map (half the image's resolution), so {name} can be at most {limit} here")


__all__ = ["pairs_from_flat", "warn_user", "points_list", "check_prompt_tokens", "check_radii", "is_number"]
