"""Tests for secure_fl.crypto.shamir."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl.crypto import PRIME, SHARE_SIZE, DeterministicRandom, Share, combine, split
from secure_fl.errors import (
    ConfigError,
    InconsistentSharesError,
    InsufficientSharesError,
)

SECRET = bytes(range(32))


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with fixed small-prime bases plus pseudo-random bases."""
    if n < 2:
        return False
    small = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    for q in small:
        if n % q == 0:
            return n == q
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    rng = random.Random(n)
    bases = small + [rng.randrange(2, n - 1) for _ in range(rounds)]
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_prime_is_smallest_prime_above_2_256() -> None:
    assert PRIME == 2**256 + 297
    assert _is_probable_prime(PRIME)
    # Miller-Rabin never calls a prime composite, so this proves there is no smaller one.
    assert not any(_is_probable_prime(2**256 + k) for k in range(1, 297))


def test_share_size() -> None:
    assert SHARE_SIZE == 37
    assert len(Share(1, PRIME - 1).to_bytes()) == SHARE_SIZE


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_threshold_subset_reconstructs(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(min_value=1, max_value=n), label="threshold")
    xs = data.draw(
        st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True), label="xs"
    )
    shares = split(secret, threshold=t, xs=xs)
    assert [s.x for s in shares] == xs
    subset = data.draw(st.permutations(shares), label="order")[: data.draw(st.integers(t, n))]
    assert combine(subset, threshold=t) == secret


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(min_value=2, max_value=10),
    data=st.data(),
)
def test_fewer_than_threshold_raises(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(min_value=2, max_value=n))
    shares = split(secret, threshold=t, xs=range(1, n + 1))
    k = data.draw(st.integers(0, t - 1))
    subset = data.draw(st.permutations(shares))[:k]
    with pytest.raises(InsufficientSharesError, match=f"got {k} distinct shares, need {t}"):
        combine(subset, threshold=t)


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(min_value=2, max_value=10),
    data=st.data(),
)
def test_modified_share_detected_with_extra_shares(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(min_value=1, max_value=n - 1))
    shares = split(secret, threshold=t, xs=range(1, n + 1))
    k = data.draw(st.integers(t + 1, n))
    subset = data.draw(st.permutations(shares))[:k]
    victim = data.draw(st.integers(0, k - 1))
    delta = data.draw(st.integers(1, PRIME - 1))
    subset[victim] = Share(subset[victim].x, (subset[victim].y + delta) % PRIME)
    with pytest.raises(InconsistentSharesError):
        combine(subset, threshold=t)


@given(x=st.integers(1, 2**32 - 1), y=st.integers(0, PRIME - 1))
def test_serialisation_round_trip(x: int, y: int) -> None:
    share = Share(x, y)
    data = share.to_bytes()
    assert len(data) == SHARE_SIZE
    assert data[:4] == x.to_bytes(4, "big")
    assert Share.from_bytes(data) == share


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(SHARE_SIZE - 1),
        bytes(SHARE_SIZE + 1),
        bytes(SHARE_SIZE),  # x = 0
        b"\x00\x00\x00\x01" + PRIME.to_bytes(33, "big"),  # y = PRIME
        b"\x00\x00\x00\x01" + (2**264 - 1).to_bytes(33, "big"),
        "x" * SHARE_SIZE,
    ],
)
def test_from_bytes_rejects_malformed(data: bytes) -> None:
    with pytest.raises(InconsistentSharesError, match="malformed share"):
        Share.from_bytes(data)


@pytest.mark.parametrize(("x", "y"), [(0, 1), (2**32, 1), (-1, 1), (1, -1), (1, PRIME), (True, 1)])
def test_share_constructor_validates(x: int, y: int) -> None:
    with pytest.raises(InconsistentSharesError):
        Share(x, y)


def test_repr_hides_y() -> None:
    share = split(SECRET, threshold=2, xs=[5, 6])[0]
    text = repr(share)
    assert "x=5" in text
    assert str(share.y) not in text
    assert hex(share.y)[2:] not in text


def test_duplicates_collapsed() -> None:
    shares = split(SECRET, threshold=3, xs=[1, 2, 3, 4])
    assert combine(shares[:3] + shares[:3], threshold=3) == SECRET
    with pytest.raises(InsufficientSharesError, match="got 2 distinct shares, need 3"):
        combine([shares[0], shares[1], shares[0], shares[1]], threshold=3)


def test_same_x_different_y_rejected() -> None:
    shares = split(SECRET, threshold=2, xs=[1, 2, 3])
    forged = Share(1, (shares[0].y + 1) % PRIME)
    with pytest.raises(InconsistentSharesError, match="x=1"):
        combine([shares[0], shares[1], forged], threshold=2)


def test_modified_share_at_threshold_gives_wrong_secret_not_error() -> None:
    """With exactly t shares nothing can be checked (documented limitation)."""
    shares = split(SECRET, threshold=3, xs=[1, 2, 3])
    bad = [shares[0], shares[1], Share(3, (shares[2].y + 1) % PRIME)]
    # The Lagrange coefficient of x=3 at 0 for xs (1, 2, 3) is (1*2)/((1-3)(2-3)) = 1.
    expected = (int.from_bytes(SECRET, "big") + 1).to_bytes(32, "big")
    assert combine(bad, threshold=3) == expected


def test_secret_out_of_range_detected() -> None:
    # f(X) = PRIME - 1 (constant) is not a 32-byte secret.
    shares = [Share(1, PRIME - 1), Share(2, PRIME - 1)]
    with pytest.raises(InconsistentSharesError, match="32-byte"):
        combine(shares, threshold=2)


def test_threshold_one_and_extremes() -> None:
    for secret in (bytes(32), b"\xff" * 32):
        shares = split(secret, threshold=1, xs=[2**32 - 1, 1])
        assert all(s.y == int.from_bytes(secret, "big") for s in shares)
        assert combine(shares[1:], threshold=1) == secret
        shares = split(secret, threshold=2, xs=[2**32 - 1, 1])
        assert combine(shares, threshold=2) == secret


def test_determinism_with_deterministic_random() -> None:
    a = split(SECRET, threshold=4, xs=range(1, 8), randbytes=DeterministicRandom(b"shamir"))
    b = split(SECRET, threshold=4, xs=range(1, 8), randbytes=DeterministicRandom(b"shamir"))
    c = split(SECRET, threshold=4, xs=range(1, 8), randbytes=DeterministicRandom(b"other"))
    assert a == b
    assert a != c
    assert combine(a[3:], threshold=4) == SECRET


def test_rejection_sampling_rejects_out_of_range_draws() -> None:
    """A randbytes stream whose first draws are >= PRIME must be skipped, not reduced."""
    draws = [
        b"\xff" * 33,  # masked to 2**257 - 1 >= PRIME: rejected
        PRIME.to_bytes(33, "big"),  # exactly PRIME: rejected
        (5).to_bytes(33, "big"),  # accepted: coefficient 5
    ]

    def scripted(n: int) -> bytes:
        assert n == 33
        return draws.pop(0)

    shares = split(bytes(31) + b"\x07", threshold=2, xs=[1, 2], randbytes=scripted)
    assert not draws
    assert [(s.x, s.y) for s in shares] == [(1, 12), (2, 17)]


def test_randbytes_wrong_length() -> None:
    with pytest.raises(ConfigError, match="randbytes"):
        split(SECRET, threshold=2, xs=[1, 2], randbytes=lambda n: bytes(n - 1))


def test_rejection_sampling_accepts_whole_field() -> None:
    """Draws in [2**256, PRIME) are valid field elements and must be kept (257-bit mask)."""
    coefficient = 2**256 + 5
    draws = [coefficient.to_bytes(33, "big")]
    shares = split(bytes(32), threshold=2, xs=[1, 2], randbytes=lambda n: draws.pop(0))
    assert shares == [Share(1, coefficient), Share(2, 2 * coefficient % PRIME)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 4}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"xs": []}, "xs"),
        ({"xs": [1, 2, 2]}, "xs"),
        ({"xs": [0, 1, 2]}, "xs"),
        ({"xs": [1, 2, 2**32]}, "xs"),
        ({"xs": [1, 2, "3"]}, "xs"),
        ({"secret": bytes(31)}, "secret"),
        ({"secret": bytes(33)}, "secret"),
        ({"secret": "a" * 32}, "secret"),
    ],
)
def test_split_validation(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"secret": SECRET, "threshold": 2, "xs": [1, 2, 3]}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        split(**args)  # type: ignore[arg-type]


def test_combine_validation() -> None:
    shares = split(SECRET, threshold=2, xs=[1, 2])
    with pytest.raises(ConfigError, match="threshold"):
        combine(shares, threshold=0)
    with pytest.raises(ConfigError, match="Share"):
        combine([*shares, (3, 4)], threshold=2)  # type: ignore[list-item]


def test_large_federation_round_trip() -> None:
    xs = list(range(1, 101))
    shares = split(SECRET, threshold=50, xs=xs)
    shares70 = split(SECRET, threshold=70, xs=xs)
    for i in range(20):
        assert combine(shares[i : i + 60], threshold=50) == SECRET
        assert combine(shares70[i : i + 75], threshold=70) == SECRET
