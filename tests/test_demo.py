"""The README's demo command runs (eager inner keeps it fast; timings are not asserted)."""
from duca_compile import demo


def test_demo_runs_and_reports(capsys):
    demo.main(["--model", "tiny", "--steps", "6", "--layers", "2", "--repeats", "1", "--inner", "eager", "--out", ""])
    out = capsys.readouterr().out
    assert "step modes: F C A F C A" in out
    assert "speedup vs plain eager" in out and "tokens computed: " in out and "FLOPs: " in out
    assert "duca warm-up ..." in out and "plain eager warm-up ..." in out     # progress while it compiles


def test_demo_runs_other_methods(capsys):
    demo.main(["--model", "tiny", "--method", "taylorseer", "--steps", "6", "--layers", "2", "--repeats", "1",
               "--inner", "eager", "--out", ""])
    assert "step modes: F F R R F R" in capsys.readouterr().out


def test_demo_samples_the_trained_digits_model_and_writes_the_image(capsys, tmp_path):
    png = tmp_path / "demo.png"
    demo.main(["--steps", "6", "--repeats", "1", "--inner", "eager", "--out", str(png)])
    out = capsys.readouterr().out
    assert "digits DiT (trained)" in out and "PSNR" in out and png.stat().st_size > 1000


def test_demo_default_image_does_not_dirty_the_checkout():
    import pathlib

    default = demo.parser().get_default("out")
    ignored = (pathlib.Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert default in ignored
