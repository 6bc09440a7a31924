"""The README's demo command runs (eager inner keeps it fast; timings are not asserted)."""
from duca_compile import demo


def test_demo_runs_and_reports(capsys):
    demo.main(["--steps", "6", "--layers", "2", "--repeats", "1", "--inner", "eager"])
    out = capsys.readouterr().out
    assert "step modes: F C A F C A" in out
    assert "speedup vs plain eager" in out and "tokens computed: " in out and "FLOPs: " in out


def test_demo_runs_other_methods(capsys):
    demo.main(["--method", "taylorseer", "--steps", "6", "--layers", "2", "--repeats", "1", "--inner", "eager"])
    assert "step modes: F F R R F R" in capsys.readouterr().out
