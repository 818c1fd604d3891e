"""Progress lines: the first update at once, then one per interval, done/total, tokens/s, ETA,
and a closing line; SILENT says nothing."""

import io

from megatron_mesh.progress import SILENT, ProgressLines, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_are_throttled_and_carry_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(prefix="[ppl]", interval=10.0, stream=out, clock=clock)
    lines.note("loading runs/demo/checkpoints")
    lines.start("demo on valid", total=100)
    clock.now += 2
    lines.update(10, tokens=4000)       # the first update: printed at once
    clock.now += 5
    lines.update(20, tokens=8000)       # 5 s later: within the interval, not printed
    clock.now += 6
    lines.update(50, tokens=20000)      # 11 s after the last line
    clock.now += 7
    lines.finish(100, tokens=40000)
    assert out.getvalue().splitlines() == [
        "[ppl] loading runs/demo/checkpoints",
        "[ppl] demo on valid: 10/100 documents (10%), 4,000 tokens, 2,000 tokens/s, 2s, ETA 18s",
        "[ppl] demo on valid: 50/100 documents (50%), 20,000 tokens, 1,538 tokens/s, 13s, ETA 13s",
        "[ppl] demo on valid: done, 100 documents, 40,000 tokens in 20s (2,000 tokens/s)",
    ]


def test_unknown_total_and_other_units():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(stream=out, clock=clock)
    lines.start("probe mesh", unit="samples")
    clock.now += 90
    lines.update(3)
    assert out.getvalue() == "probe mesh: 3 samples, 1m30s\n"  # no ETA without a total


def test_silent_reports_nothing(capsys):
    SILENT.note("x")
    SILENT.start("task", 3)
    SILENT.update(1, 10)
    SILENT.finish(3, 30)
    assert capsys.readouterr() == ("", "")


def test_duration():
    assert [duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
