import numpy as np
import pytest

from keras_biasinject.layers.checks import check_index, check_positive_int, check_positive_number, describe
from keras_biasinject.layers.control import check_neutral
from keras_biasinject.layers.decay_feedback import DecayFeedback

HUGE = 10**999  # 1,000 digits: beyond the float range, so `float()` and `math.isfinite` raise OverflowError


@pytest.mark.parametrize("check, message", [
    (lambda v: check_positive_number(v, "alpha", "Owner"), r"Owner: `alpha` must be a positive number. Got alpha=an integer "
                                                           r"of 1,000 digits; give a finite value above zero"),
    (lambda v: check_positive_number(-v, "alpha", "Owner"), r"Got alpha=an integer of 1,000 digits"),
    (lambda v: check_neutral(v, 1, "Owner"), r"Owner: `neutral` must be finite.*Got neutral=an integer of 1,000 digits"),
    (lambda v: check_neutral([v, 0.0], 2, "Owner"), r"Owner: `neutral` must be finite.*Got neutral=\[1000000000.*\.\.\."),
    (lambda v: check_neutral(np.array([v, 0.0], dtype=object), 2, "Owner"), r"`neutral` must be finite"),
    (lambda v: DecayFeedback(control_dim=2, half_life=v), r"`half_life` must be one positive finite number or 2 of them.*"
                                                          r"Got half_life=an integer of 1,000 digits"),
    (lambda v: DecayFeedback(control_dim=2, half_life=[1.0, v]), r"`half_life` must be one positive finite number"),
    (lambda v: DecayFeedback(control_dim=1, half_life=1.0, max_norm=v), r"`max_norm` must be a positive number or None"),
    (lambda v: check_positive_int(-v * 10**4000, "rank", "Owner"), r"Got rank=an integer of about 5,000 digits"),
    (lambda v: check_index("x" * 500, "blocks", "Owner"), r"Got blocks='xxx+\.\.\.\.$"),
])
def test_huge_integers_raise_value_errors_that_say_how_big(check, message):
    with pytest.raises(ValueError, match=message):
        check(HUGE)


def test_describe_keeps_small_values_and_shortens_the_rest():
    assert [describe(v) for v in (3, -2.5, "up", [1, 2], None, True, np.int64(7))] == [
        "3", "-2.5", "'up'", "[1, 2]", "None", "True", repr(np.int64(7))]
    assert describe(10**19) == "10000000000000000000" and describe(-(10**20)) == "an integer of 21 digits"
    assert len(describe("x" * 500)) == 80
    assert check_positive_number(np.float32(2), "a", "O") == 2.0 and check_neutral(np.float32(1), 3, "O") == 1.0
    assert check_neutral(np.array([1, 2]), 2, "O") == [1.0, 2.0]
