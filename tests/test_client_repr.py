"""Results print compactly: scalars and short sequences in full, arrays as dtype and shape."""

from __future__ import annotations

import numpy as np

from tdb_client import LogitLensResult, RunResult, TokenProb


def test_arrays_print_as_dtype_and_shape_and_long_sequences_are_counted():
    top = np.zeros((4, 11, 5), dtype=np.float32)
    r = LogitLensResult(tokens=tuple("abcdefghijk"), sites=("embed", "blocks.0.resid_post"), positions=tuple(range(11)),
                        top_ids=top.astype(np.int64), top_logits=top, top_probs=top, top_tokens=top.astype(object),
                        target_values=np.array([1.0, 2.5]), target=None)
    text = repr(r)
    assert "<float32 array (4, 11, 5)>" in text and "<int64 array (4, 11, 5)>" in text
    assert "('a', 'b', 'c', … 11 in all)" in text and "array([1, 2.5])" in text
    assert len(text) < 600


def test_nested_results_stay_readable_and_equality_is_unchanged():
    probs = tuple(TokenProb(i, f" w{i}", 10.0 - i, 0.123456 / (i + 1)) for i in range(10))
    a = RunResult("r1", "exited", (probs,), None, "", ((1, 2, 3),), (3,), (), ())
    assert "TokenProb(token_id=0, text=' w0', logit=10, prob=0.1235)" in repr(a) and "… 10 in all" in repr(a)
    assert a == RunResult("r1", "exited", (probs,), None, "", ((1, 2, 3),), (3,), (), ())
