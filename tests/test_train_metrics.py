"""TensorBoard event files without TensorFlow, the JSONL log and the progress line."""

import json
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from qsf_jax.training import tensorboard as tb
from qsf_jax.training.metrics import MetricWriter, ProgressMeter, format_duration


def _event_class():
  """``tensorflow.Event`` built from its field numbers (event.proto, summary.proto)."""
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="qsf_test_event.proto", package="qsftest",
                                           syntax="proto3")
  v = fdp.message_type.add(name="Value")
  v.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  v.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
  s = fdp.message_type.add(name="Summary")
  s.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".qsftest.Value",
              label=F.LABEL_REPEATED)
  sl = fdp.message_type.add(name="SessionLog")
  sl.field.add(name="status", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)  # an enum
  e = fdp.message_type.add(name="Event")
  e.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  e.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  e.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  e.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".qsftest.Summary",
              label=F.LABEL_OPTIONAL)
  e.field.add(name="session_log", number=7, type=F.TYPE_MESSAGE,
              type_name=".qsftest.SessionLog", label=F.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("qsftest.Event"))


def test_crc32c_known_values():
  assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tb.crc32c(b"") == 0
  assert tb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vector
  c = tb.crc32c(b"abc")
  assert tb.masked_crc32c(b"abc") == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_event_encoding_matches_protobuf():
  Event = _event_class()
  ref = Event(wall_time=1.25, step=1234567)
  for tag, val in (("train/loss", 2.5), ("eval/ppl", -3.0)):
    item = ref.summary.value.add()
    item.tag, item.simple_value = tag, val
  ours = tb.encode_event(wall_time=1.25, step=1234567,
                         scalars={"train/loss": 2.5, "eval/ppl": -3.0})
  assert ours == ref.SerializeToString()
  ver = Event.FromString(tb.encode_event(wall_time=0.0, step=0, file_version="brain.Event:2"))
  assert ver.file_version == "brain.Event:2"
  start = Event(wall_time=2.0, step=16)
  start.session_log.status = 1  # SessionLog.START
  assert tb.encode_event(wall_time=2.0, step=16, session_start=True) == start.SerializeToString()


def test_summary_writer_file_parses_back(tmp_path):
  w = tb.SummaryWriter(tmp_path)
  w.scalars(1, {"loss": 3.0, "lr": 1e-3})
  w.scalars(7, {"loss": 2.0})
  w.close()
  assert "tfevents" in w.path
  recs = list(tb.read_records(w.path))
  assert len(recs) == 3
  Event = _event_class()
  events = [Event.FromString(r) for r in recs]
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value] == [
      (1, "loss", 3.0), (1, "lr", pytest.approx(1e-3)), (7, "loss", 2.0)]
  assert tb.read_scalars(w.path) == [(1, "loss", 3.0), (1, "lr", pytest.approx(1e-3)),
                                     (7, "loss", 2.0)]


def test_reader_detects_corruption(tmp_path):
  w = tb.SummaryWriter(tmp_path)
  w.scalars(1, {"loss": 3.0})
  w.close()
  data = bytearray(open(w.path, "rb").read())
  data[-6] ^= 0xFF  # flip a payload byte of the last record
  bad = tmp_path / "events.out.tfevents.bad"
  bad.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="CRC"):
    list(tb.read_records(bad))
  bad.write_bytes(bytes(data[:-3]))
  with pytest.raises(ValueError, match="truncated"):
    list(tb.read_records(bad))


def test_record_framing_layout():
  rec = tb.frame_record(b"hello")
  assert struct.unpack("<Q", rec[:8])[0] == 5
  assert struct.unpack("<I", rec[8:12])[0] == tb.masked_crc32c(rec[:8])
  assert rec[12:17] == b"hello"
  assert struct.unpack("<I", rec[17:])[0] == tb.masked_crc32c(b"hello")


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  w = MetricWriter(tmp_path)
  w.write(10, {"loss": 2.0, "tokens_per_s": float("nan")})
  w.write(10, {"val_loss": 1.5}, kind="eval")
  w.write_text(10, "Once upon a time")
  w.close()
  def strict(c):
    raise ValueError(f"non-JSON constant {c}")
  lines = [json.loads(x, parse_constant=strict)
           for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in lines] == [(10, "train"), (10, "eval"), (10, "sample")]
  assert lines[0]["loss"] == 2.0 and lines[1]["val_loss"] == 1.5
  assert lines[0]["tokens_per_s"] is None
  assert lines[2]["text"] == "Once upon a time"
  (event_file,) = (tmp_path / "tb").iterdir()
  assert tb.read_scalars(event_file) == [(10, "train/loss", 2.0), (10, "eval/val_loss", 1.5)]


def test_resumed_writer_drops_the_records_past_the_checkpoint(tmp_path):
  from qsf_jax.training.metrics import drop_records_after  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"
  lines = ['{"step": 1, "kind": "train"}', 'not a record', '{"step": 2, "kind": "eval"}',
           '{"step": 3, "kind": "train"}', '{"step": 2, "kind": "sample", "text": "x"}']
  path.write_text("\n".join(lines) + "\n")
  before = path.stat().st_mtime_ns
  assert drop_records_after(path, 3) == 0 and path.stat().st_mtime_ns == before  # untouched
  w = MetricWriter(tmp_path, resumed_from=2)
  w.write(3, {"loss": 0.5})
  w.close()
  kept = path.read_text().splitlines()
  assert kept[:4] == lines[:3] + [lines[4]] and json.loads(kept[4])["loss"] == 0.5
  (event_file,) = (tmp_path / "tb").iterdir()
  assert tb.session_starts(event_file) == [3] and tb.read_scalars(event_file) == [
      (3, "train/loss", 0.5)]
  path.write_text(lines[0] + "\n" + '{"step": 2, "ki')  # a torn last line
  assert drop_records_after(path, 5) == 1 and path.read_text() == lines[0] + "\n"
  path.write_text(lines[0] + "\n" + lines[2])  # a whole last record without its newline
  assert drop_records_after(path, 5) == 0 and path.read_text() == (
      lines[0] + "\n" + lines[2] + "\n")
  assert drop_records_after(tmp_path / "absent.jsonl", 0) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tb"]  # no temp file


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricWriter(tmp_path / "run", enabled=False)
  w.write(1, {"loss": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_progress_line_and_durations():
  assert format_duration(3725) == "1h02m"
  assert format_duration(185) == "3m05s"
  assert format_duration(12) == "12s"
  assert format_duration(float("nan")) == "?"
  m = ProgressMeter(total_steps=100, tokens_per_step=1000, start_step=0)
  line = m.line(1, 3.14159, 1e-3)
  assert line.startswith("step 1/100 | loss 3.1416 | lr 1.00e-03 |") and "eta ?" in line
  m.mark(1)
  m._t_time -= 2.0  # pretend 2 s elapsed for 10 steps: 5 steps/s, 5000 tok/s
  tps, eta = m.rates(11)
  assert tps == pytest.approx(5000, rel=0.05) and eta == pytest.approx(89 / 5, rel=0.05)
  assert eta * tps / 1000 == pytest.approx(89, rel=1e-9)  # steps left, at the same rate
  assert "5.0k tok/s" in m.line(11, 1.0, 1e-4)


def test_a_full_disk_names_the_metrics_file(tmp_path):
  # A file-size limit or a full disk gave a bare "[Errno 27] File too large" (from the
  # write, or again from the close in the loop's clean-up), naming no file.
  import errno  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"

  class Full(io.StringIO):
    name = str(path)

    def write(self, s):
      raise OSError(errno.EFBIG, "File too large")

  w = MetricWriter(tmp_path)
  w._jsonl.close()  # pylint: disable=protected-access
  w._jsonl = Full()  # pylint: disable=protected-access
  for write in (lambda: w.write(1, {"loss": 1.0}), lambda: w.write_text(1, "a sample")):
    with pytest.raises(OSError, match=f"cannot write {path} \\(File too large\\); training "
                       "stopped; .*resume from the last checkpoint"):
      write()
  w.close()


def test_a_write_error_other_than_a_full_disk_does_not_ask_for_space(tmp_path):
  # Freeing space mends ENOSPC, EDQUOT and EFBIG only; a permission or I/O error names
  # the file without that advice.
  import errno  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from qsf_jax.training.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"

  def failing(code, text):
    class Failing(io.StringIO):
      name = str(path)

      def write(self, s):
        raise OSError(code, text)
    return Failing()

  w = MetricWriter(tmp_path)
  w._jsonl.close()  # pylint: disable=protected-access
  w._jsonl = failing(errno.EIO, "Input/output error")  # pylint: disable=protected-access
  with pytest.raises(OSError, match=f"cannot write {path} \\(Input/output error\\); "
                     "training stopped; fix that and run") as info:
    w.write(1, {"loss": 1.0})
  assert "free space" not in str(info.value) and info.value.errno == errno.EIO
  w._jsonl = failing(errno.ENOSPC, "No space left on device")  # pylint: disable=protected-access
  with pytest.raises(OSError, match="; training stopped; free space and run"):
    w.write(1, {"loss": 1.0})
  w.close()
