"""TensorBoard scalar event files without TensorFlow.

An event file is a sequence of TFRecords, each framing one serialized
``tensorflow.Event`` protobuf::

  uint64 length (little endian)
  uint32 masked_crc32c(length bytes)
  bytes  data[length]
  uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32)`` for
``c = crc32c(x)`` (Castagnoli polynomial). The protobufs are hand-encoded:

  Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
               Summary summary = 5; SessionLog session_log = 7; }
  Summary    { repeated Value value = 1; }
  Value      { string tag = 1; float simple_value = 2; }
  SessionLog { SessionStatus status = 1; }   // START = 1

The first record of a file carries ``file_version = "brain.Event:2"``. A resumed
run writes ``SessionLog(status=START)`` at its first new step: TensorBoard then
drops the earlier records at that step and later (the steps the run repeats).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Iterator, Mapping


def _make_crc32c_table() -> list[int]:
  poly = 0x82F63B78  # reflected Castagnoli polynomial
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as used by TFRecord framing."""
  c = 0xFFFFFFFF
  for byte in data:
    c = _CRC_TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  if n < 0:
    n += 1 << 64  # int64 two's complement, as protobuf encodes negative ints
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


_SESSION_START = 1  # SessionLog.SessionStatus.START


def encode_event(*, wall_time: float, step: int, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None,
                 session_start: bool = False) -> bytes:
  """Serializes one ``Event`` protobuf (file version, scalar summaries or session start)."""
  out = _key(1, 1) + struct.pack("<d", float(wall_time)) + _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _len_delimited(3, file_version.encode())
  if session_start:
    out += _len_delimited(7, _key(1, 0) + _varint(_SESSION_START))
  if scalars:
    summary = b"".join(
        _len_delimited(1, _len_delimited(1, str(tag).encode())
                       + _key(2, 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _len_delimited(5, summary)
  return out


def frame_record(data: bytes) -> bytes:
  """Wraps ``data`` in a TFRecord frame (length, masked CRCs)."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


class SummaryWriter:
  """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``.

  Args:
    logdir: the folder for the event file (created if missing).
  """

  def __init__(self, logdir: str | os.PathLike):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(os.fspath(logdir), name)
    self._f = open(self.path, "ab")
    self._f.write(frame_record(encode_event(wall_time=time.time(), step=0,
                                            file_version="brain.Event:2")))
    self._f.flush()

  def session_start(self, step: int) -> None:
    """Marks a restart at ``step``: TensorBoard drops earlier records at steps >= ``step``."""
    self._f.write(frame_record(encode_event(wall_time=time.time(), step=step,
                                            session_start=True)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes one event holding the scalar ``values`` at ``step``."""
    self._f.write(frame_record(encode_event(wall_time=time.time(), step=step,
                                            scalars=values)))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    if not self._f.closed:
      self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = n = 0
  while True:
    b = buf[i]
    i += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    field, wt = key >> 3, key & 7
    if wt == 0:
      v, i = _read_varint(buf, i)
    elif wt == 1:
      v, i = buf[i:i + 8], i + 8
    elif wt == 5:
      v, i = buf[i:i + 4], i + 4
    elif wt == 2:
      n, i = _read_varint(buf, i)
      v, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wt}")
    yield field, wt, v


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields the payloads of a TFRecord file, checking both masked CRCs."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    if len(data) - i < 12:
      raise ValueError(f"{path}: truncated record header at byte {i}")
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[i + 8:i + 12])
    if crc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    payload = data[i + 12:i + 12 + n]
    if len(payload) != n or len(data) < i + 16 + n:
      raise ValueError(f"{path}: truncated record at byte {i}")
    (crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
    if crc != masked_crc32c(payload):
      raise ValueError(f"{path}: bad data CRC at byte {i}")
    yield payload
    i += 16 + n


def read_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
  """Parses an event file back into ``(step, tag, value)`` triples."""
  out = []
  for rec in read_records(path):
    step = 0
    summaries = []
    for field, _, v in _fields(rec):
      if field == 2:
        step = v if v < 1 << 63 else v - (1 << 64)
      elif field == 5:
        summaries.append(v)
    for summary in summaries:
      for f1, _, value_msg in _fields(summary):
        if f1 != 1:
          continue
        tag, val = None, None
        for f2, _, v in _fields(value_msg):
          if f2 == 1:
            tag = v.decode()
          elif f2 == 2:
            (val,) = struct.unpack("<f", v)
        if tag is not None and val is not None:
          out.append((step, tag, val))
  return out


def session_starts(path: str | os.PathLike) -> list[int]:
  """The steps of the ``SessionLog(status=START)`` records of an event file."""
  out = []
  for rec in read_records(path):
    step, start = 0, False
    for field, _, v in _fields(rec):
      if field == 2:
        step = v if v < 1 << 63 else v - (1 << 64)
      elif field == 7:
        start = any(f == 1 and x == _SESSION_START for f, _, x in _fields(v))
    if start:
      out.append(step)
  return out
