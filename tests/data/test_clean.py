import pytest

from slmkit.data import clean_text, luhn_valid, scrub_pii


def test_clean_text_normalises():
    assert clean_text("\ufeffa\r\nb\rc\x00\x00") == "a\nb\nc"
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("write to bob.smith+tag@example.co.uk today", "email", "write to <EMAIL> today"),
        ("call (555) 123-4567 now", "phone", "call <PHONE> now"),
        ("call 555-123-4567 now", "phone", "call <PHONE> now"),
        ("call +44 20 7946 0958 now", "phone", "call <PHONE> now"),
        ("host 192.168.1.20 up", "ip", "host <IP> up"),
        ("host 2001:db8::ff00:42:8329 up", "ip", "host <IP> up"),
        ("host fe80::1ff:fe23:4567:890a up", "ip", "host <IP> up"),
        ("card 4111 1111 1111 1111 ok", "card", "card <CARD> ok"),
        ("card 5500-0000-0000-0004 ok", "card", "card <CARD> ok"),
        ("card 378282246310005 ok", "card", "card <CARD> ok"),
        ("key sk-abcdefghijklmnopqrstuvwxyz123456 ok", "secret", "key <SECRET> ok"),
        ("id AKIAIOSFODNN7EXAMPLE ok", "secret", "id <SECRET> ok"),
        ("tok ghp_abcdefghijklmnopqrstuvwxyz0123456789 ok", "secret", "tok <SECRET> ok"),
        ("slack xoxb-123456789012-abcdefghijkl ok", "secret", "slack <SECRET> ok"),
        ('api_key = "d41d8cd98f00b204e9800998ecf8427e"', "secret", 'api_key = "<SECRET>"'),
        ('"password": "aB3dEf9hIjK2mNoP4qRsT6uVwX8yZ0aBcD"', "secret", '"password": "<SECRET>"'),
        ("AUTH_TOKEN=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg==", "secret", "AUTH_TOKEN=<SECRET>"),
    ],
)
def test_scrub_masks_each_kind(text, kind, expected):
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts[kind] == 1
    assert sum(counts.values()) == 1


@pytest.mark.parametrize(
    "text",
    [
        'version = "3.11.7"',
        "x = 1234567890",
        "n = 18446744073709551615",  # 2**64 - 1: 20 digits
        "big = 4111111111111112",  # fails Luhn
        'sha = "d41d8cd98f00b204e9800998ecf8427e"',  # hash not bound to a secret-like name
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",
        "y = x[1::2] + a[::3]; t = '12:30:45'",
        "z = w@self.weight",
        "@property\ndef f(self): return 2.5e+10",
        'key = "short"',
        "sort_key = functools.cmp_to_key(compare_version_strings_in_order)",
        "date 2024-01-15 and 10.5.3 and 1.2.3",
    ],
)
def test_scrub_leaves_ordinary_code_alone(text):
    out, counts = scrub_pii(text)
    assert out == text, counts
    assert sum(counts.values()) == 0


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
