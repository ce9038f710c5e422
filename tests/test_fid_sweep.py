"""The FID sweep end to end on the smoke preset (a tiny SD and a tiny SD3 model, each found and
loaded as a real one): the CLI, resume after a kill, clear errors, and the split over two real
processes."""

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from eval.errors import UserError
from eval.imagenet_classes import imagenet_classes
from eval.inception import inception_extractor
from eval.smoke import TINY_FAMILIES
from eval.worklist import make_arms, make_work_list, process_share

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fid_sweep.py"
SMALL = ["--preset", "smoke", "--classes", "18,207,417"]  # 3 arms x 3 classes x 2 images = 18 images per model


def load_cli():
    spec = importlib.util.spec_from_file_location("fid_sweep_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


def read_results(output: Path) -> list[dict]:
    return list(csv.DictReader((output / "results.csv").open()))


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pngs(folder: Path) -> list[Path]:
    return list((folder / "images").glob("*/*.png"))


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_smoke_preset_runs_end_to_end_from_the_command_line(tmp_path):
    out = tmp_path / "smoke"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--output", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith(("generating", "FID features")) for line in lines), lines  # no library noise
    warning = "These numbers only check that the machinery runs"
    assert done.stdout.count(warning) == 3 * 2  # per model: first, in the results, last
    assert warning in done.stdout.splitlines()[0] and warning in done.stdout.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["sd", "sd3", "smoke_reference"]
    expected = {  # family: (pipeline, guidance (the family's default), scheduler, attention processor)
        "sd": ("StableDiffusionPipeline", "7.5", "PNDMScheduler", "AttnProcessor2_0"),
        "sd3": ("StableDiffusion3Pipeline", "7.0", "FlowMatchEulerDiscreteScheduler", "JointAttnProcessor2_0"),
    }
    for family, (pipeline, guidance, scheduler, processor) in expected.items():
        folder = out / family
        assert f"{family}, {pipeline} from {folder / 'smoke_model'}: 64x64 pixels, 3 steps, guidance {guidance}" in (
            done.stdout
        )
        rows = read_results(folder)
        assert [r["arm"] for r in rows] == ["baseline", "tome_r0.5", "atc_average_r0.5"]
        for row in rows:
            assert math.isfinite(float(row["fid"])) and float(row["fid"]) > 0
            assert row["images"] == "12" and row["timed_images"] == "12" and float(row["seconds_per_image"]) > 0
            assert row["preset"].startswith("smoke") and row["reference_images"] == "30"
            assert "NOT Inception" in row["feature_extractor"]
            assert (row["family"], row["pipeline"], row["model"]) == (family, pipeline, str(folder / "smoke_model"))
            assert (row["steps"], row["guidance_scale"], row["resolution"]) == ("3", guidance, "64")
            assert row["scheduler"] == scheduler and processor in row["attention_processors"]
        markdown = (folder / "results.md").read_text()
        assert markdown.startswith(f"# FID sweep results: {family}, {pipeline} from ")
        assert "| r (%) | 100 | 50 |" in markdown and "only check that the machinery runs" in markdown
        assert (folder / "fid_vs_keep_rate.png").is_file()  # matplotlib is in the dev extra
        assert (folder / "image_grid.png").is_file()
        assert len(pngs(folder)) == 36
        assert len(pixels(folder / "images" / "baseline" / "0018_0.png")) == 64 * 64 * 3  # 64x64 RGB
    baseline, merged = (pixels(out / "sd3" / "images" / arm / "0018_0.png") for arm in ("baseline", "tome_r0.5"))
    assert baseline != merged  # the SD3 arms do merge


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    """Killed in the SD3 sweep, after the SD one finished: the rerun makes nothing again for SD and
    finishes SD3, and both equal an uninterrupted run's."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli.main(SMALL + ["--output", str(whole)]) == 0

    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *SMALL, "--output", str(resumed)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(pngs(resumed / "sd3")) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    made = len(pngs(resumed / "sd3"))
    assert 3 <= made < 18, f"the kill should land mid-sweep ({made} of 18 SD3 images)"
    assert (resumed / "sd" / "results.csv").exists() and not (resumed / "sd3" / "results.csv").exists()
    sd_images = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in pngs(resumed / "sd")}
    assert len(sd_images) == 18
    # What a kill during a write leaves: a temporary file; and a sidecar whose image was never written.
    last = resumed / "sd3" / "images" / "atc_average_r0.5"
    last.mkdir(parents=True, exist_ok=True)
    (last / ".0417_1.png.k1ll3d.tmp").write_bytes(b"half a PNG")
    (last / "0417_1.json").write_text('{"seconds": -1.0}')

    assert cli.main(SMALL + ["--output", str(resumed)]) == 0

    assert all((p.read_bytes(), p.stat().st_mtime_ns) == made for p, made in sd_images.items())  # not made again
    for family in TINY_FAMILIES:
        images_whole, images_resumed = files_under(whole / family / "images"), files_under(resumed / family / "images")
        names = sorted(name for name in images_whole if name.endswith(".png"))
        assert len(names) == 18 and not any(Path(n).name.startswith(".") for n in images_resumed)
        assert sorted(images_resumed) == sorted(images_whole)  # the same files, no duplicates, no partial files
        assert all(images_resumed[n] == images_whole[n] for n in names)  # byte-identical images
        for a, b in zip(read_results(whole / family), read_results(resumed / family), strict=True):
            assert (a["arm"], a["fid"], a["images"], a["timed_images"]) == (
                b["arm"],
                b["fid"],
                b["images"],
                b["timed_images"],
            )
    assert b'"seconds": -1.0' not in files_under(resumed / "sd3" / "images")["atc_average_r0.5/0417_1.json"]


def test_plan_reuse_arms_are_added_to_a_sweep_made_without_them(tmp_path):
    """A sweep from before the reuse options has the arms without reuse (same names, same images):
    adding --plan-every / --share-plans makes only the new arms, and results.csv records them."""
    out = tmp_path / "out"
    tiny = ["--preset", "smoke", "--methods", "tome", "--classes", "18,207", "--images-per-class", "1"]
    tiny += ["--output", str(out)]
    assert cli.main(tiny) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for family in TINY_FAMILIES for p in pngs(out / family)}
    assert sorted(p.parent.name for p in before if p.parent.parent.parent.name == "sd3") == [
        "baseline",
        "baseline",
        "tome_r0.5",
        "tome_r0.5",
    ]
    assert cli.main(tiny + ["--plan-every", "1,2", "--share-plans", "false,true"]) == 0
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == made for p, made in before.items())  # not made again
    for family in TINY_FAMILIES:
        rows = read_results(out / family)
        assert [(r["arm"], r["plan_every"], r["share_plans"]) for r in rows] == [
            ("baseline", "1", "False"),
            ("tome_r0.5", "1", "False"),
            ("tome_r0.5_shared", "1", "True"),
            ("tome_r0.5_every2", "2", "False"),
            ("tome_r0.5_shared_every2", "2", "True"),
        ]
        assert "| tome_shared_every2 |" in (out / family / "results.md").read_text()


def test_rerun_into_an_output_made_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    tiny = [
        "--preset",
        "smoke",
        "--methods",
        "none",
        "--classes",
        "18,207",
        "--images-per-class",
        "1",
        "--output",
        str(out),
    ]
    assert cli.main(tiny) == 0
    capsys.readouterr()
    assert cli.main(tiny + ["--steps", "2"]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'sd'} holds images made with other settings (steps: 3 there, 2 now)" in error
    assert "Traceback" not in error
    # Each model keeps its own settings: SD's default guidance is 7.5 (its sweep goes on), SD3's 7.0.
    made = {p: p.stat().st_mtime_ns for p in pngs(out / "sd")}
    assert cli.main(tiny + ["--guidance-scale", "7.5"]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'sd3'} holds images made with other settings (guidance_scale: 7.0 there, 7.5 now)" in error
    assert {p: p.stat().st_mtime_ns for p in pngs(out / "sd")} == made


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--imagenet-val is required"),
        (["--imagenet-val", "/nonexistent/val"], "--imagenet-val: no folder at /nonexistent/val"),
        (["--preset", "smoke", "--keep-rates", "half"], "--keep-rates 'half'"),
        (["--preset", "smoke", "--keep-rates", "0"], "r=0.0 is outside the allowed range"),
        (["--preset", "smoke", "--methods", "tome,magic"], "unknown method 'magic'"),
        (["--preset", "smoke", "--images-per-class", "11"], "--images-per-class 11"),
        (["--preset", "smoke", "--classes", "1000"], "--classes: '1000'"),
        (["--preset", "smoke", "--steps", "0"], "--steps 0"),
        (["--preset", "smoke", "--resolution", "0"], "--resolution 0: must be a positive number of pixels"),
        (["--preset", "smoke", "--resolution", "100"], "--resolution 100: must be a positive multiple of 8 for this"),
        (["--preset", "smoke", "--plan-every", "1,x"], "--plan-every '1,x': expected comma-separated whole numbers"),
        (["--preset", "smoke", "--plan-every", "0"], "--plan-every: 0 is not allowed"),
        (["--preset", "smoke", "--plan-every", "5,5"], "--plan-every: 5, 5 repeats a value"),
        (["--preset", "smoke", "--share-plans", "true,maybe"], "--share-plans 'true,maybe': expected"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(argv, message, tmp_path, capsys):
    assert cli.main(argv + ["--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error


def test_smoke_preset_refuses_the_full_protocol_flags(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "smoke", "--model", "x", "--inception-weights", "w.pth"])
    assert "--model, --inception-weights: not with --preset smoke" in capsys.readouterr().err


def test_missing_inception_weights_name_their_flag(monkeypatch):
    with pytest.raises(UserError, match="--inception-weights: no file at /nonexistent.pth.*--preset smoke"):
        inception_extractor(Path("/nonexistent.pth"))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(
        UserError, match='needs torch-fidelity and torchvision .*pip install -e ".\\[fidelity\\]".*--preset smoke'
    ):
        inception_extractor(None)


def test_full_protocol_stops_before_generating_when_inception_is_missing(tmp_path, capsys, monkeypatch):
    png = tmp_path / "one.png"
    Image.new("RGB", (4, 4)).save(png)
    for c in imagenet_classes():  # a complete (tiny) ImageNet validation tree, 5 images per class
        (tmp_path / "val" / c.wnid).mkdir(parents=True)
        for j in range(5):
            (tmp_path / "val" / c.wnid / f"{j}.png").write_bytes(png.read_bytes())
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    out = tmp_path / "out"
    assert cli.main(["--imagenet-val", str(tmp_path / "val"), "--output", str(out)]) == 2
    assert "error: FID with torchmetrics' Inception needs torch-fidelity" in capsys.readouterr().err
    assert not out.exists()  # no model loaded, nothing generated or recorded


def test_two_processes_split_the_work_and_each_image_is_made_once(tmp_path):
    out = tmp_path / "two"
    args = ["--preset", "smoke", "--methods", "tome", "--classes", "18,207,417"]
    done = subprocess.run(  # torchrun, as accelerate launch does it; --standalone: a free port on localhost
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            *args,
            "--output",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("process 1/2 makes 6") == len(TINY_FAMILIES)
    items = make_work_list(make_arms(["tome"], [0.5]), [18, 207, 417], 2)
    for family in TINY_FAMILIES:
        for process in range(2):
            expected = {f"{i.arm.name}/{i.stem}" for i in process_share(items, process, 2)}
            made = {
                f"{p.parent.name}/{p.stem}"
                for p in (out / family / "images").glob("*/*.json")
                if f'"process": "{process}/2"' in p.read_text()
            }
            assert made == expected
        assert [r["arm"] for r in read_results(out / family)] == ["baseline", "tome_r0.5"]
        assert read_results(out / family)[0]["num_processes"] == "2"
