"""rosbag2 files (mcap or sqlite3) through the pure-Python ``rosbags`` library, no ROS install.

Messages are written from plain field dicts with rosbags' own type store and read back as raw
CDR bytes, which rclpy deserialises into its message classes for replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str          # e.g. "sensor_msgs/msg/Image"
    timestamp_ns: int
    fields: dict[str, Any]


def _build(msgtype: str, fields: dict[str, Any], stamp_ns: int) -> Any:
    """A rosbags message object from fields; nested header/stamp filled from the timestamp."""
    import numpy as np

    cls = TYPESTORE.types[msgtype]
    Time = TYPESTORE.types["builtin_interfaces/msg/Time"]
    Header = TYPESTORE.types["std_msgs/msg/Header"]
    values = dict(fields)
    if "header" in cls.__dataclass_fields__ and "header" not in values:
        values["header"] = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                                  frame_id=values.pop("frame_id", "camera"))
    if isinstance(values.get("data"), (bytes, bytearray)):
        values["data"] = np.frombuffer(values["data"], dtype=np.uint8)
    return cls(**values)


def write_bag(path: str | Path, messages: Iterable[BagMessage], storage: str = "mcap") -> Path:
    """Write messages (any order of topics; timestamps ascending) into a new rosbag2 folder."""
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGES)}")
    path = Path(path)
    connections: dict[str, Any] = {}
    with Writer(path, version=8, storage_plugin=STORAGES[storage]) as writer:
        for message in messages:
            if message.topic not in connections:
                connections[message.topic] = writer.add_connection(message.topic, message.msgtype,
                                                                   typestore=TYPESTORE)
            raw = TYPESTORE.serialize_cdr(_build(message.msgtype, message.fields, message.timestamp_ns),
                                          message.msgtype)
            writer.write(connections[message.topic], message.timestamp_ns, bytes(raw))
    return path


def read_bag(path: str | Path, topics: Iterable[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
    """(topic, msgtype, timestamp_ns, raw CDR) in recorded order, optionally only some topics."""
    wanted = set(topics) if topics else None
    with Reader(Path(path)) as reader:
        connections = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if wanted and not connections:
            present = sorted({c.topic for c in reader.connections})
            raise ValueError(f"none of the topics {sorted(wanted)} is in {path} (it has {present})")
        for connection, timestamp, raw in reader.messages(connections=connections):
            yield connection.topic, connection.msgtype, timestamp, bytes(raw)
