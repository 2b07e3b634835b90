"""TokenBucket and TokenCharge: rate limits over a clock the test drives."""

from __future__ import annotations

import pytest

from router.auth import TokenBucket, TokenCharge
from router.v1 import inference_service_pb2 as ipb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_grants_a_minute_of_burst_then_tells_the_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)  # one per second
    assert [bucket.take() for _ in range(60)] == [0.0] * 60
    assert bucket.take() == pytest.approx(1.0)
    clock.now += 0.5
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0


def test_refill_never_exceeds_the_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(6, clock)
    clock.now += 3600
    assert bucket.take(6) == 0.0
    assert bucket.take(1) == pytest.approx(10.0)  # 6 a minute: 10 s for one


def test_a_refused_take_takes_nothing() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)
    assert bucket.take(61) > 0
    assert bucket.take(60) == 0.0


def test_debt_blocks_until_repaid() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)
    assert bucket.wait_for_positive() == 0.0
    bucket.debit(90)  # a response used more than was left: 30 in debt
    assert bucket.wait_for_positive() == pytest.approx(30.0, abs=1e-3)
    clock.now += 29.9
    assert bucket.wait_for_positive() > 0
    clock.now += 0.2
    assert bucket.wait_for_positive() == 0.0


def chunk(count: int) -> ipb.GenerateResponse:
    return ipb.GenerateResponse(chunk=ipb.Chunk(data=["{}"] * count, text="x"))


def end(prompt: int, completion: int) -> ipb.GenerateResponse:
    usage = ipb.Usage(prompt_tokens=prompt, completion_tokens=completion)
    return ipb.GenerateResponse(end=ipb.End(usage=usage))


def spent(bucket: TokenBucket) -> float:
    """Units taken from a 600-per-minute bucket (whose clock does not move)."""
    return 600 - bucket.level


@pytest.fixture
def bucket() -> TokenBucket:
    return TokenBucket(600, Clock())


def test_usage_replaces_the_chunk_estimate_and_is_charged_at_the_end(bucket: TokenBucket) -> None:
    charge = TokenCharge(bucket)
    charge.count(ipb.GenerateResponse(queued=ipb.Queued(position=1)))
    charge.count(chunk(3))
    charge.count(chunk(2))
    assert spent(bucket) == 0  # nothing charged while the stream runs
    charge.count(end(7, 5))
    assert spent(bucket) == pytest.approx(12)
    charge.settle()  # the call's end settles again: nothing twice
    assert spent(bucket) == pytest.approx(12)


def test_an_abandoned_stream_is_charged_its_chunks(bucket: TokenBucket) -> None:
    charge = TokenCharge(bucket)
    charge.count(chunk(4))
    charge.count(chunk(1))
    charge.settle()
    charge.settle()
    assert spent(bucket) == pytest.approx(5)


def test_an_end_without_usage_keeps_the_chunk_count(bucket: TokenBucket) -> None:
    charge = TokenCharge(bucket)
    charge.count(chunk(4))
    charge.count(end(0, 0))
    assert spent(bucket) == pytest.approx(4)


def test_embeddings_are_charged_their_prompt(bucket: TokenBucket) -> None:
    TokenCharge(bucket).count(ipb.EmbedResponse(usage=ipb.Usage(prompt_tokens=9)))
    assert spent(bucket) == pytest.approx(9)
