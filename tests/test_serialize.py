"""The one JSON policy (els_audit.serialize): NaN and infinities are null everywhere."""

import json
import math
from pathlib import Path

import numpy as np
import torch

from els_audit.checks import Check
from els_audit.serialize import dumps, json_float, json_safe
from els_audit.probes import OpInfo


def test_json_safe_converts_numpy_tuples_keys_and_non_finite():
    got = json_safe({"a": np.float32(1.5), "b": (np.int64(2), float("nan")), 3: np.array([1, 2]), "c": np.bool_(True),
                     "d": [float("inf"), -math.inf], "p": Path("x") / "y"})
    assert got == {"a": 1.5, "b": [2, None], "3": [1, 2], "c": True, "d": [None, None], "p": "x/y"}
    json.dumps(got, allow_nan=False)


def test_json_float_and_default_hook():
    assert json_float(np.float64(2.0)) == 2.0 and json_float(float("nan")) is None
    assert json_safe({"k": object}, default=lambda o: "OBJ") == {"k": "OBJ"}
    assert dumps({"x": float("inf")}) == '{\n  "x": null\n}\n'


def test_every_writer_uses_the_same_policy():
    # a check value, and an op parameter in a trace, that are not finite: both null (one policy)
    assert Check("c", "pass", float("nan"), float("inf"), "m").to_dict()["value"] is None
    assert Check("c", "pass", 1.0, float("inf"), "m").to_dict()["threshold"] is None
    op = OpInfo("conv", "x", params={"eps": float("inf"), "dtype": torch.float32, "kernel": (3, 3)})
    assert op.to_dict()["params"] == {"eps": None, "dtype": "torch.float32", "kernel": [3, 3]}
