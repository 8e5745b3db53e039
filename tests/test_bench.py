"""The benchmark runs end to end and reports what it claims; no timing targets here."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench, common


def test_bench_pairs_every_repeat_and_breaks_the_step_into_kernels(tmp_path):
    output, markdown, readme = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{common.README_START}\nold numbers\n{common.README_END}\n\nAfter.\n")
    assert bench.main(["--examples", "512", "--batch-size", "64", "--repeats", "2", "--kernels",
                       "--output", str(output), "--markdown", str(markdown), "--doc", str(readme)]) == 0
    results = json.loads(output.read_text())

    training = results["training"]
    assert training["plain_keras"]["repeats"] == training["package"]["repeats"] == 2
    pairs, package, plain = training["pair_ratios"], training["package"], training["plain_keras"]
    assert pairs["repeats"] == 2
    # Each pair's ratio is the package's rate over plain Keras's in the same
    # repeat: whichever way the repeats pair up, the product of the two ratios
    # is the product of the package's rates over that of plain Keras's; the
    # ratio reported is their median, the mean of two.
    assert pairs["min"] * pairs["max"] == pytest.approx(package["min"] * package["max"] / (plain["min"] * plain["max"]))
    assert training["ratio"] == pytest.approx((pairs["min"] + pairs["max"]) / 2)
    assert results["evaluation"]["pair_ratios"]["repeats"] == 2

    kernels = results["kernels"]
    assert kernels["batch_size"] == 64
    rows = kernels["kernels"]
    convolutions = [name for name in rows if name.startswith("conv")]
    assert len(convolutions) == 5
    assert all(row["us"] > 0 for row in rows.values())
    assert all(rows[name]["gflop_per_s"] > 0 for name in convolutions)
    # Shares and the ceiling are the timings' ratios that the table claims
    # (how they compare with 1 on a tiny step is the machine's noise, not a property).
    for name, row in rows.items():
        assert row["share_of_step"] == pytest.approx(row["us"] / kernels["step_us"]), name
    assert kernels["convolutions_us"] == pytest.approx(sum(rows[name]["us"] for name in convolutions))
    assert kernels["ceiling_with_these_convolutions"] == pytest.approx(kernels["step_us"] / kernels["convolutions_us"])

    text = markdown.read_text()
    assert "| conv2 input gradient |" in text
    assert "training, images/s" in text and "nan" not in text.lower()
    # The prose states the numbers the JSON holds.
    assert f"at most {kernels['ceiling_with_these_convolutions']:.2f}x faster" in text
    assert f"{training['ratio']:.2f}x" in text
    assert readme.read_text() == f"# Title\n\n{common.README_START}\n{text.strip()}\n{common.README_END}\n\nAfter.\n"


def test_bench_refuses_a_nonpositive_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats must be a positive integer" in capsys.readouterr().err


def test_bench_refuses_a_readme_without_markers_before_measuring(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--doc", str(readme)])
    assert exit_info.value.code == 2
    assert "has no lines <!-- bench:start -->" in capsys.readouterr().err
    assert readme.read_text() == "# Title\n"


def test_speedrun_scales_each_seed_by_the_faster_yardstick_run_beside_it():
    """A seed that ran while the machine was in its slow mode (both yardstick runs beside it
    took 20 s) fails the strict verdict, by the run's fastest yardstick, but not the other."""
    from benchmarks.speedrun import neighbouring_yardsticks, summarise

    yardstick, positions = [10.0, 20.0, 20.0, 8.0], [0, 1, 2, 3]
    assert [neighbouring_yardsticks(yardstick, positions, index) for index in range(3)] == [10.0, 20.0, 8.0]
    # Two yardstick runs spread over three seeds: every seed lies between the same two.
    assert [neighbouring_yardsticks([10.0, 9.0], [0, 3], index) for index in range(3)] == [9.0, 9.0, 9.0]
    runs = [{"test_accuracy": 0.9, "seconds_to_tested_model": wait, "stage_seconds": []} for wait in (5.0, 15.0, 4.0)]
    summary = summarise(runs, yardstick, positions, target=0.9, time_target=10.0)
    assert summary["scaled_time_target"] == pytest.approx(8.0)
    assert not summary["every_run_within_time_target"]
    assert summary["seconds_to_tested_model_on_reference"] == pytest.approx([5.0, 7.5, 5.0])
    assert summary["every_run_within_time_target_by_neighbours"]


@pytest.mark.slow
def test_speedrun_reports_every_seed_and_the_yardstick_in_the_doc(tmp_path):
    """Two tiny seeds in fresh train.py processes and the yardstick before them (where the yardstick
    runs go among the seeds: the test above)."""
    from benchmarks import speedrun

    output, page = tmp_path / "speedrun.json", tmp_path / "speedrun.md"
    page.write_text("# Speedrun\n\n<!-- speedrun-fashion_mnist:start -->\nold\n<!-- speedrun-fashion_mnist:end -->\n")
    assert speedrun.main(["--seeds", "2", "--yardstick-repeats", "1", "--yardstick-examples", "2048",
                          "--target", "0.5", "--time-target", "45",
                          "--output", str(output), "--doc", str(page),
                          "--", "--limit-train", "1024", "--limit-test", "256", "--epochs", "2", "--format", ""]) == 0
    result = json.loads(output.read_text())
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    assert len(result["summary"]["yardstick_seconds"]) == 1
    for run in result["runs"]:
        # The wait for a tested model is part of the process's life, which is longer.
        assert 0 < run["seconds_to_tested_model"] < run["process_seconds_with_export"]
        assert [epoch for epoch, _ in run["validation_curve"]] == [1, 2]
        # The first epoch whose validation reached the target (0.5), if one did.
        first = next((epoch for epoch, accuracy in run["validation_curve"] if accuracy >= 0.5), None)
        assert (run["first_reached_target"] or {}).get("epoch") == first
    summary = result["summary"]
    yardstick = summary["yardstick_seconds"]
    assert summary["scaled_time_target"] == pytest.approx(45 * min(yardstick) / 10)
    assert summary["yardstick_after_seeds"] == [0]
    text = page.read_text()
    assert "old" not in text
    for run in result["runs"]:  # Each seed's row, with the accuracy its run measured.
        assert f"| {run['seed']} | {run['test_accuracy']:.4f} | {run['seconds_to_tested_model']:.1f} | " in text
    # The flags passed through are named in both commands of the block.
    assert text.count("--limit-train 1024 --limit-test 256 --epochs 2 --format ") == 2


def test_int8_latency_compares_both_int8_conversions_with_float32(tmp_path, fashion_mnist_dir, capsys):
    """A tiny classic run, then every model of the comparison converted, scored and timed."""
    from benchmarks import int8_latency
    from lenet_tf.config import TrainConfig
    from lenet_tf.train import train_and_evaluate

    config = TrainConfig(epochs=1, limit_train=2048, limit_test=500, data_dir=str(fashion_mnist_dir),
                         run_dir=str(tmp_path / "run"), export_formats=())
    train_and_evaluate(config)
    assert int8_latency.main([str(tmp_path / "run"), "--rounds", "2", "--calls", "20"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row[0] for row in rows] == [
        "| float32", "| dynamic", "| int8, average pools kept", "| int8, as exported",
        "| float32, without the default delegate", "| float32, XNNPACK, 2 threads",
        "| int8, as exported, without the default delegate", "| int8, as exported, XNNPACK, 2 threads"]
    for row in rows:
        assert 0.0 <= float(row[2]) <= 1.0 and float(row[3].split()[0]) > 0
    assert rows[0][4].startswith("1.00x")


def test_results_tables_name_the_machine_they_were_measured_on():
    """Speeds differ several times between machines of the same size: every
    generated table says which CPU, and which TensorFlow, it ran on."""
    from benchmarks.results import ablation_markdown, table_markdown

    machine = {"cpu": "AMD EPYC", "cores": 2, "tensorflow": "2.21.0", "keras": "3.15.1", "gpus": []}
    spread = {"mean": 0.93, "std": 0.001, "min": 0.929, "max": 0.931}
    table = {"commit": "abc1234", "date": "2026-11-23", "cores": 2, "machine": machine, "rows": [
        {"dataset": "fashion_mnist", "preset": "modern", "epochs": 30, "seeds": [0, 1, 2], "test_accuracy": spread,
         "wall_seconds": {**spread, "mean": 243.0}, "published": "0.922-0.925"}]}
    ablation = {"commit": "abc1234", "date": "2026-11-23", "cores": 2, "machine": machine, "dataset": "fashion_mnist",
                "seed": 0, "rows": [{"change": "modern (all changes)", "flags": "", "validation_accuracy": 0.93}]}
    for markdown in (table_markdown(table), ablation_markdown(ablation)):
        assert "on 2026-11-23, 2 cores of AMD EPYC, TensorFlow 2.21.0, Keras 3.15.1" in markdown.splitlines()[0]
    assert "| fashion_mnist | modern | 30 | 3 | **0.9300** ± 0.0010 | 0.9290..0.9310 | 243 s |" in table_markdown(table)
