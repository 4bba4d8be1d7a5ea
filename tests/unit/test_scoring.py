import numpy as np

from towerflow.tasks.build_examples import SeenItems, SequenceExamples, Vocab
from towerflow.tasks.scoring import remap_examples


def _vocab(item_ids, user_ids):
    return Vocab(np.array(item_ids), np.array(user_ids), [], [], [], [])


def test_remap_examples_goes_through_raw_ids_and_drops_unknown_items():
    src = _vocab([10, 20, 30], [1, 2])  # index: 10->1, 20->2, 30->3
    dst = _vocab([20, 30, 40], [2])  # the champion never saw item 10 or user 1: 20->1, 30->2
    seq = SequenceExamples(
        user_idx=np.array([1, 2]),
        hist_items=np.array([[0, 1, 2], [3, 2, 1]]),
        hist_actions=np.array([[0, 2, 3], [2, 2, 2]]),
        hist_gaps=np.array([[0, 5, 6], [1, 1, 1]]),
        context_items=np.array([0, 1]),
        surface=np.array([0, 1]),
        target_items=np.array([3, 1]),
        ts=np.array([100, 200]),
    )
    seen = SeenItems.from_lists([[1, 2], [3]])
    out, out_seen = remap_examples(seq, seen, src, dst)
    assert out.user_idx.tolist() == [0, 1]
    assert out.hist_items.tolist() == [[0, 0, 1], [2, 1, 0]]
    assert out.hist_actions.tolist() == [[0, 0, 3], [2, 2, 0]]  # padding where the item is gone
    assert out.hist_gaps.tolist() == [[0, 0, 6], [1, 1, 0]]
    assert out.context_items.tolist() == [0, 0]
    assert out.target_items.tolist() == [2, 0]  # item 10 is unknown to dst: an unreachable target
    assert [out_seen.row(0).tolist(), out_seen.row(1).tolist()] == [[1], [2]]
