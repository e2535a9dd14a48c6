"""The typed loop state: what state.json holds, and what it refuses."""

import json

import pytest

from dspy_p2o.jsonio import write_json
from dspy_p2o.loop_state import LoopState


def test_loop_state_round_trips_through_state_json(tmp_path):
    state = LoopState(epoch=1, phase="prompt", batch=3, rewards={"q1": [0.0, 1.0]}, templated={"q1": [True, False]},
                      assignments={"q1": [{"self": {"instruction": "z1"}}, {"self": {"instruction": "z2"}}]},
                      history=[{"epoch": 1, "step": 4}], checkpoint="ckpt/checkpoint-4", checkpoint_step=4,
                      hard_count=2, done=False)
    write_json(tmp_path / "state.json", state.to_json())
    assert LoopState.from_json(json.loads((tmp_path / "state.json").read_text())) == state


def test_loop_state_refuses_unknown_fields_and_phases():
    with pytest.raises(ValueError, match=r"unknown fields \['epochz'\]"):
        LoopState.from_json({"epoch": 0, "epochz": 1})
    with pytest.raises(ValueError, match="phase must be one of"):
        LoopState(phase="eval")


def test_loop_state_drops_retired_fields_so_older_runs_resume():
    assert LoopState.from_json({"epoch": 1, "sync_s": 0.5, "templated_stats": {}}) == LoopState(epoch=1)
