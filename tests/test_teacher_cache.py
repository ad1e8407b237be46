"""The one teacher cache (thermokd/teacher_cache.py): an entry keyed by its spec, stored once, read back checked."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from thermokd import ThermoKDError
from thermokd.models import build_model
from thermokd.teacher_cache import TeacherEntry, cache_key, load_weights, save_weights


def test_an_entry_is_keyed_by_its_spec_and_reads_back_what_it_stored(tmp_path):
    spec = {"model": "mlp", "data": "abc"}
    entry = TeacherEntry(tmp_path, "teachers", spec)
    assert entry.folder == tmp_path / "teachers" / cache_key(spec) and len(entry.key) == 16
    assert cache_key({"data": "abc", "model": "mlp"}) == entry.key != cache_key({**spec, "data": "abd"})
    model = build_model("mlp", 3, in_channels=4, input_size=1, hidden=[5])
    assert not entry.exists()
    entry.store(model, {"test_acc": 0.5})
    other = build_model("mlp", 3, in_channels=4, input_size=1, hidden=[5])
    assert entry.load(other) == {"key": entry.key, "test_acc": 0.5}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_a_foreign_or_misfitting_entry_is_one_line_naming_what_to_do(tmp_path):
    entry = TeacherEntry(tmp_path, "teachers", {"model": "mlp"})
    entry.store(build_model("mlp", 3, in_channels=4, input_size=1, hidden=[5]), {})
    with pytest.raises(ThermoKDError, match="predicts 3 classes but the data has 4"):
        entry.load(build_model("mlp", 4, in_channels=4, input_size=1, hidden=[5]))
    with pytest.raises(ThermoKDError, match="does not fit model MLP: net.1.weight should be"):
        entry.load(build_model("mlp", 3, in_channels=4, input_size=1, hidden=[6]))
    entry.info_path.write_text(json.dumps({"key": "0ld"}))
    with pytest.raises(ThermoKDError, match="another teacher.*delete the cache entry"):
        entry.load(build_model("mlp", 3, in_channels=4, input_size=1, hidden=[5]))


def test_tied_weights_are_saved_once_and_restored_into_both(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_weights(model, tmp_path / "w.safetensors", key="k")
    other = Tied()
    load_weights(other, tmp_path / "w.safetensors", key="k")
    assert torch.equal(other.head.weight, model.embed.weight) and other.head.weight is other.embed.weight
    with pytest.raises(ThermoKDError, match="another input"):
        load_weights(other, tmp_path / "w.safetensors", key="other")
