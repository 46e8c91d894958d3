"""The file export.py writes: a MindIR whose user_info carries ds2exp's entry (feature settings, labels,
input layout), and loading its graph back. Shared by export.py (which writes and checks it) and
transcribe (which runs it without ds2exp's model code)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

INFO_KEY = "ds2exp"  # the user_info entry of an exported MindIR


def write_export_info(proto, info: dict) -> None:
    """Store `info` as the ds2exp entry of a MindIR ModelProto's user_info (a map; MindSpore's generated
    module with the pure-Python protobuf runtime shows it as a list of key/value entries)."""
    text = json.dumps(info)
    try:
        proto.user_info[INFO_KEY] = text
    except TypeError:
        entry = proto.user_info.add()
        entry.key, entry.value = INFO_KEY, text


def read_export_info(path: str | Path) -> dict:
    """The ds2exp entry of an exported MindIR's user_info ({} when it has none)."""
    from mindspore.train.mind_ir_pb2 import ModelProto

    proto = ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    entries = proto.user_info
    text = entries.get(INFO_KEY) if hasattr(entries, "get") else next(
        (e.value for e in entries if e.key == INFO_KEY), None)
    return json.loads(text) if text else {}


def load_graph(path: str | Path, frames: Optional[int] = None):
    """An exported MindIR as a callable `(features (B, bins, T), lengths (B,)) -> (log_probs, output_lengths)`,
    compiled once for any batch size and any T (or T = `frames` for a fixed-length export)."""
    import mindspore as ms
    from mindspore import nn

    graph = nn.GraphCell(ms.load(str(path)))
    graph.set_inputs(ms.Tensor(shape=[None, None, frames], dtype=ms.float32), ms.Tensor(shape=[None], dtype=ms.int32))
    return graph
