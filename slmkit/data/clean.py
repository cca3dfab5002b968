"""Text normalisation, exact de-duplication and PII scrubbing.

Cleaning is deliberately conservative: NFC, ``\\n`` line endings, no trailing NULs, no BOM. Nothing is
reflowed or stripped of whitespace, because code and its indentation are part of the domain.

PII scrubbing replaces what it finds with a mask token (``<EMAIL> <PHONE> <IP> <CARD> <SECRET>``).
Each detector is a regular expression for candidates plus, where the shape alone is ambiguous, a
validator: card numbers must pass the Luhn check, IPv6 candidates must parse and look like addresses
rather than slices (``x[1::2]``), phone numbers must have 8–15 digits, and an "assigned secret" must be
a long high-entropy value bound to a name like ``api_key``/``token``/``password``. The order matters:
secrets first (they contain digit runs), then e-mails (they contain dots and digits), then cards
before phones (a card has more digits than any phone).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import unicodedata
from collections import Counter

PII_KINDS = ("email", "phone", "ip", "card", "secret")
MASKS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "card": "<CARD>", "secret": "<SECRET>"}


def clean_text(text: str) -> str:
    """NFC-normalise, use ``\\n`` line endings, drop a leading BOM and trailing NULs."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    return text.rstrip("\x00")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Deduplicator:
    """Exact de-duplication by sha256 of the cleaned text (32 bytes kept per distinct document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.removed = 0

    def is_new(self, text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in self._seen:
            self.removed += 1
            return False
        self._seen.add(digest)
        return True


# --- secrets -------------------------------------------------------------------------------------

_TOKEN_CHARS = r"A-Za-z0-9+/_=\-"
_VENDOR_SECRET = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"  # OpenAI / Anthropic style
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[bpars]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r")(?![\w-])"
)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", re.S
)
# name = value / "name": "value" / name: value, where the name mentions a secret-like word.
_ASSIGNED = re.compile(
    r"(?P<name>\b[A-Za-z_][\w\-.]*)(?P<sep>[\"']?\s*(?::=|=|:)\s*[rbuRBU]?[\"']?)"
    rf"(?P<value>[{_TOKEN_CHARS}]{{32,}})(?![{_TOKEN_CHARS}])"
)
_SECRET_NAME = re.compile(r"key|token|secret|passw(?:or)?d|passwd|pwd|credential|auth", re.I)
_HEX = re.compile(r"[0-9a-fA-F]+")


def _entropy_bits_per_char(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(value: str) -> bool:
    """A long hex string with letters and digits, or a base64-ish string mixing cases and digits."""
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    if not (has_digit and has_alpha):
        return False
    if _HEX.fullmatch(value):
        return _entropy_bits_per_char(value) >= 3.0
    has_upper = any(c.isupper() for c in value)
    has_lower = any(c.islower() for c in value)
    return has_upper and has_lower and _entropy_bits_per_char(value) >= 3.5


# --- contact data and numbers --------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@(?!(?:self|cls)\.)(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w\-])"
)
# 13-19 digits: contiguous, or in groups of 4 (Visa/MC/Discover) or 4-6-5/4-6-4 (Amex/Diners).
_CARD = re.compile(
    r"(?<![\w.\-])(?:\d{13,19}|\d{4}(?:[ \-]\d{4}){2,3}(?:[ \-]\d{1,3})?|\d{4}[ \-]\d{6}[ \-]\d{4,5})"
    r"(?![\w\-]|\.\d)"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+.\-])(?:"
    r"\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,6}"  # international: +CC then groups
    r"|(?:1[ .\-]?)?\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}"  # (555) 123-4567
    r"|(?:1(?P<s0>[.\-]))?\d{3}(?P<s1>[.\-])\d{3}(?P=s1)\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w\-]|\.\d)"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_ok(match: re.Match) -> bool:
    digits = re.sub(r"[ \-]", "", match.group(0))
    # Major issuers start with 2-6; an arbitrary big integer constant rarely does *and* passes Luhn.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _ipv6_ok(match: re.Match) -> bool:
    text = match.group(0)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    groups = [g for g in text.split(":") if g]
    # Reject slice-like "1::2" / "a::b": a real address has 3+ colons or a full 4-digit group.
    return len(groups) >= 2 and (text.count(":") >= 3 or any(len(g) == 4 for g in groups))


def _phone_ok(match: re.Match) -> bool:
    n = sum(c.isdigit() for c in match.group(0))
    return 10 <= n <= 15 if not match.group(0).startswith("+") else 8 <= n <= 15


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Mask e-mails, phones, IPs, card numbers and secrets; return the text and counts per kind."""
    counts: Counter = Counter({k: 0 for k in PII_KINDS})
    if not text:
        return text, counts

    def sub(pattern: re.Pattern, kind: str, s: str, ok=None) -> str:
        def repl(m: re.Match) -> str:
            if ok is not None and not ok(m):
                return m.group(0)
            counts[kind] += 1
            return MASKS[kind]

        return pattern.sub(repl, s)

    def assigned(m: re.Match) -> str:
        if _SECRET_NAME.search(m.group("name")) and _looks_random(m.group("value")):
            counts["secret"] += 1
            return m.group("name") + m.group("sep") + MASKS["secret"]
        return m.group(0)

    text = sub(_PEM_PRIVATE_KEY, "secret", text)
    text = sub(_VENDOR_SECRET, "secret", text)
    text = _ASSIGNED.sub(assigned, text)
    text = sub(_EMAIL, "email", text)
    text = sub(_CARD, "card", text, _card_ok)
    text = sub(_IPV4, "ip", text)
    text = sub(_IPV6, "ip", text, _ipv6_ok)
    text = sub(_PHONE, "phone", text, _phone_ok)
    return text, counts
