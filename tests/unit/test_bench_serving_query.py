"""bench/serving_query.py: a run too short to measure anything is refused before the world is built."""

from __future__ import annotations

import pytest

from bench import serving_query


@pytest.mark.parametrize("pairs", [0, serving_query.WARMUP])
def test_pairs_within_the_warm_up_are_refused_by_name_before_any_setup(tmp_path, pairs):
    # the first WARMUP pairs are not timed: with no more than that there is nothing to report (was an IndexError
    # from np.percentile of no latencies, after minutes of setup)
    with pytest.raises(ValueError, match=rf"--pairs must be more than the {serving_query.WARMUP} warm-up pairs, "
                                         rf"got {pairs}"):
        serving_query.run(tmp_path, pairs)
    assert list(tmp_path.iterdir()) == []  # nothing was built
