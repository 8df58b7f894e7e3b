"""What the commands share: the atomic JSON write."""

import json
import os

import pytest

from blocksparse.commands.args import write_json


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"ppl": 1.5})
    assert json.loads(path.read_text()) == {"ppl": 1.5}
    with pytest.raises(TypeError):
        write_json(path, {"ppl": 2.0, "model": object()})  # fails halfway through
    assert json.loads(path.read_text()) == {"ppl": 1.5} and os.listdir(tmp_path) == ["result.json"]
