"""The test oracle: the whole model in one onnxruntime session."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from crowdgraph.runtime import open_session, run_session

#: Largest absolute difference allowed against the oracle for fp32.
TOLERANCE = 1e-4


def oracle(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` (a ModelProto or a path) run whole."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return run_session(open_session(source), feeds)


def run_partitions(compiled, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the partitions one after another, feeding each its boundary tensors."""
    values = dict(feeds)
    for part in compiled.partitions:
        session = open_session(part.model_bytes)
        values.update(run_session(session, {name: values[name] for name in part.inputs}, part.outputs))
    return {name: values[name] for name in compiled.output_names}


def assert_matches(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    """Same output names; values equal within :data:`TOLERANCE` (exactly for non-floats)."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        if np.issubdtype(expected.dtype, np.floating):
            diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
            assert diff <= TOLERANCE, f"{name}: max abs diff {diff} > {TOLERANCE}"
        else:
            np.testing.assert_array_equal(actual, expected)
