"""wireheaders.valid agrees with h11's own header checks, header by header."""

from __future__ import annotations

import h11
import pytest

from fleet.coordinator import wireheaders

CASES = [
    (b"content-type", b"application/json"),
    (b"x-request-id", b"fleet-0123abcd"),
    (b"x-empty", b""),
    (b"x-inner", b"a  b\tc"),
    (b"x-obs", "caf\u00e9".encode("latin-1")),
    (b"x-ctl", b"a\x01b"),  # h11 allows control characters other than NUL and blanks
    (b"bad name", b"v"),
    (b"", b"v"),
    (b"x-crlf", b"a\r\nInjected: yes"),
    (b"x-lf", b"a\nb"),
    (b"x-nul", b"a\x00b"),
    (b"x-lead", b" a"),
    (b"x-trail", b"a\t"),
    (b"x-vt", b"a\x0bb"),
]


def _h11_accepts(name: bytes, value: bytes) -> bool:
    try:
        h11.Response(status_code=200, headers=[(name, value)])
    except h11.LocalProtocolError:
        return False
    return True


@pytest.mark.parametrize(("name", "value"), CASES)
def test_one_header_as_h11_judges_it(name: bytes, value: bytes) -> None:
    assert wireheaders.valid([(name, value)]) is _h11_accepts(name, value)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_a_bad_header_among_good_ones_fails_the_list(name: bytes, value: bytes) -> None:
    headers = [(b"date", b"Mon, 07 Dec 2026 11:00:00 GMT"), (name, value), (b"server", b"fleet")]
    assert wireheaders.valid(headers) is _h11_accepts(name, value)


def test_no_headers_are_valid() -> None:
    assert wireheaders.valid([])
