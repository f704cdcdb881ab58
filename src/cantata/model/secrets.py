"""Masking secrets in everything Cantata prints: URLs, errors, logs, banners.

Two nets, because a password leaks in two shapes: inside a URL or DSN
(``postgresql://u:pw@host``, ``?password=pw``, ``password=pw`` in a libpq string),
and bare, when a driver quotes it in an error. :func:`mask` catches the first by
shape; every password seen in a URL given to Cantata is also remembered
(:func:`remember`), and :func:`mask` replaces it wherever it appears.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

MASK = "***"

_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@?#]*):(?P<pw>[^@\s/]*)@")
_PARAM = re.compile(
    r"(?P<head>(?:password|passwd|pwd|token|secret|sslpassword|auth_token)=)(?P<pw>[^&\s;'\"]+)",
    re.IGNORECASE,
)
_known: set[str] = set()


def remember(url: str) -> None:
    """Note the passwords in ``url`` so that :func:`mask` hides them anywhere."""
    if not isinstance(url, str):
        return
    for pattern in (_USERINFO, _PARAM):
        for m in pattern.finditer(url):
            pw = m.group("pw")
            if len(pw) >= 3:  # shorter would mask innocent text
                _known.add(pw)
                _known.add(unquote(pw))


def mask(text: str) -> str:
    """``text`` with every password replaced by ``***`` (URLs, DSNs, known secrets)."""
    if not isinstance(text, str):
        text = str(text)
    # Each pattern only where its literal part occurs: the searches cost ~5,000
    # instructions each on a step's error text, which every StepFailed's str() masks
    # (docs/performance.md, round twenty-six).
    out = text
    if "://" in out:
        out = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", out)
    if "=" in out:
        out = _PARAM.sub(lambda m: f"{m.group('head')}{MASK}", out)
    if _known:
        for secret in sorted(_known, key=len, reverse=True):
            if secret in out:
                out = out.replace(secret, MASK)
    return out


class MaskingFilter(logging.Filter):
    """A logging filter that masks secrets in each record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = mask(str(exc))
            if text != str(exc):
                # keep the type, drop the traceback frames' locals: only the text leaks
                record.exc_text = f"{type(exc).__name__}: {text}"
                record.exc_info = None
        return True


def install_log_masking(logger: logging.Logger | None = None) -> None:
    """Mask secrets in every record that reaches ``logger``'s handlers (root by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
