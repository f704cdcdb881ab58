"""JSON encoding of arguments, results and event data.

Values are stored as JSON text. Pydantic models, dataclasses, dates and UUIDs are
encoded to their JSON form; on the way back a value is restored to the type its
function declares (a parameter's or a return annotation) when there is one.

Bytes are written as their base64 text, wherever they are (a value, a list's item, a
dataclass's field), and read back as bytes where the annotation says ``bytes``, at any
depth (:func:`restore`). A pydantic model writes its fields itself, by its own config:
bytes as UTF-8 text by default (bytes that are not UTF-8 are refused, naming the
config that writes them as base64), and it reads them back by the same config.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import inspect
import math
import os
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pydantic

from cantata.errors import PayloadTooLarge, SerializationError

#: The most JSON one value may take in any store (SQLite's practical bound).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: ``App(max_payload=...)``'s default: what NATS accepts in one message by default.
DEFAULT_MAX_PAYLOAD = 1_048_576


def _default(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (bytes, bytearray, memoryview)):
        # binary event data (CloudEvents data_base64) is kept as its base64 text
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def nonfinite_path(value: Any, path: str = "") -> str | None:
    """Where ``value`` holds a NaN or an infinity (``None`` if nowhere).

    orjson writes both as ``null``: the value would come back changed, silently.
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "the value")
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = enumerate(value)
    elif isinstance(value, pydantic.BaseModel):
        items = value.model_dump().items()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for key, item in items:
        found = nonfinite_path(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _json_key(key: Any) -> str:
    text: str = next(iter(orjson.loads(orjson.dumps({key: 0}, option=orjson.OPT_NON_STR_KEYS))))
    return text


def key_clash(value: Any, path: str = "") -> str | None:
    """What is wrong when two keys of one mapping in ``value`` are one key in JSON
    (``1`` and ``'1'``, ``True`` and ``'true'``): one of their values would be lost.
    ``None`` when no two are."""
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            seen: dict[str, Any] = {}
            for key in value:
                text = _json_key(key)
                if text in seen:
                    return (
                        f"has keys {seen[text]!r} and {key!r}{f' at {path}' if path else ''}"
                        f" that are the same key in JSON ({text!r}): one of their values "
                        "would be lost; use one key for each value (JSON keys are strings)"
                    )
                seen[text] = key
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for key, item in items:
        found = key_clash(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _agree(what: str, verb: str) -> str:
    """``verb`` (``is``, ``has``, ``holds``) agreeing with ``what``: the plural for the
    "arguments of ..." or "results of ..." of a call."""
    if not what.startswith(("arguments ", "results ")):
        return verb
    return {"is": "are", "has": "have"}.get(verb, verb.removesuffix("s"))


def dumps(value: Any, what: str = "value", *, limit: int | None = None) -> str:
    """Encode ``value`` as JSON text.

    Args:
        limit: the app's ``max_payload`` in bytes (``None``: only the store's bound).

    Raises:
        SerializationError: naming ``what`` and the offending type, or where it holds
            a NaN or an infinity (JSON has neither).
        PayloadTooLarge: the JSON is over ``limit`` (or the store's bound).
    """
    try:
        try:
            data = orjson.dumps(value, default=_default)
        except TypeError:  # (orjson.JSONEncodeError is one) a key that is not a str
            data = orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
            clash = key_clash(value)
            if clash is not None:
                raise SerializationError(f"{what} {_agree(what, 'has')}{clash[3:]}") from None
    except (TypeError, orjson.JSONEncodeError) as exc:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # a model's bytes field
            raise SerializationError(
                f"{what} {_agree(what, 'holds')} bytes that are not UTF-8 text in a pydantic "
                "model, which writes bytes as UTF-8 text unless told otherwise: give the model "
                "model_config = ConfigDict(ser_json_bytes='base64', "
                "val_json_bytes='base64'), or pass a dataclass (its bytes are kept as "
                "base64)"
            ) from None
        raise SerializationError(
            f"{what} {_agree(what, 'is')} not JSON-serialisable ({exc}); pass plain JSON "
            "values (dict, list, str, int, float, bool, None), pydantic models or dataclasses"
        ) from None
    # NaN and infinities come out as null: look for them only when a null was written.
    # (find, not ``in``: bytes' ``in`` first tries its operand as an int and makes, then
    # drops, a TypeError with its message: ~1.5 k instructions per call, docs/performance.md)
    if data.find(b"null") >= 0:
        where = nonfinite_path(value)
        if where is not None:
            raise SerializationError(
                f"{what} {_agree(what, 'holds')} a NaN or infinite number at {where}; JSON "
                "has neither: send None or a string such as 'NaN' instead"
            )
    if limit is not None and len(data) > limit:
        raise PayloadTooLarge(
            f"{what} {_agree(what, 'is')} {len(data)} bytes of JSON, over the app's "
            f"max_payload of {limit} bytes: pass a reference to data stored elsewhere, "
            "raise App(max_payload=...), or set App(offload_above=...) to keep large "
            "payloads in the store"
        )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"{what} {_agree(what, 'is')} {len(data)} bytes of JSON, over the store's "
            f"{MAX_PAYLOAD_BYTES} byte limit: store large payloads elsewhere and pass a reference"
        )
    return data.decode()


# The most JSON bytes a call's scalar arguments may take to skip the round trip in
# :func:`plain_args`: below every app's max_payload (>= 1024, app_options.py).
_PLAIN_ARGS_BYTES = 1024


def plain_args(args: tuple[Any, ...] | list[Any], what: str, *,
               limit: int | None = None) -> list[Any]:
    """``args`` as their JSON round trip gives them back (``loads(dumps(list(args)))``),
    with its errors; arguments that are all small plain scalars (ints in JSON's 64 bits,
    finite floats, bools, ``None``, short ASCII strings) are their own round trip, so
    they are returned as a list without encoding them."""
    size = 2
    for a in args:
        t = type(a)
        if t is int:
            if not -0x8000_0000_0000_0000 <= a <= 0xFFFF_FFFF_FFFF_FFFF:
                break
            size += 22
        elif t is str:
            if not a.isascii():
                break
            size += 6 * len(a) + 3  # every character escaped at worst (\u0001)
        elif t is float:
            if not math.isfinite(a):
                break
            size += 26
        elif a is None or t is bool:
            size += 6
        else:
            break
        if size > _PLAIN_ARGS_BYTES:
            break
    else:
        return list(args)
    return list(loads(dumps(list(args), what, limit=limit)))


#: What a stored event's data text starts with when the data is bytes (a CloudEvent's
#: ``data_base64``): the JSON string of their base64 text follows. JSON allows
#: whitespace before a value and :func:`dumps` never writes any, so no JSON value is
#: read as bytes, and a reader that does not know the mark gets the base64 text.
BYTES_MARK = "\t"


def dumps_event_data(data: Any, what: str) -> str:
    """An event's data as a store keeps it: :func:`dumps`, marked with
    :data:`BYTES_MARK` when it is bytes, so :func:`loads_event_data` gives bytes back."""
    text = dumps(data, what)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return BYTES_MARK + text
    return text


def loads_event_data(text: str | None) -> Any:
    """An event's data from the text :func:`dumps_event_data` made."""
    if text is not None and text.startswith(BYTES_MARK):
        encoded = loads(text)
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except ValueError:  # (binascii.Error) not written by dumps_event_data
                return encoded
        return encoded
    return loads(text)


def loads(text: str | bytes | None) -> Any:
    """Decode JSON text (``None`` stays ``None``)."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON ({exc})") from None


# Bytes are kept as their base64 text (``_default``): a ``bytes`` annotation reads it
# back as base64, not as the text's UTF-8 (which would give other bytes, silently).
_BYTES_BASE64 = pydantic.ConfigDict(val_json_bytes="base64")


@functools.lru_cache(maxsize=512)
def adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    """The pydantic adapter of a type, built once (building one costs far more than
    validating a value with it)."""
    try:
        return pydantic.TypeAdapter(annotation, config=_BYTES_BASE64)
    except pydantic.PydanticUserError:  # a model or dataclass: its own config rules
        return pydantic.TypeAdapter(annotation)


_NEEDS: dict[Any, bool] = {}  # annotation -> _needs_restoring (hashable ones, few per app)


def _needs_restoring(annotation: Any) -> bool:
    try:
        return _NEEDS[annotation]
    except (KeyError, TypeError):  # new, or unhashable
        pass
    needs = _needs_restoring_now(annotation)
    try:
        if len(_NEEDS) < 4096:
            _NEEDS[annotation] = needs
    except TypeError:
        pass
    return needs


def _needs_restoring_now(annotation: Any) -> bool:
    if annotation in (inspect.Parameter.empty, Any, None, type(None)):
        return False
    if annotation in (dict, list, str, int, float, bool):
        return False
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        return any(_needs_restoring(a) for a in typing.get_args(annotation))
    return True


def restore(value: Any, annotation: Any, what: str = "value") -> Any:
    """Turn decoded JSON back into ``annotation`` (pydantic models, dataclasses, dates)."""
    if not _needs_restoring(annotation):
        return value
    try:
        return validate(annotation, value)
    except pydantic.ValidationError as exc:
        raise SerializationError(f"{what} does not match its declared type: {exc}") from None
    except (TypeError, pydantic.PydanticSchemaGenerationError):
        return value


def validate(annotation: Any, value: Any) -> Any:
    """``value`` (decoded JSON) validated as ``annotation`` by pydantic, the base64
    text of bytes inside dataclasses read back as bytes first (pydantic would read it
    by the dataclass's config, as UTF-8: other bytes, silently).

    Raises:
        pydantic.ValidationError: ``value`` does not match ``annotation``.
    """
    if _bytes_in_dataclass(annotation):
        value = _bytes_back(value, annotation)
    return adapter(annotation).validate_python(value)


_IN_DATACLASS: dict[Any, bool] = {}  # annotation -> _bytes_in_dataclass (as _NEEDS)


def _bytes_in_dataclass(annotation: Any) -> bool:
    """Whether ``annotation`` reaches a field typed ``bytes`` of a dataclass (at any
    depth, not through a pydantic model, which reads its own fields)."""
    try:
        return _IN_DATACLASS[annotation]
    except (KeyError, TypeError):
        pass
    found = _reaches_bytes(annotation, in_dataclass=False, seen=set())
    try:
        if len(_IN_DATACLASS) < 4096:
            _IN_DATACLASS[annotation] = found
    except TypeError:
        pass
    return found


def _parts(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(origin, args)`` of an annotation, through ``Annotated[...]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _parts(args[0])
    return origin, args


def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field name -> annotation (resolved where it can be)."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # (a forward reference that does not resolve)
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _dataclass_of(annotation: Any) -> type | None:
    origin = typing.get_origin(annotation) or annotation
    if isinstance(origin, type) and dataclasses.is_dataclass(origin) and not issubclass(
            origin, pydantic.BaseModel):
        return origin
    return None


def _reaches_bytes(annotation: Any, *, in_dataclass: bool, seen: set[type]) -> bool:
    if annotation in (bytes, bytearray):
        return in_dataclass
    cls = _dataclass_of(annotation)
    if cls is not None:
        if cls in seen:  # (a dataclass that holds itself: looked at already)
            return False
        seen.add(cls)
        return any(_reaches_bytes(t, in_dataclass=True, seen=seen)
                   for t in _field_types(cls).values())
    _, args = _parts(annotation)
    return any(_reaches_bytes(a, in_dataclass=in_dataclass, seen=seen)
               for a in args if a is not Ellipsis)


def _bytes_back(value: Any, annotation: Any) -> Any:
    """``value`` with the base64 text of each ``bytes`` that ``annotation`` places in
    a dataclass decoded (what :func:`dumps` wrote); anything else as it is."""
    if annotation in (bytes, bytearray):
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError:  # (binascii.Error) not base64: pydantic says what is wrong
                return value
        return value
    cls = _dataclass_of(annotation)
    if cls is not None:
        if not isinstance(value, dict):
            return value
        fields = _field_types(cls)
        return {k: _bytes_back(v, fields[k]) if k in fields else v for k, v in value.items()}
    origin, args = _parts(annotation)
    if not args:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        # (with several options, which one a value is cannot be told here)
        return _bytes_back(value, options[0]) if len(options) == 1 else value
    if isinstance(value, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return [_bytes_back(v, a) for v, a in zip(value, args, strict=False)] + \
                value[len(args):]
        return [_bytes_back(v, args[0]) for v in value]
    if isinstance(value, dict) and len(args) == 2:
        return {k: _bytes_back(v, args[1]) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Signature:
    """The annotations needed to restore a function's arguments and result."""

    params: tuple[Any, ...]
    result: Any
    varargs: Any = inspect.Parameter.empty
    # No parameter needs restoring: the decoded JSON arguments are the call's as they are.
    plain: bool = dataclasses.field(init=False, repr=False, compare=False)
    # The result needs no restoring (see :meth:`restore_result`).
    plain_result: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = not _needs_restoring(self.varargs) and not any(
            _needs_restoring(a) for a in self.params)
        object.__setattr__(self, "plain", plain)
        object.__setattr__(self, "plain_result", not _needs_restoring(self.result))

    def restore_args(self, args: Sequence[Any], what: str) -> list[Any]:
        if self.plain:
            return list(args)
        out = []
        for i, value in enumerate(args):
            ann = self.params[i] if i < len(self.params) else self.varargs
            out.append(restore(value, ann, f"{what} argument {i + 1}"))
        return out

    def check_args(self, args: Sequence[Any], what: str, names: Sequence[str] = (),
                   limit: int | None = None, *, where: str = "",
                   outcome: str = "nothing was started") -> None:
        """Raise what the worker's :meth:`restore_args` would for ``args`` (Python
        values, as JSON turns them first), in one line naming the argument (``names``:
        the parameters') and each field that does not fit, after ``where`` (the call
        that gave them, if not a start) and ending with ``outcome``. Nothing is done for
        a ``plain`` signature (no parameter needs restoring).

        Raises:
            SerializationError: an argument is not JSON-serialisable or does not match
                its declared type.
        """
        if self.plain:
            return
        decoded = orjson.loads(dumps(list(args), f"arguments of {what}", limit=limit))
        found = self.mismatch(decoded)
        if found is not None:
            i, ann, exc = found
            name = f" ({names[i]})" if i < len(names) else ""
            raise SerializationError(
                f"{where}{what} argument {i + 1}{name} does not match its declared type "
                f"{type_name(ann)}: {one_line(exc)}; pass a value of that type "
                f"({outcome})")

    def mismatch(self, decoded: Sequence[Any]) -> tuple[int, Any, pydantic.ValidationError] | None:
        """The first of ``decoded`` (arguments as JSON gives them back) that
        :meth:`restore_args` would refuse: its index, its declared type and pydantic's
        error; ``None`` when they all fit."""
        for i, value in enumerate(decoded):
            ann = self.params[i] if i < len(self.params) else self.varargs
            if not _needs_restoring(ann):
                continue
            try:
                validate(ann, value)
            except pydantic.ValidationError as exc:
                return i, ann, exc
            except (TypeError, pydantic.PydanticSchemaGenerationError):
                continue  # (as restore: a type pydantic cannot check is passed as it is)
        return None


def type_name(annotation: Any) -> str:
    """How a type is named in a message: ``Order``, ``list[Order]``."""
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def one_line(exc: pydantic.ValidationError, shown: int = 3) -> str:
    """A validation error's problems in one line: each field's dotted path, pydantic's
    message and the value given (the first ``shown`` of them, then how many more)."""
    parts = []
    errors = exc.errors(include_url=False)
    for error in errors[:shown]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "the value"
        got = "" if error.get("type") == "missing" else \
            f" (got {_brief_repr(error.get('input'))})"
        parts.append(f"{where}: {error.get('msg', 'invalid')}{got}")
    if len(errors) > shown:
        parts.append(f"and {len(errors) - shown} more")
    return "; ".join(parts)


def _brief_repr(value: Any, most: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= most else text[:most - 3] + "..."


def signature_of(fn: Callable[..., Any], skip: int = 0) -> Signature:
    """Read the parameter and return annotations of ``fn``, skipping ``skip`` leading params."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Signature((), inspect.Parameter.empty)
    params = []
    varargs: Any = inspect.Parameter.empty
    for p in list(sig.parameters.values())[skip:]:
        if p.kind is p.VAR_POSITIONAL:
            varargs = hints.get(p.name, inspect.Parameter.empty)
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            params.append(hints.get(p.name, inspect.Parameter.empty))
    return Signature(tuple(params), hints.get("return", inspect.Parameter.empty), varargs)


def now_iso(ts: float) -> str:
    """RFC 3339 UTC timestamp for a POSIX time: what
    ``datetime.fromtimestamp(ts, UTC).isoformat()`` gives (``Z`` for ``+00:00``), its
    date and time of day made once per second (every event is stamped with one)."""
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)  # (as fromtimestamp rounds: half to even, the float's product)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    if not 0 <= us < 1_000_000 or not 0 <= whole < 253_402_300_800:  # (< 0, past 9999)
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")
    second = int(whole)
    cached = _iso_second
    if cached[0] != second:
        cached = _set_second(second)
    return f"{cached[1]}.{us:06d}Z" if us else f"{cached[1]}Z"


def _set_second(second: int) -> tuple[int, str]:
    global _iso_second
    _iso_second = (second, dt.datetime.fromtimestamp(second, dt.UTC).isoformat()[:-6])
    return _iso_second


_iso_second: tuple[int, str] = (-1, "")  # (a second, its date and time of day)


def new_id() -> str:
    """A new id: a UUID version 7 (RFC 9562) as 32 hex digits.

    Its first 48 bits are the Unix time in milliseconds, the next 12 the fraction of
    that millisecond (RFC 9562's method 3) and the other 62 are random, so ids made
    close in time sort close together: the rows of the runs in flight share a few index
    pages, and each group commit writes (and fsyncs) fewer pages. Ids made by one
    process strictly increase (a clock that stands still or steps back moves the
    fraction on by one), so two runs created in the same microsecond keep the order in
    which they were made where ties fall back to the id (a queue's FIFO order).
    """
    global _last_stamp
    ns = time.time_ns()
    stamp = (ns // 1_000_000) << 12 | (ns % 1_000_000) * 4096 // 1_000_000
    global _random, _random_at
    with _stamp_lock:
        if stamp <= _last_stamp:
            stamp = _last_stamp + 1
        _last_stamp = stamp
        at = _random_at
        if at >= _RANDOM_BYTES:
            _random, at = os.urandom(_RANDOM_BYTES), 0
        _random_at = at + 8
        rand = int.from_bytes(_random[at:at + 8], "big")
    value = (stamp >> 12 & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    # (f"{value:032x}" as bytes' hex: a third of its cost, the same 32 digits)
    return value.to_bytes(16, "big").hex()


_last_stamp = 0  # the (milliseconds << 12 | fraction) of the last id this process made
_stamp_lock = threading.Lock()
# The random bits of ids, read from the OS 4 KiB at a time (a system call per id, which
# also lets other threads take the GIL, showed in the chain's profile); a forked child
# reads its own, or it would make the ids its parent makes next.
_RANDOM_BYTES = 4096
_random = b""
_random_at = _RANDOM_BYTES


def _forget_random() -> None:
    global _random, _random_at
    _random, _random_at = b"", _RANDOM_BYTES


os.register_at_fork(after_in_child=_forget_random)
