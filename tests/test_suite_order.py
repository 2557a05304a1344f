"""The order the xdist workers run the test modules in (``conftest.module_order``)."""

import json
import pathlib

from conftest import module_order

TESTS = pathlib.Path(__file__).parent


def test_longest_module_first_and_unknown_modules_count_as_the_median():
  times = {"test_a": 1.0, "test_b": 30.0, "test_c": 5.0, "test_d": 5.0}
  assert module_order(["test_a", "test_b", "test_c", "test_d"], times) == [
      "test_b", "test_c", "test_d", "test_a"]
  # the median of (1, 5, 5, 30) is 5: ranked with the 5 s modules, ties by name
  assert module_order(["test_a", "test_b", "test_new", "test_c", "test_b"], times) == [
      "test_b", "test_c", "test_new", "test_a"]
  assert module_order(["test_x", "test_w"], {}) == ["test_w", "test_x"]


def test_every_test_module_has_a_time():
  """A new module needs its time (``--durations=0``, summed) in module_times.json,
  and a removed module loses its entry."""
  times = json.loads((TESTS / "module_times.json").read_text(encoding="utf-8"))
  modules = {p.stem for p in TESTS.glob("test_*.py")}
  assert set(times) == modules, (sorted(modules - set(times)), sorted(set(times) - modules))
  assert all(isinstance(t, (int, float)) and t >= 0 for t in times.values())
